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
import collections.abc
from typing import Any, Coroutine


class _Resume(collections.abc.Coroutine):
    """The rest of an already-started coroutine, driven by a Task directly
    (it is a coroutine to asyncio): the Task's first step gets the future
    the coroutine is suspended on, passed through untouched; every later
    step, value or exception (cancellation included), goes straight to the
    coroutine. No wrapper coroutine and no generator frame in between:
    each resumption of a command that waits crosses two frames fewer."""

    __slots__ = ("coro", "first", "started")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first          # what the coroutine yielded (None: a bare yield)
        self.started = False

    def send(self, value: Any) -> Any:
        if not self.started:
            self.started = True
            first, self.first = self.first, None
            return first
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        # (cancelled before its first step: into the coroutine, where it waits)
        self.started = True
        self.first = None
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.first = None
        self.coro.close()

    def __await__(self) -> "_Resume":
        return self

    def __iter__(self) -> "_Resume":
        return self

    def __next__(self) -> Any:
        return self.send(None)

    @property
    def cr_frame(self) -> Any:      # for Task.get_stack() and reprs
        return getattr(self.coro, "cr_frame", None)


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
    return loop.create_task(_Resume(coro, first))
