"""PlainLunIO: the LunIO interface over a bare block store.

No pair, no tracking: for tests, the stand-alone transports
(``python -m target.iscsi``, ``python -m target.tcmu``) and peers.
"""
from __future__ import annotations

from .blockstore import BlockStore, BlockStoreError
from .direct import DirectLease
from .lunio import READ_WRITE, Access, AccessState, ReadWork, WriteProtectedError, WriteWork
from .store_errors import host_error

_READ_ONLY = AccessState(Access.READ_ONLY)


def _nothing() -> None:
    """No gate to leave once a direct read let go of its buffer."""


class PlainLunIO:
    """LunIO over a bare BlockStore."""

    def __init__(self, store: BlockStore, *, read_only: bool = False) -> None:
        self.store = store
        self.read_only = read_only
        self.generation = 0

    @property
    def size(self) -> int:
        return self.store.size

    def access_state(self) -> AccessState:
        return _READ_ONLY if self.read_only else READ_WRITE

    async def read(self, offset: int, length: int) -> bytearray:
        try:
            return await self.store.read(offset, length)
        except BlockStoreError as e:
            raise host_error(e) from e

    def direct_lease(self) -> DirectLease | None:
        """Every read and non-FUA write goes straight to the store, unless read-only."""
        return None if self.read_only else DirectLease(self.store, lambda: not self.read_only)

    def route_read(self, offset: int, into: list[memoryview]) -> ReadWork | None:
        if self.store.try_readinto(offset, into):
            return None
        if len(into) == 1:
            started = self.store.start_readinto(offset, into[0], _nothing, host_error)
            if started is not None:
                return started
        return self.read(offset, sum(map(len, into)))

    def route_write(self, offset: int, data: memoryview, fua: bool) -> WriteWork | None:
        if not fua and not self.read_only and self.store.try_write(offset, [data]):
            return None
        return self.write(offset, data, fua)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise WriteProtectedError("read-only LU")
        try:
            await self.store.write(offset, data)
            if fua:
                await self.store.flush()
        except BlockStoreError as e:
            raise host_error(e, write=True) from e

    async def flush(self) -> None:
        try:
            await self.store.flush()
        except BlockStoreError as e:
            raise host_error(e, write=True) from e

    async def unmap(self, offset: int, length: int) -> None:
        if self.read_only:
            raise WriteProtectedError("read-only LU")
        try:
            await self.store.discard(offset, length)
        except BlockStoreError as e:
            raise host_error(e, write=True) from e

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.store.allocation(offset, length)
