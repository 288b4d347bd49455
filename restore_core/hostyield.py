"""When and how fast the background copier may copy: hosts first, with a floor.

Host activity is judged over a time window, not by counting commands in
flight: a queue-depth-1 host has nothing in flight between two of its
commands, and a copier that fills those gaps queues every next command
behind a copy. The LU counts as busy while a host command was seen within
the last ``host_window`` copy round trips (the round trip measured, so the
window follows the store: microseconds on a local file, milliseconds on
Ceph). Copy-on-demand copies run in the host's own command and so always go
ahead of background copies: the background copier stands back while the LU
is busy.

While busy the copier still copies -- one copy at a time, paced to the
minimum progress rate: ``min_progress_pct`` percent of its idle rate (its
throughput measured over stretches with no host I/O; before one was
measured, the throughput of one copy stream). So a restore under a host
that never pauses still finishes. A busy copy is one extent; when copies
that small cannot keep up with the floor (each one queues behind host I/O)
the span doubles, up to the batch size, and halves again once the copier is
ahead. With no host I/O it runs at full speed.
"""
from __future__ import annotations

import math
import time

# Before any copy was timed: a round trip typical of a local disk.
DEFAULT_RTT_S = 0.0005
# The window never drops below 2 ms (the event loop sleeps in whole
# milliseconds, so a host pausing "0.1 ms" between commands pauses ~1 ms)
# nor grows past 100 ms (one slow copy must not park the copier).
MIN_WINDOW_S = 0.002
MAX_WINDOW_S = 0.1
# An idle stretch must last this long to count as a rate measurement.
IDLE_SAMPLE_S = 0.05
# Busy pacing saves up at most this much credit (a copy's own time is not
# lost from the floor, but no burst hits a host).
CREDIT_S = 0.01
EWMA = 0.25


class HostYield:
    def __init__(self) -> None:
        self.rtt: float | None = None          # seconds per copy, one stream
        self.stream_rate: float | None = None  # bytes/s of one copy stream
        self.idle_rate: float | None = None    # bytes/s with no host I/O
        self._idle_since: float | None = None
        self._idle_last = 0.0                    # when the stretch's last copy ended
        self._idle_bytes = 0
        self._due = 0.0                          # next busy copy may start then
        self.busy_rtt: float | None = None       # seconds per copy while busy
        self._was_busy = False

    def window(self, host_window: int) -> float:
        rtt = self.rtt if self.rtt is not None else DEFAULT_RTT_S
        return min(MAX_WINDOW_S, max(MIN_WINDOW_S, host_window * rtt))

    def busy(self, now: float, last_host_io: float, host_window: int) -> bool:
        """A host command was seen within the window (``host_window`` 0:
        never busy, the copier ignores hosts). Ends an idle stretch."""
        busy = host_window > 0 and now - last_host_io < self.window(host_window)
        if busy and not self._was_busy:
            self._due = now                      # pacing starts afresh: no burst
        self._was_busy = busy
        if busy:
            self._end_idle(now)
        elif self._idle_since is None:
            self._idle_since = now
            self._idle_bytes = 0
        return busy

    def note_copy(self, nbytes: int, seconds: float, busy: bool, now: float | None = None) -> None:
        """A copy of ``nbytes`` took ``seconds`` (read and write), ending ``now``."""
        if seconds > 0 and busy:
            self.busy_rtt = seconds if self.busy_rtt is None else \
                self.busy_rtt + EWMA * (seconds - self.busy_rtt)
        if seconds > 0:
            self.rtt = seconds if self.rtt is None else self.rtt + EWMA * (seconds - self.rtt)
            r = nbytes / seconds
            self.stream_rate = r if self.stream_rate is None else \
                self.stream_rate + EWMA * (r - self.stream_rate)
        if not busy and self._idle_since is not None:
            self._idle_bytes += nbytes
            self._idle_last = time.monotonic() if now is None else now

    def _end_idle(self, now: float) -> None:
        if self._idle_since is None:
            return
        # up to its last copy: the time between jobs is no copying time
        span = self._idle_last - self._idle_since
        if span >= IDLE_SAMPLE_S and self._idle_bytes:
            r = self._idle_bytes / span
            self.idle_rate = r if self.idle_rate is None else self.idle_rate + EWMA * (r - self.idle_rate)
        self._idle_since = None

    def floor_rate(self, min_progress_pct: int) -> float:
        """Bytes/s the copier keeps up while hosts are busy."""
        base = self.idle_rate or self.stream_rate
        if base is None:
            return 0.0          # nothing timed yet: the first copy goes now
        return base * min_progress_pct / 100

    def busy_span(self, extent_size: int, min_progress_pct: int, max_span: int) -> int:
        """Extents per busy copy: one, unless one at a time per measured busy
        round trip cannot reach the floor."""
        rate = self.floor_rate(min_progress_pct)
        if self.busy_rtt is None or rate <= 0:
            return 1
        # twice what the last round trips say: a bigger copy takes longer,
        # and the pacing keeps the average at the floor anyway
        need = 2 * rate * self.busy_rtt / extent_size
        return max(1, min(max_span, math.ceil(need)))

    def busy_delay(self, now: float, nbytes: int, min_progress_pct: int) -> float:
        """Seconds to wait before the next busy copy, ``nbytes`` having just
        been started: paces busy copies to the floor rate."""
        rate = self.floor_rate(min_progress_pct)
        if rate <= 0:
            return 0.0
        self._due = max(self._due, now - CREDIT_S) + nbytes / rate
        return max(0.0, self._due - now)
