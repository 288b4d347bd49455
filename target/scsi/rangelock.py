"""Byte-range lock ordering COMPARE AND WRITE against overlapping writes.

Ordinary writes take the range *shared*: they never wait for each other
(hosts order their own writes), only for an overlapping exclusive holder.
COMPARE AND WRITE takes it *exclusive*, so its read-compare-write cannot
interleave with another write to the same blocks (VMware ATS relies on it).
Waiters are served in arrival order, so a stream of writes cannot starve a
waiting COMPARE AND WRITE: a new request also waits behind any earlier
conflicting waiter. With no exclusive user around, acquiring is a dict insert.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator


@dataclass(eq=False)
class _Req:
    start: int
    end: int
    exclusive: bool
    future: asyncio.Future | None = field(default=None)

    def conflicts(self, other: "_Req") -> bool:
        return (self.exclusive or other.exclusive) and self.start < other.end and other.start < self.end


class RangeLock:
    def __init__(self) -> None:
        self._held: set[_Req] = set()
        self._waiting: deque[_Req] = deque()
        self._exclusive_count = 0   # held or waiting exclusive requests

    def _blocked(self, req: _Req, ahead: list[_Req] | deque[_Req]) -> bool:
        if not req.exclusive and self._exclusive_count == 0:
            return False
        return any(req.conflicts(h) for h in self._held) or any(req.conflicts(w) for w in ahead)

    async def acquire(self, start: int, length: int, exclusive: bool = False) -> _Req:
        req = _Req(start, start + max(length, 1), exclusive)
        if exclusive:
            self._exclusive_count += 1
        if not self._blocked(req, self._waiting):
            self._held.add(req)
            return req
        req.future = asyncio.get_running_loop().create_future()
        self._waiting.append(req)
        try:
            await req.future
        except BaseException:
            if req in self._held:          # granted just as we were cancelled
                self.release(req)
            else:
                self._waiting.remove(req)
                if exclusive:
                    self._exclusive_count -= 1
                self._wake()
            raise
        return req

    @property
    def exclusive_pending(self) -> bool:
        return self._exclusive_count > 0

    def try_shared(self, start: int, length: int) -> _Req | None:
        """Take a range shared at once when no exclusive request exists (the
        write fast path: no coroutine); None means ``await acquire()``."""
        if self._exclusive_count:
            return None
        req = _Req(start, start + max(length, 1), False)
        self._held.add(req)
        return req

    def release(self, req: _Req) -> None:
        self._held.discard(req)
        if req.exclusive:
            self._exclusive_count -= 1
        self._wake()

    def _wake(self) -> None:
        still: list[_Req] = []
        for w in list(self._waiting):
            if not self._blocked(w, still):
                self._waiting.remove(w)
                self._held.add(w)
                if w.future is not None and not w.future.done():
                    w.future.set_result(None)
            else:
                still.append(w)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, length: int, exclusive: bool = False) -> AsyncIterator[None]:
        req = await self.acquire(start, length, exclusive)
        try:
            yield
        finally:
            self.release(req)
