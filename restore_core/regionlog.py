"""Dirty-region log for mirrored writes (sync, synchronized, unprotected restore).

A mirrored host write sets the extent's bit durably *before* touching either
leg, so a crash between the two legs leaves the extent marked "may differ".
Once both legs are durable and no write is in flight on the extent, the bit
can be cleared again -- lazily and in batches, like dm-raid1's region log:
a stale set bit costs one extent copy after a crash, never correctness.
"""
from __future__ import annotations

from typing import Protocol


class DirtyRegions(Protocol):
    def clear_region(self, e: int) -> None: ...


class RegionLog:
    def __init__(self, maps: DirtyRegions) -> None:
        self.maps = maps
        self._inflight: dict[int, int] = {}
        self._last_done: dict[int, int] = {}    # extent -> generation its last write ended
        self.gen = 0

    def begin(self, first: int, end: int) -> None:
        for e in range(first, end):
            self._inflight[e] = self._inflight.get(e, 0) + 1

    def _leave(self, e: int) -> None:
        n = self._inflight[e] - 1
        if n:
            self._inflight[e] = n
        else:
            del self._inflight[e]

    def end(self, first: int, end: int) -> None:
        self.gen += 1
        for e in range(first, end):
            self._leave(e)
            self._last_done[e] = self.gen

    def abort(self, first: int, end: int) -> None:
        """A mirrored write failed: the legs may differ, keep the marks."""
        for e in range(first, end):
            self._leave(e)
            self._last_done.pop(e, None)

    @property
    def candidates(self) -> int:
        return len(self._last_done)

    def clean(self, flushed_gen: int) -> int:
        """Clear marks of idle extents whose last write ended before both
        legs were flushed (the flush began at ``flushed_gen``)."""
        cleared = 0
        for e, g in list(self._last_done.items()):
            if g <= flushed_gen and e not in self._inflight:
                self.maps.clear_region(e)
                del self._last_done[e]
                cleared += 1
        return cleared
