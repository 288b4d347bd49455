"""Memory budgets of the iSCSI target: every byte a command can make the
daemon hold (its write data, its read data until the socket took it, a
fixed cost per command) is charged to its session's budget and to the
server-wide budget before it is allocated.

The global budget is sized from the RSS the operator allows the daemon
(``serve --memory-limit``): command data gets a quarter of it, the rest is
the interpreter, the database, caches, connection buffers and allocator
slack. A session may hold at most ``session_limit``; beyond the global
limit it may still hold its fair share (global limit / sessions), so a
crowd of hostile sessions filling the budget cannot starve a well-behaved
one, and the total stays below twice the global limit.

Requests that may wait (the next R2T of a write, the data of a read) queue
and are granted as memory comes back, the smallest holder first. Requests
that cannot wait (a command's immediate and unsolicited data is already on
its way) are refused, and the caller answers TASK SET FULL or BUSY.

While requests wait for the server-wide budget, a session that holds more
than its fair share and has made no progress for STALL_SECONDS (no data
received for its writes, no answer taken by its peer) is cut off, with one
log line: its memory goes to the sessions that use it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ..logsafe import RateLimitedLog

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)

MiB = 1 << 20
DEFAULT_MEMORY_LIMIT = 512 * MiB      # RSS bound of the daemon (serve --memory-limit)
MIN_MEMORY_LIMIT = 256 * MiB          # keeps max_command_data >= 32 MiB, the SCSI layer's max transfer
DATA_SHARE = 4                        # command data may use 1/DATA_SHARE of the memory limit
MAX_SESSION_LIMIT = 128 * MiB         # half of it is the largest command's data
SMALL_WRITE = 256 * 1024              # write buffers up to this are allocated at once
COMMAND_COST = 2048                   # Task, PDU copies, dict slots: charged per command
STALL_SECONDS = 10.0                  # a holder idle this long is cut off when others wait
RELIEVE_EVERY = 0.5                   # seconds between looks for a stalled holder


class MemoryBudget:
    """The server-wide budget and the queue of requests waiting for it."""

    def __init__(self, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if memory_limit < MIN_MEMORY_LIMIT:
            raise ValueError(f"memory limit must be at least {MIN_MEMORY_LIMIT // MiB} MiB")
        self.memory_limit = memory_limit
        self.limit = memory_limit // DATA_SHARE
        self.session_limit = min(MAX_SESSION_LIMIT, self.limit)
        # one command's data fits twice in a session's budget, so a session
        # whose other commands complete can always take it
        self.max_command_data = self.session_limit // 2
        self.used = 0
        self.sessions: set[SessionBudget] = set()
        self._waiters: list[tuple[SessionBudget, int, Callable[[], None]]] = []
        self.evictions = 0
        self.clock = clock
        self._relieved_at = 0.0

    def session(self, name: str, evict: Callable[[], None] | None = None) -> "SessionBudget":
        sb = SessionBudget(self, name, evict)
        self.sessions.add(sb)
        return sb

    def fair_share(self) -> int:
        return self.limit // max(1, len(self.sessions))

    def _grant_waiters(self) -> None:
        if not self._waiters:
            return
        # the smallest holder first: a session that holds little is not the
        # one keeping memory from the others
        self._waiters.sort(key=lambda w: w[0].used)
        still = []
        granted = []
        for w in self._waiters:
            sb, n, cb = w
            if sb.try_take(n):
                granted.append(cb)
            elif not sb.closed:
                still.append(w)
        self._waiters = still
        for cb in granted:
            cb()

    def relieve(self) -> None:
        """If requests wait for the server-wide budget, cut off the biggest
        holder above its fair share that has made no progress lately.
        Called when a request starts waiting and from every connection's
        keepalive tick (at most every RELIEVE_EVERY seconds does work)."""
        if not self._waiters:
            return
        now = self.clock()
        if now - self._relieved_at < RELIEVE_EVERY:
            return
        self._relieved_at = now
        if not any(sb.used + n <= self.session_limit for sb, n, _ in self._waiters):
            return           # they wait for their own sessions' commands, not for others
        share = self.fair_share()
        stalled = [sb for sb in self.sessions
                   if sb.used > share and sb.evict is not None
                   and now - sb.progress_at >= STALL_SECONDS]
        if not stalled:
            return
        victim = max(stalled, key=lambda sb: sb.used)
        self.evictions += 1
        ratelog.warning("evict", "session %s: holds %d MiB of the iSCSI memory budget (fair share %d MiB) "
                        "without progress for %.0fs while others wait: dropping it",
                        victim.name, victim.used >> 20, share >> 20, now - victim.progress_at)
        victim.evict()
        victim.close()

    def waiting(self) -> bool:
        """Do requests wait for memory (holders should give back what they
        hold idle)?"""
        return bool(self._waiters)

    def stats(self) -> dict[str, int]:
        return {"memory_limit": self.memory_limit, "budget": self.limit, "used": self.used,
                "session_limit": self.session_limit, "waiting": len(self._waiters),
                "evicted": self.evictions}


class SessionBudget:
    """One session's share; every charge also counts against the server's."""

    def __init__(self, server: MemoryBudget, name: str,
                 evict: Callable[[], None] | None = None) -> None:
        self.server = server
        self.name = name
        self.evict = evict          # cuts the session off
        self.used = 0
        self.closed = False
        self.progress_at = server.clock()

    def progress(self) -> None:
        """The session moved: data arrived for a write, or a command ended."""
        self.progress_at = self.server.clock()

    def try_take(self, n: int) -> bool:
        """Charge ``n`` bytes now if they fit (requests that cannot wait)."""
        srv = self.server
        held = self.used + n
        # within the session's limit, and within the server's or the
        # session's fair share of it (asked only when over the server's)
        if self.closed or held > srv.session_limit or (
                srv.used + n > srv.limit and held > srv.fair_share()):
            return False
        self.used = held
        srv.used += n
        return True

    def over_session_limit(self, n: int) -> bool:
        """Would ``n`` more bytes break this session's own limit (rather
        than the server's)? Tells TASK SET FULL from BUSY."""
        return self.used + n > self.server.session_limit

    def take_or_wait(self, n: int, granted: Callable[[], None]) -> bool:
        """Charge ``n`` bytes now (True) or call ``granted`` once they are
        charged (False), possibly before this returns. Nothing is called
        after ``close``."""
        if self.try_take(n):
            return True
        if self.closed:
            return False                   # being cut off: its commands are cancelled
        self.server._waiters.append((self, n, granted))
        self.server.relieve()
        return False

    def give(self, n: int) -> None:
        if n and not self.closed:
            srv = self.server
            self.progress_at = srv.clock()
            self.used -= n             # _give, inline: once per command
            srv.used -= n
            if srv._waiters:
                srv._grant_waiters()

    def close(self) -> None:
        """The session is gone: all it held goes back, its waiters are dropped."""
        if self.closed:
            return
        srv = self.server
        srv._waiters = [w for w in srv._waiters if w[0] is not self]
        srv.sessions.discard(self)
        self.closed = True
        if self.used:
            srv.used -= self.used
            self.used = 0
        srv._grant_waiters()
