"""Reusable buffers for write commands' data.

A fresh 1 MiB bytearray costs more than the data it carries: glibc maps it,
the first touch of each of its pages faults, and freeing it unmaps it again
(here: ~670 us to allocate, fill and free one vs ~90 us to fill a reused
one). So the data of writes of at least POOL_MIN bytes goes into a pool of
bytearrays kept between commands.

The transport hands a pooled buffer to others only as memoryviews (the
SCSI layer's Data-Out, payloads received in place) and drops its own
reference before giving it back. A buffer goes back to the pool only when
no view of it is alive -- a store's thread still writing from it (a
command aborted meanwhile), a payload still being received into it keep it
out, and it is then freed as before when the last view goes -- so a buffer
is never handed to a second command while the first still uses it,
whatever path the first one ended on.

A taken buffer's contents are undefined (some earlier command's data): a
write executes only once its immediate data and Data-Out filled every byte.
(Reads' Data-In is not pooled: an answer its peer does not read would hold
the buffer besides the transport's copy of it.)

(Not restore_core.copier.BufferPool: the copier's scratch buffers never
leave it, while these are lent to the SCSI layer and the kernel.)

Idle buffers are memory no session's budget is charged for: the pool holds
at most ``capacity`` bytes (IscsiServer: 1/POOL_SHARE of the memory limit,
out of the share the budget leaves to everything but command data).
"""
from __future__ import annotations

POOL_MIN = 64 * 1024        # smaller buffers come from malloc's free lists cheaply
POOL_SHARE = 16             # the pool holds at most 1/POOL_SHARE of the memory limit
#: Payloads (immediate data, Data-Out) at least this big are received in
#: place, in their write's buffer (connection._start_direct); smaller ones
#: are copied out of the receive buffer once whole.
DIRECT_MIN = 16 * 1024
#: Writes up to this size get a plain buffer at receipt when all their data
#: fits the budget (the fast path); bigger ones get a lazy mapping, so one
#: whose data never comes holds budget but not memory (datapath). The
#: native lane collects the data of writes up to this size.
EAGER_WRITE = 8 << 20


def unviewed(buf: bytearray) -> bool:
    """Is no memoryview of ``buf`` alive? A bytearray cannot be resized
    while one is; shrinking by its last byte and putting it back resizes it
    in place (no reallocation: growing it first would over-allocate). ~70 ns."""
    try:
        last = buf.pop()
    except BufferError:
        return False
    buf.append(last)
    return True


class WriteBuffers:
    __slots__ = ("capacity", "held", "_free", "reused")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0                                   # bytes of idle buffers
        self._free: dict[int, list[bytearray]] = {}     # by size
        self.reused = 0

    def take(self, n: int) -> bytearray:
        """A buffer of ``n`` bytes, contents undefined (zeroed if new)."""
        free = self._free.get(n)
        if free:
            self.held -= n
            self.reused += 1
            return free.pop()
        return bytearray(n)

    def take_idle(self, n: int) -> bytearray | None:
        """An idle buffer of ``n`` bytes, or None: never a new one (for a
        buffer needed before any budget is charged for it)."""
        free = self._free.get(n)
        return self.take(n) if free else None

    def give(self, buf: object) -> None:
        """Keep ``buf`` (the caller drops its reference) for a later take()
        of its size, if it is a bytearray no view of which is alive and it
        fits; else leave it to be freed."""
        if buf.__class__ is not bytearray:
            return
        n = len(buf)
        if n < POOL_MIN or n > self.capacity or not unviewed(buf):
            return
        if self.held + n > self.capacity and not self._make_room(n):
            return
        self._free.setdefault(n, []).append(buf)
        self.held += n

    def _make_room(self, n: int) -> bool:
        """Drop idle buffers of other sizes (the workload moved on) until
        ``n`` more bytes fit; False if it still does not."""
        for size in sorted(self._free, reverse=True):
            if size == n:
                continue
            free = self._free.pop(size)
            self.held -= size * len(free)
            if self.held + n <= self.capacity:
                return True
        return self.held + n <= self.capacity

    def clear(self) -> None:
        self._free.clear()
        self.held = 0
