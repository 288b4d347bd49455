"""A gate in front of a volume's host I/O, closed around pair state changes.

A state change (restore starts or ends, fracture, sync starts) must not see
a host write that decided its path under the old state and lands under the
new one: that write would mark the wrong map. Closing the gate lets the
in-flight I/O finish and holds new I/O until the change is made.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable


class IOGate:
    def __init__(self) -> None:
        self.inflight = 0
        self._closed = 0
        self._open = asyncio.Event()
        self._open.set()
        self._drained: asyncio.Event | None = None
        # told when the gate starts closing: a direct lease's holder, which
        # holds the gate entered, leaves at once instead of at its next poll
        self._watchers: set[Callable[[], None]] = set()

    def watch(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` each time the gate starts closing; returns what stops it."""
        self._watchers.add(fn)
        return lambda: self._watchers.discard(fn)

    @property
    def is_closed(self) -> bool:
        return bool(self._closed)

    def try_enter(self) -> bool:
        """Enter without waiting if the gate is open (the host I/O fast
        path: no coroutine); False means ``await enter()``."""
        if self._closed:
            return False
        self.inflight += 1
        return True

    async def enter(self) -> None:
        while self._closed:
            await self._open.wait()
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._drained is not None:
            self._drained.set()

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        self._closed += 1
        self._open.clear()
        for fn in tuple(self._watchers):
            fn()
        try:
            while self.inflight:
                self._drained = asyncio.Event()
                await self._drained.wait()
            yield
        finally:
            self._drained = None
            self._closed -= 1
            if not self._closed:
                self._open.set()


@contextlib.asynccontextmanager
async def all_closed(*gates: IOGate) -> AsyncIterator[None]:
    """Every one of ``gates`` closed, in the order given, while entered."""
    async with contextlib.AsyncExitStack() as stack:
        for g in gates:
            await stack.enter_async_context(g.closed())
        yield
