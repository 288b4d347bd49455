"""The one I/O interface between the SCSI layer and whatever stores a LU.

The SCSI emulation (target/scsi) knows nothing of pairs or restores: it calls
these methods and maps the exceptions below to sense data. The restore
engine's volume I/O path (restore_core.volume_io.VolumeIO) implements it, and
so does PlainLunIO, a thin adapter over a bare block store.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from restore_core.blockstore import BlockStore, BlockStoreError


class Access(enum.Enum):
    READ_WRITE = "read-write"
    READ_ONLY = "read-only"    # writes get DATA PROTECT / WRITE PROTECTED
    NOT_READY = "not-ready"    # everything but INQUIRY etc. gets NOT READY


@dataclass(frozen=True)
class AccessState:
    access: Access
    reason: str = ""           # for logs/status: e.g. "clone of a protected restore"


class LunIOError(Exception):
    """Base of the errors the SCSI layer maps to sense data."""


class MediumError(LunIOError):
    """Backend I/O failed: MEDIUM ERROR, with the failing byte offset if known."""

    def __init__(self, message: str, offset: int | None = None, *, write: bool = False) -> None:
        super().__init__(message)
        self.offset = offset
        self.write = write


class NotReadyError(LunIOError):
    """The LU cannot serve I/O now (e.g. the clone during a protected restore)."""


class WriteProtectedError(LunIOError):
    """The LU is read-only now (e.g. a clone while paired)."""


@runtime_checkable
class LunIO(Protocol):
    """What the SCSI layer needs from a logical unit's storage.

    Byte offsets and lengths; the SCSI layer validates LBA ranges against
    ``size`` before calling. ``fua`` asks for the data to be durable before
    the call returns. ``generation`` changes whenever the data under the host
    changed behind its back (a restore started or ended, capacity changed):
    the SCSI layer raises a unit attention on each I_T nexus when it sees a
    new value.

    Optional fast path (not part of the checked protocol): synchronous
    ``try_readinto(offset, bufs) -> bool`` and ``try_write(offset, bufs) ->
    bool`` do the whole transfer at once between the LU and the transport's
    buffers and return True, or return False having changed nothing a host
    could see, and the coroutines above run instead (and report errors).
    """

    @property
    def size(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def access_state(self) -> AccessState: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def unmap(self, offset: int, length: int) -> None: ...

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...


class PlainLunIO:
    """LunIO over a bare BlockStore: no pair, no tracking (tests, peers)."""

    def __init__(self, store: BlockStore, *, read_only: bool = False) -> None:
        self.store = store
        self.read_only = read_only
        self.generation = 0

    @property
    def size(self) -> int:
        return self.store.size

    def access_state(self) -> AccessState:
        return AccessState(Access.READ_ONLY if self.read_only else Access.READ_WRITE)

    async def read(self, offset: int, length: int) -> bytearray:
        try:
            return await self.store.read(offset, length)
        except BlockStoreError as e:
            raise MediumError(str(e), e.offset) from e

    def try_readinto(self, offset: int, bufs: list[memoryview]) -> bool:
        return self.store.try_readinto(offset, bufs)

    def try_write(self, offset: int, bufs: list) -> bool:
        return not self.read_only and self.store.try_write(offset, bufs)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise WriteProtectedError("read-only LU")
        try:
            await self.store.write(offset, data)
            if fua:
                await self.store.flush()
        except BlockStoreError as e:
            raise MediumError(str(e), e.offset, write=True) from e

    async def flush(self) -> None:
        try:
            await self.store.flush()
        except BlockStoreError as e:
            raise MediumError(str(e), e.offset, write=True) from e

    async def unmap(self, offset: int, length: int) -> None:
        if self.read_only:
            raise WriteProtectedError("read-only LU")
        try:
            await self.store.discard(offset, length)
        except BlockStoreError as e:
            raise MediumError(str(e), e.offset, write=True) from e

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.store.allocation(offset, length)
