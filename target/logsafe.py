"""Logging what a client controls, without letting the client control the log.

Two tools, used at every warning a remote peer can trigger once per PDU,
command, connection or login attempt (iSCSI and SCSI layers):

* ``clip(value)``: a client-supplied value (an IQN, a CHAP_N, a key list)
  as a short printable string: control characters escaped, cut at ``limit``
  characters with a note of how much was dropped.
* ``RateLimitedLog``: one line per burst instead of one per event. The first
  event of a kind is logged at once; the ones that follow within
  ``interval`` seconds are only counted, and when the interval ends one
  summary line says "<latest message> (and 4,999 more in the last 10 s)".

The package sits under ``target`` (not ``restore_core``) because only the
front ends log per-request: the engine logs per pair and per job.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

CLIP_LIMIT = 64                 # characters of one client value kept in a log line
NAME_CLIP = 256                 # a whole iSCSI name (at most 223 bytes) and its ISID suffix
MESSAGE_CLIP = 512              # a whole message assembled from client values
DEFAULT_INTERVAL = 10.0         # seconds one burst of a kind is summarised over


def clip(value: object, limit: int = CLIP_LIMIT, *, quote: bool = True) -> str:
    """A client-supplied value as a short printable string for a log line or
    an error message: a string escaped (quoted unless ``quote`` is false),
    anything else as its repr; cut at ``limit`` characters with a note of
    how much was dropped, so one line stays one short line whatever the
    client sent."""
    if isinstance(value, str):
        head = value[:limit]
        shown = repr(head) if quote else repr(head)[1:-1]
        dropped = len(value) - len(head)
    else:
        text = repr(value)
        shown, dropped = text[:limit], max(0, len(text) - limit)
    # say how much was dropped so the reader knows the value was longer
    return f"{shown}...(+{dropped} chars)" if dropped else shown


@dataclass
class _Burst:
    until: float                 # end of the current interval
    suppressed: int = 0          # events counted but not logged in it
    level: int = logging.INFO
    msg: str = ""
    args: tuple = ()
    timer: asyncio.TimerHandle | None = None


class RateLimitedLog:
    """Per-kind rate limit in front of a ``logging.Logger``.

    ``kind`` is chosen by the call site ("cmdsn-window", "medium-error LU7"),
    never from client data, so the table stays small.
    """

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._bursts: dict[str, _Burst] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, kind, msg, *args)

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self.clock()
        b = self._bursts.get(kind)
        if b is not None and now < b.until:
            b.suppressed += 1
            b.level, b.msg, b.args = level, msg, args      # the summary shows the latest one
            if b.timer is None:
                b.timer = self._schedule(kind, b.until - now)
            return
        if b is not None and b.suppressed:
            self._summarise(kind, b)
        self._bursts[kind] = _Burst(until=now + self.interval)
        self.logger.log(level, msg, *args)

    def flush(self) -> None:
        """Write the summaries of every burst still open (e.g. at shutdown)."""
        for kind, b in list(self._bursts.items()):
            if b.suppressed:
                self._summarise(kind, b)

    def _schedule(self, kind: str, delay: float) -> asyncio.TimerHandle | None:
        # On an event loop the summary comes when the interval ends even if
        # the flood has stopped; without one it comes with the next event.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return loop.call_later(max(0.0, delay), self._on_timer, kind)

    def _on_timer(self, kind: str) -> None:
        b = self._bursts.get(kind)
        if b is not None:
            b.timer = None
            if b.suppressed:
                self._summarise(kind, b)
                # the interval that starts now is the next burst's
                b.until = self.clock() + self.interval

    def _summarise(self, kind: str, b: _Burst) -> None:
        if b.timer is not None:
            b.timer.cancel()
            b.timer = None
        n, b.suppressed = b.suppressed, 0
        if n == 1:
            self.logger.log(b.level, b.msg, *b.args)
            return
        # the line shown is one of the n: "and n-1 more" keeps the total exact
        self.logger.log(b.level, b.msg + " (and %s more in the last %s s)",
                        *b.args, f"{n - 1:,}", f"{self.interval:g}")
