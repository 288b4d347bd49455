"""The small block-store interface the restore engine runs over, and a RAM
store for tests and the power-cut simulation.

Everything is byte-addressed (offset, length); the SCSI layer converts LBAs.
I/O methods are coroutines so the engine and both front ends (iSCSI, TCMU)
share one asyncio loop. The real stores (an image file or block device,
a Ceph RBD image) live in ``restore_core.stores``, which also opens one
from a volume's persisted spec.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Callable, Iterable
class BlockStoreError(Exception):
    """An I/O error from a backing store (becomes a MEDIUM ERROR for hosts)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class StoreFencedError(BlockStoreError):
    """The store was fenced (another client took its image): the volume is
    offline, so a host sees NOT READY with this reason, not a MEDIUM ERROR."""


class BlockStore(ABC):
    """A fixed-size byte-addressed store: an image file, a block device, RAM."""

    name: str = "?"
    #: what a volume record persists as its kind ("file", "blockdev", "rbd")
    kind: str = "memory"
    #: copy I/Os the store needs in flight to stream at its rate: a local
    #: disk streams from few (the copier's default depth suits it), a
    #: network store pays a round trip per I/O and needs more; the copier
    #: runs at least this many on a pair with this store on either side
    copy_depth: int = 1

    @property
    @abstractmethod
    def size(self) -> int:
        """Size in bytes."""

    @abstractmethod
    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill buf (len(buf) bytes) from offset. Reads past EOF are an error."""

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.readinto(offset, memoryview(buf))
        return buf

    @abstractmethod
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write data at offset. Volatile until flush() returns."""

    @abstractmethod
    async def flush(self) -> None:
        """Make every write that completed before this call durable."""

    # Synchronous attempts (the host I/O fast path): do the whole I/O now,
    # without blocking the event loop, and return True; or return False
    # having done nothing a reader could tell apart, and the caller uses
    # the coroutine. Errors also return False: the coroutine reports them.
    def try_readinto(self, offset: int, bufs: list[memoryview]) -> bool:
        return False

    def try_write(self, offset: int, bufs: list) -> bool:
        return False

    # The asynchronous direct read (a store whose reads complete on the loop
    # by themselves, RBD): start reading len(buf) bytes at offset straight
    # into buf and return its future -- None once buf is filled, else the
    # exception error(e) makes of the store's error -- with no coroutine and
    # no buffer of its own; ``settled()`` runs once the store let go of buf
    # (also when the future was cancelled first). None: nothing started,
    # the caller uses the coroutine.
    def start_readinto(self, offset: int, buf: memoryview, settled: Callable[[], None],
                       error: Callable[[BlockStoreError], Exception]
                       ) -> asyncio.Future[None] | None:
        return None

    # Background I/O (the copier while hosts are busy): the same I/O, but
    # never run on the event loop, where it would hold up host commands, and
    # queued behind host I/O wherever the store queues (a file store: in
    # threads of low CPU priority, which may wait long on a busy machine).
    # Stores with no such distinction do the plain I/O.
    async def readinto_background(self, offset: int, buf: memoryview) -> None:
        await self.readinto(offset, buf)

    async def write_background(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.write(offset, data)

    def copies_within(self, dst: "BlockStore") -> bool:
        """This pair of stores copies between themselves (copy_within), as
        far as is known before trying: the copier sizes its copies by it."""
        return False

    async def copy_within(self, dst: "BlockStore", offset: int, length: int,
                          background: bool = False) -> bool:
        """Copy ``length`` bytes at ``offset`` to the same offset of ``dst``
        without a buffer of ours, where this pair of stores can (file to file
        in the kernel): True when done (volatile on ``dst`` until its
        flush); False: they cannot, the caller copies through memory
        (copy_to). ``background`` as in readinto_background."""
        return False

    async def copy_to(self, dst: "BlockStore", offset: int, buf: memoryview,
                      background: bool = False) -> None:
        """Copy len(buf) bytes at ``offset`` to the same offset of ``dst``
        through ``buf`` (volatile there until ``dst.flush()``);
        ``background``: behind host I/O, as readinto_background."""
        if background:
            await self.readinto_background(offset, buf)
            await dst.write_background(offset, buf)
        else:
            await self.readinto(offset, buf)
            await dst.write(offset, buf)

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it must read back as zeros afterwards."""
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        done = 0
        while done < length:
            n = min(chunk, length - done)
            await self.write(offset + done, memoryview(zeros)[:n])
            done += n

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs (offset, length, mapped) covering [offset, offset+length).

        Stores that cannot tell report everything mapped.
        """
        return [(offset, length, True)]

    # Instants (optional; an RBD image's snapshots): the store keeps a named
    # mark of its content now and can later say exactly which ranges were
    # written (or discarded) since. A fractured pair marks one so that a
    # restart after a crash computes the exact delta of this side instead of
    # widening it by whole write-intent regions. Each call may block on the
    # store's cluster; failures are BlockStoreError (StoreFencedError once
    # the store was fenced).
    async def mark_instant(self, name: str) -> str | None:
        """Mark the content as it is now (no write may be in flight); returns
        the token the other calls take (what a record persists), or None:
        this store keeps no instants."""
        return None

    async def changed_since(self, instant: str,
                            ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(offset, length) runs within ``ranges`` (each offset, length)
        written or discarded since ``instant``; BlockStoreError if the
        instant is gone (or never was this store's)."""
        raise BlockStoreError(f"{self.name}: this store keeps no instants")

    async def drop_instant(self, instant: str) -> None:
        """Forget the instant (one already gone is no error)."""

    async def instants(self, prefix: str) -> list[str]:
        """Tokens of the instants this store keeps under names starting
        with ``prefix`` (a restart removes those no pair records)."""
        return []

    def close(self) -> None:  # pragma: no cover - trivial default
        pass

    def abandon(self) -> None:
        """Close, undoing what opening it created (a failed volume create
        leaves nothing behind). Stores that create nothing just close."""
        self.close()

    def grow(self, size: int) -> None:
        """Make the store ``size`` bytes (never smaller); stores that cannot
        grow say so."""
        raise BlockStoreError(f"{self.name}: this store cannot grow")

    def lost(self) -> str | None:
        """Why the store no longer reaches its image (a file store's file was
        deleted or replaced), or None. Stores without a path never lose it."""
        return None

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockStoreError(
                f"{self.name}: range {offset}+{length} outside store of {self.size} bytes",
                offset,
            )




class MemoryBlockStore(BlockStore):
    """RAM-backed store for tests and the power-cut simulation.

    Holds a durable image and a list of volatile writes; flush() applies the
    volatile writes to the durable image. ``power_cut()`` drops every write
    not covered by a completed flush; ``lose_some`` lets a cut keep a random
    subset of volatile writes (real disks reorder).
    """

    def __init__(self, size: int, name: str = "mem") -> None:
        self.name = name
        self._size = size
        self.durable = bytearray(size)
        self.current = bytearray(size)
        self._volatile: list[tuple[int, bytes]] = []
        self.writes = 0
        self.bytes_written = 0
        self.flushes = 0
        self.fail_at: set[int] = set()  # offsets whose reads raise (medium error)

    @property
    def size(self) -> int:
        return self._size

    async def readinto(self, offset: int, buf: memoryview) -> None:
        self.check_range(offset, len(buf))
        for bad in self.fail_at:
            if offset <= bad < offset + len(buf):
                raise BlockStoreError(f"{self.name}: injected medium error at {bad}", bad)
        buf[:] = self.current[offset:offset + len(buf)]
        await asyncio.sleep(0)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset, len(data))
        blob = bytes(data)
        await asyncio.sleep(0)
        self._apply(offset, blob)

    def _apply(self, offset: int, blob: bytes) -> None:
        self.current[offset:offset + len(blob)] = blob
        self._volatile.append((offset, blob))
        self.writes += 1
        self.bytes_written += len(blob)

    def try_readinto(self, offset: int, bufs: list[memoryview]) -> bool:
        n = sum(map(len, bufs))
        if offset < 0 or offset + n > self._size or any(offset <= b < offset + n for b in self.fail_at):
            return False
        for buf in bufs:
            buf[:] = self.current[offset:offset + len(buf)]
            offset += len(buf)
        return True

    def try_write(self, offset: int, bufs: list) -> bool:
        blob = b"".join(bytes(b) for b in bufs)
        if offset < 0 or offset + len(blob) > self._size:
            return False
        self._apply(offset, blob)
        return True

    async def flush(self) -> None:
        pending = self._volatile
        self._volatile = []
        await asyncio.sleep(0)
        for off, blob in pending:
            self.durable[off:off + len(blob)] = blob
        self.flushes += 1

    def power_cut(self, keep: Iterable[int] = ()) -> None:
        """Lose volatile writes, except the indexes in ``keep`` (applied in order)."""
        keep_set = set(keep)
        for i, (off, blob) in enumerate(self._volatile):
            if i in keep_set:
                self.durable[off:off + len(blob)] = blob
        self._volatile = []
        self.current = bytearray(self.durable)

    @property
    def volatile_count(self) -> int:
        return len(self._volatile)
