"""Command numbering (RFC 7143 4.2.2.1): serial-number arithmetic and the
ExpCmdSN/MaxCmdSN window that orders non-immediate commands.

Commands may arrive out of CmdSN order (several connections, or a
misbehaving initiator); they are released strictly in CmdSN order. The
window closes as commands are delivered and reopens as they complete, so
``queue_depth`` bounds the commands a session has in flight. MaxCmdSN never
moves backwards (initiators ignore a smaller value anyway).
"""
from __future__ import annotations

from typing import Any

MOD = 1 << 32
HALF = 1 << 31


def sn_add(a: int, n: int) -> int:
    return (a + n) % MOD


def sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number a < b (32 bit)."""
    return a != b and ((b - a) % MOD) < HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def sn_diff(a: int, b: int) -> int:
    """b - a as a small signed distance."""
    d = (b - a) % MOD
    return d - MOD if d >= HALF else d


class CmdWindow:
    OK = "ok"
    DUPLICATE = "duplicate"
    OUTSIDE = "outside"

    def __init__(self, initial_cmdsn: int, queue_depth: int = 128) -> None:
        if queue_depth < 1:
            raise ValueError("queue_depth must be >= 1")
        self.depth = queue_depth
        self.exp_cmdsn = initial_cmdsn % MOD
        self.inflight = 0                     # delivered, not completed
        self._pending: dict[int, Any] = {}    # received ahead of ExpCmdSN
        self._max = sn_add(self.exp_cmdsn, queue_depth - 1)

    @property
    def max_cmdsn(self) -> int:
        cand = (self.exp_cmdsn + self.depth - 1 - self.inflight) % MOD
        ahead = (cand - self._max) % MOD
        if ahead and ahead < HALF:            # sn_lt(self._max, cand), inline: read per command
            self._max = cand
        return self._max

    def classify(self, cmdsn: int) -> str:
        # serial arithmetic inline (called per command): ``back`` > 0 and
        # < HALF means cmdsn < ExpCmdSN; held-back commands are all ahead
        back = (self.exp_cmdsn - cmdsn) % MOD
        if back and back < HALF:
            return self.DUPLICATE if back <= self.depth * 4 else self.OUTSIDE
        if cmdsn in self._pending:
            return self.DUPLICATE
        if (self.max_cmdsn - cmdsn) % MOD < HALF:    # sn_le(cmdsn, MaxCmdSN)
            return self.OK
        return self.OUTSIDE

    def in_window(self, cmdsn: int) -> bool:
        return sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)

    def received(self, cmdsn: int) -> bool:
        return cmdsn in self._pending

    def submit(self, cmdsn: int, item: Any) -> tuple[str, list[Any]]:
        """Accept a non-immediate command; returns (verdict, items now
        deliverable in CmdSN order). Each delivered item counts as in flight
        until ``complete()``."""
        verdict = self.classify(cmdsn)
        if verdict != self.OK:
            return verdict, []
        return verdict, list(self.accept(cmdsn, item))

    def take_next(self, cmdsn: int) -> bool:
        """``classify`` and ``accept`` at once for the common case: ``cmdsn``
        is ExpCmdSN, nothing is held back and the window is open; then it
        is in flight (True). Else nothing changed (False)."""
        # (fewer than depth in flight: MaxCmdSN >= ExpCmdSN without computing it)
        if cmdsn != self.exp_cmdsn or self._pending or (
                self.inflight >= self.depth and (self.max_cmdsn - cmdsn) % MOD >= HALF):
            return False
        self.exp_cmdsn = (cmdsn + 1) % MOD
        self.inflight += 1
        return True

    def accept(self, cmdsn: int, item: Any) -> list[Any] | tuple[Any]:
        """``submit`` for a command ``classify`` found OK: the items now
        deliverable, in CmdSN order."""
        if cmdsn == self.exp_cmdsn and not self._pending:
            # the common case: the next command, nothing held back
            self.exp_cmdsn = (cmdsn + 1) % MOD
            self.inflight += 1
            return (item,)
        self._pending[cmdsn] = item
        out = []
        while self.exp_cmdsn in self._pending:
            out.append(self._pending.pop(self.exp_cmdsn))
            self.exp_cmdsn = sn_add(self.exp_cmdsn, 1)
            self.inflight += 1
        return out

    def complete(self, n: int = 1) -> None:
        self.inflight -= n
        if self.inflight < 0:
            self.inflight = 0

    def pending_count(self) -> int:
        return len(self._pending)

    def drop_pending(self) -> list[Any]:
        items = list(self._pending.values())
        self._pending.clear()
        return items
