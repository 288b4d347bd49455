"""Eager start of per-command coroutines (Python 3.12's eager task factory,
for 3.11 and for one call site rather than a whole loop).

Most SCSI commands never wait: a cached read (RWF_NOWAIT) or a small write
completes inside the first step of its coroutine. Wrapping each in an
asyncio Task costs a Task object, a loop iteration and two callbacks per
command -- a measurable share of a 4 KiB command's CPU time. ``start``
runs the coroutine at once, in the caller's stack, and only when it really
suspends hands the rest of it to a Task, which resumes it exactly where it
stopped (the future it is waiting on is passed through untouched, so
cancellation and exceptions behave as if it had been a Task from the
start).
"""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine


class _Resume:
    """Awaitable that continues an already-started coroutine: yields the
    future it was suspended on, then delegates as ``yield from`` would."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self):
        coro = self.coro
        out = self.first
        self.first = None
        while True:
            try:
                value = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # noqa: BLE001 - cancellation, thrown in by the Task
                try:
                    out = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    out = coro.send(value)
                except StopIteration as stop:
                    return stop.value


async def _continue(r: _Resume) -> Any:
    return await r


def start(coro: Coroutine[Any, Any, Any],
          loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task | None:
    """Run ``coro`` now until it first suspends. Returns None if it finished
    (its result is dropped: callers use it for side effects and handle their
    own errors), else the Task that carries on with it. An exception it
    raises before suspending propagates to the caller."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    if loop is None:
        loop = asyncio.get_running_loop()
    return loop.create_task(_continue(_Resume(coro, first)))
