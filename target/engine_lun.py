"""LunIO over the restore engine's volume I/O path.

The only place where the SCSI side meets the engine: maps the engine's host
I/O errors and access states onto target.lunio's, so target/scsi stays
ignorant of pairs and restores.
"""
from __future__ import annotations

from restore_core.volume_io import (HostIOError, HostMediumError, HostNotReady,
                                    HostWriteProtected, VolumeIO)

from .lunio import Access, AccessState, MediumError, NotReadyError, WriteProtectedError

_ACCESS = {"read-write": Access.READ_WRITE, "read-only": Access.READ_ONLY,
           "not-ready": Access.NOT_READY}
_READ_WRITE = AccessState(Access.READ_WRITE, "")


def _lunio_error(e: HostIOError, write: bool = False) -> Exception:
    """An engine host-I/O error as the LunIO error the SCSI layer knows."""
    if isinstance(e, HostNotReady):
        return NotReadyError(str(e))
    if isinstance(e, HostWriteProtected):
        return WriteProtectedError(str(e))
    if isinstance(e, HostMediumError):
        return MediumError(str(e), e.offset, write=write or e.write)
    return MediumError(str(e), None, write=write)


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
        if mode == "read-write" and not why:
            return _READ_WRITE                 # every command asks: no object each time
        return AccessState(_ACCESS[mode], why)

    def try_readinto(self, offset: int, bufs: list[memoryview]) -> bool:
        return self.vio.try_readinto(offset, bufs)

    def try_write(self, offset: int, bufs: list) -> bool:
        return self.vio.try_write(offset, bufs)

    # (plain try/except: a context manager per command costs more than
    # the checks on the host I/O path)
    async def read(self, offset: int, length: int):
        try:
            return await self.vio.read(offset, length)
        except HostIOError as e:
            raise _lunio_error(e) from e

    async def write(self, offset: int, data, fua: bool = False) -> None:
        try:
            await self.vio.write(offset, data, fua)
        except HostIOError as e:
            raise _lunio_error(e, write=True) from e

    async def flush(self) -> None:
        try:
            await self.vio.flush()
        except HostIOError as e:
            raise _lunio_error(e, write=True) from e

    async def unmap(self, offset: int, length: int) -> None:
        try:
            await self.vio.unmap(offset, length)
        except HostIOError as e:
            raise _lunio_error(e, write=True) from e

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.vio.allocation(offset, length)
