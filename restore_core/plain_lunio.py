"""PlainLunIO: the LunIO interface over a bare block store.

No pair, no tracking: for tests, the stand-alone transports
(``python -m target.iscsi``, ``python -m target.tcmu``) and peers.
"""
from __future__ import annotations

from .blockstore import BlockStore, BlockStoreError
from .lunio import READ_WRITE, Access, AccessState, MediumError, WriteProtectedError

_READ_ONLY = AccessState(Access.READ_ONLY)


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
