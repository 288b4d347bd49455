"""The stand-in store of an offline volume."""
from __future__ import annotations

from ..blockstore import BlockStore, BlockStoreError


class MissingBlockStore(BlockStore):
    """Stands in for a volume whose image could not be opened: it has the
    recorded size (so its pairs load) and refuses every I/O with the reason.
    Nothing is ever written, so a flush has nothing to make durable."""

    def __init__(self, path: str, size: int, reason: str, kind: str = "file") -> None:
        self.path = path
        self.name = path
        self.kind = kind
        self._size = size
        self.reason = reason

    @property
    def size(self) -> int:
        return self._size

    async def readinto(self, offset: int, buf: memoryview) -> None:
        raise BlockStoreError(self.reason, offset)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise BlockStoreError(self.reason, offset)

    async def discard(self, offset: int, length: int) -> None:
        raise BlockStoreError(self.reason, offset)

    async def flush(self) -> None:
        return None
