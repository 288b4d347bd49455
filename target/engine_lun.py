"""LunIO over the restore engine's volume I/O path.

The only place where the SCSI side meets the engine: maps the engine's host
I/O errors and access states onto target.lunio's, so target/scsi stays
ignorant of pairs and restores.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from restore_core.volume_io import (HostMediumError, HostNotReady, HostWriteProtected,
                                    VolumeIO)

from .lunio import Access, AccessState, MediumError, NotReadyError, WriteProtectedError

_ACCESS = {"read-write": Access.READ_WRITE, "read-only": Access.READ_ONLY,
           "not-ready": Access.NOT_READY}


@contextlib.contextmanager
def _mapped(write: bool = False) -> Iterator[None]:
    """Engine host-I/O errors as the LunIO errors the SCSI layer knows."""
    try:
        yield
    except HostNotReady as e:
        raise NotReadyError(str(e)) from e
    except HostWriteProtected as e:
        raise WriteProtectedError(str(e)) from e
    except HostMediumError as e:
        raise MediumError(str(e), e.offset, write=write or e.write) from e


class EngineLunIO:
    def __init__(self, vio: VolumeIO) -> None:
        self.vio = vio

    @property
    def size(self) -> int:
        return self.vio.size

    @property
    def generation(self) -> int:
        return self.vio.generation

    def access_state(self) -> AccessState:
        mode, why = self.vio.access()
        return AccessState(_ACCESS[mode], why)

    async def read(self, offset: int, length: int):
        with _mapped():
            return await self.vio.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        with _mapped(write=True):
            await self.vio.write(offset, data, fua)

    async def flush(self) -> None:
        with _mapped(write=True):
            await self.vio.flush()

    async def unmap(self, offset: int, length: int) -> None:
        with _mapped(write=True):
            await self.vio.unmap(offset, length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.vio.allocation(offset, length)
