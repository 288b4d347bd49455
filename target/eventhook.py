"""`serve --on-event CMD`: run an admin's command for every event, e.g. to
send a message when a restore finishes.

The command runs under /bin/sh with the event as one JSON line on its
standard input and LIVERESTORE_EVENT set to the event's kind; its output
goes nowhere (the event log has the event). It never holds up I/O: events
are queued (at most MAX_QUEUED; more are dropped with a rate-limited
warning), at most MAX_RUNNING commands run at once, and one that runs
longer than its timeout is killed. A failing command (exit status,
timeout, cannot start) is logged, rate-limited: a broken hook costs one
line per interval, not one per event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from .logsafe import RateLimitedLog

log = logging.getLogger("liverestore.events")
ratelog = RateLimitedLog(log)

DEFAULT_TIMEOUT = 10.0
MAX_RUNNING = 4
MAX_QUEUED = 64


class EventHook:
    def __init__(self, command: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_running: int = MAX_RUNNING, max_queued: int = MAX_QUEUED) -> None:
        self.command = command
        self.timeout = timeout
        self.max_running = max_running
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queued)
        self._workers: list[asyncio.Task[None]] = []
        self.ran = 0
        self.failed = 0
        self.dropped = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(), name=f"on-event:{i}")
                         for i in range(self.max_running)]

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    def __call__(self, event: dict[str, Any]) -> None:
        """An EventBus sink: queue the event, never wait."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            ratelog.warning("hook-dropped", "on-event hook: %d events waiting; event %s dropped",
                            self._queue.qsize(), event.get("kind"))

    async def _work(self) -> None:
        while True:
            ev = await self._queue.get()
            why = await self._run(ev)
            self.ran += 1
            if why is not None:
                self.failed += 1
                ratelog.warning("hook-failed", "on-event hook %r failed on %s: %s",
                                self.command, ev.get("kind"), why)

    async def _run(self, ev: dict[str, Any]) -> str | None:
        """Run the command for one event; None, or why it failed."""
        data = (json.dumps(ev, sort_keys=True, default=str) + "\n").encode()
        try:
            proc = await asyncio.create_subprocess_shell(
                self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "LIVERESTORE_EVENT": str(ev.get("kind"))})
        except OSError as e:
            return f"cannot start it: {e.strerror or e}"
        try:
            await asyncio.wait_for(proc.communicate(data), self.timeout)
        except asyncio.TimeoutError:
            _kill(proc)
            await proc.wait()
            return f"still running after {self.timeout:g}s; killed"
        except asyncio.CancelledError:
            _kill(proc)
            raise
        if proc.returncode:
            return f"exit status {proc.returncode}"
        return None


def _kill(proc: asyncio.subprocess.Process) -> None:
    # the whole group: a shell's children must not outlive the timeout
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
