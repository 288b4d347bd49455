"""Who may hold a connection, and how fast a client may fail to log in.

Without these a single host can lock every other one out: open the global
connection cap's worth of idle sockets, or guess CHAP secrets thousands of
times a second. Both are bounded per *source* (the peer's IP address; an
IPv6 peer is counted by its /64, which one host usually owns whole):

* ``SourceLimits``: connections per source, and more strictly those not yet
  in full feature phase (an idle unauthenticated socket costs us and proves
  nothing).
* ``LoginThrottle``: a failed login (bad CHAP, not in the ACL, no such
  target) is answered only after a delay that doubles with each recent
  failure of the same initiator name or source, up to ``max_delay``. The
  delays of one key are serialised, so parallel guesses from many sockets
  wait in line instead of sharing one delay.
"""
from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from . import pdu as P

# statuses that answer a guess (of a secret, an ACL entry, a target name)
THROTTLED_STATUSES = frozenset({P.LOGIN_AUTH_FAILED, P.LOGIN_AUTHORIZATION_FAILED,
                                P.LOGIN_NOT_FOUND})


def source_of(host: str) -> str:
    """The address a per-source limit counts ``host`` (an IP literal) under."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def source_of_peer(peer: str) -> str:
    """``source_of`` for a "host:port" peer string (IPv6 hosts unbracketed)."""
    return source_of(peer.rsplit(":", 1)[0] if ":" in peer else peer)


class SourceLimits:
    """Open connections per source; those still logging in are capped lower."""

    def __init__(self, per_source: int, logins_per_source: int) -> None:
        self.per_source = per_source
        self.logins_per_source = logins_per_source
        self.open: dict[str, int] = {}
        self.logging_in: dict[str, int] = {}

    def admit(self, source: str) -> str | None:
        """Count a new (not yet logged in) connection; a reason if refused."""
        if self.open.get(source, 0) >= self.per_source:
            return f"{self.per_source} connections open from {source}"
        if self.logging_in.get(source, 0) >= self.logins_per_source:
            return f"{self.logins_per_source} connections from {source} still logging in"
        _inc(self.open, source)
        _inc(self.logging_in, source)
        return None

    def logged_in(self, source: str) -> None:
        _dec(self.logging_in, source)

    def release(self, source: str, still_logging_in: bool) -> None:
        _dec(self.open, source)
        if still_logging_in:
            _dec(self.logging_in, source)


def _inc(d: dict[str, int], k: str) -> None:
    d[k] = d.get(k, 0) + 1


def _dec(d: dict[str, int], k: str) -> None:
    n = d.get(k, 0) - 1
    if n > 0:
        d[k] = n
    else:
        d.pop(k, None)


@dataclass
class _Failures:
    count: int
    last: float
    release_at: float


class LoginThrottle:
    """Delays for failed logins, keyed by initiator name and by source.

    A key's failure count decays: after ``forget`` quiet seconds it starts
    over. The table keeps at most ``capacity`` keys (least recently failed
    dropped first), so a flood of invented names costs bounded memory.
    """

    def __init__(self, base_delay: float = 0.25, max_delay: float = 8.0, forget: float = 300.0,
                 capacity: int = 16384, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget = forget
        self.capacity = capacity
        self.clock = clock
        self._keys: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def failed(self, initiator: str | None, source: str) -> float:
        """Record one failure; seconds to wait before answering it."""
        now = self.clock()
        keys = [("source", source)] + ([("initiator", initiator)] if initiator else [])
        return max(self._failed(k, now) for k in keys)

    def succeeded(self, initiator: str | None, source: str) -> None:
        self._keys.pop(("source", source), None)
        if initiator:
            self._keys.pop(("initiator", initiator), None)

    def _failed(self, key: tuple[str, str], now: float) -> float:
        f = self._keys.pop(key, None)
        if f is None or now - f.last > self.forget:
            f = _Failures(0, now, now)
        f.count += 1
        f.last = now
        step = min(self.max_delay, self.base_delay * 2 ** min(f.count - 1, 32))
        # wait behind this key's earlier failures, but never longer than max_delay
        wait = min(self.max_delay, max(0.0, f.release_at - now) + step)
        f.release_at = now + wait
        self._keys[key] = f
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return wait
