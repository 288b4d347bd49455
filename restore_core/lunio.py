"""The one I/O interface between the SCSI layer and whatever stores a LU.

It sits at the bottom of the import graph (it imports no project module):
the restore engine's host I/O path (restore_core.volume_io.VolumeIO)
implements it and raises its errors itself, and the SCSI emulation
(target/scsi) calls it and maps those errors to sense data in one place
(target/scsi/lunio_access.py). Nothing translates between the two.
PlainLunIO (restore_core.plain_lunio) implements it over a bare block store.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Awaitable, Coroutine, Protocol, runtime_checkable

Data = bytes | bytearray | memoryview
# The work a routing decision left to do: a coroutine not started yet (so a
# caller that drops it undoes nothing), awaited for the data / completion;
# or, for a read, a store's read already under way straight into the
# caller's buffers (BlockStore.start_readinto): a future of None.
ReadWork = Coroutine[Any, Any, Data] | Awaitable[None]
WriteWork = Coroutine[Any, Any, None]


class Access(enum.Enum):
    # The values are also what `volume show` reports as "access".
    READ_WRITE = "read-write"
    READ_ONLY = "read-only"    # writes get DATA PROTECT / WRITE PROTECTED
    NOT_READY = "not-ready"    # everything but INQUIRY etc. gets NOT READY


@dataclass(frozen=True)
class AccessState:
    access: Access
    reason: str = ""           # for logs/status: e.g. "clone of a protected restore"


# Every command asks for the access state: the usual answer is this one
# object, not a new one each time.
READ_WRITE = AccessState(Access.READ_WRITE)


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
    new value. Failures are raised as the LunIOError subclasses above.

    Host reads and writes are routed once: ``route_read`` and
    ``route_write`` decide, synchronously and once per command, whether the
    I/O can go straight to the store(s) -- then they do it at once and
    return None -- or needs work first (wait at a gate, copy or mark first, a
    store without synchronous I/O): then they return that work, a coroutine
    not yet started (nothing a host could see has happened), which the
    caller awaits and which reports the errors. The SCSI layer calls them
    after it checked ``access_state`` itself; the work checks again only
    after it had to wait. ``read``/``write`` are the same work without the
    direct path, for callers that have no buffers of their own.
    """

    @property
    def size(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def access_state(self) -> AccessState: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    def route_read(self, offset: int, into: list[memoryview]) -> ReadWork | None:
        """Read len(into) bytes at offset into ``into`` (None: done), or the
        work that returns them (``into`` is then not necessarily filled), or
        an awaitable of None that fills ``into``."""
        ...

    def route_write(self, offset: int, data: memoryview, fua: bool) -> WriteWork | None:
        """Write ``data`` at offset (None: done, as durable as a completed
        non-FUA write), or the work that writes it."""
        ...

    async def flush(self) -> None: ...

    async def unmap(self, offset: int, length: int) -> None: ...

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...

