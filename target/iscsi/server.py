"""The embedded iSCSI target: portals, targets (each a ScsiTarget behind a
target portal group tag), sessions, discovery, runtime reconfiguration and
statistics.

    server = IscsiServer([IscsiTargetConfig("iqn.2025-01.org.example:disk", lunset)],
                         [("127.0.0.1", 3260), ("::1", 3260)])
    await server.start()
    ...
    await server.stop()
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..logsafe import NAME_CLIP, RateLimitedLog, clip
from .admission import LoginThrottle, SourceLimits, source_of
from .budget import DEFAULT_MEMORY_LIMIT, MemoryBudget
from .buffers import POOL_SHARE, WriteBuffers
from .chap import ChallengeRegistry
from .connection import IscsiConnection
from .login import LoginMachine
from .names import valid_iscsi_name
from .params import TargetPreferences, encode_text
from .session import Session

# login counters' keys besides target names: no client text becomes a key
DISCOVERY = "(discovery)"
UNKNOWN = "(unknown target)"

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)

@dataclass
class IscsiTargetConfig:
    """One iSCSI target node.

    ``scsi_target`` is the ScsiTarget (target.scsi.api) serving its LUNs;
    ``acl`` the initiator IQNs allowed to see and log in (None: everyone);
    ``chap`` (user, secret) the initiator must authenticate with;
    ``mutual_chap`` (user, secret) the target answers with when asked.
    """

    iqn: str
    scsi_target: Any
    tpgt: int = 1
    acl: set[str] | frozenset[str] | None = None
    chap: tuple[str, str] | None = None
    mutual_chap: tuple[str, str] | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        if not valid_iscsi_name(self.iqn):
            raise ValueError(f"not an iSCSI name: {self.iqn!r}")
        if not 1 <= self.tpgt <= 0xFFFF:
            raise ValueError("tpgt must be 1..65535")
        if self.mutual_chap is not None and self.chap is None:
            raise ValueError("mutual CHAP needs CHAP")
        if self.chap and self.mutual_chap and self.chap[1] == self.mutual_chap[1]:
            raise ValueError("mutual CHAP secret must differ from the initiator's (RFC 7143 12.1.3)")
        if self.acl is not None:
            self.acl = set(self.acl)


def _fmt_addr(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host.split("%")[0]).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


class IscsiServer:
    def __init__(self, targets: Iterable[IscsiTargetConfig] = (),
                 portals: Iterable[tuple[str, int]] = (("127.0.0.1", 3260),), *,
                 queue_depth: int = 128,
                 prefs: TargetPreferences | None = None,
                 discovery_chap: tuple[str, str] | None = None,
                 discovery_mutual_chap: tuple[str, str] | None = None,
                 nop_interval: float = 15.0,
                 nop_timeout: float = 15.0,
                 login_timeout: float = 15.0,
                 max_cmd_data: int = 64 * 1024 * 1024,
                 max_sessions: int = 1024,
                 max_connections: int = 2048,
                 max_connections_per_source: int = 256,
                 max_logins_per_source: int = 64,
                 login_throttle: LoginThrottle | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 output_timeout: float = 60.0) -> None:
        self.targets: dict[str, IscsiTargetConfig] = {}
        for t in targets:
            self.add_target(t)
        self.portals = [(h, int(p)) for h, p in portals]
        self.queue_depth = queue_depth
        self.prefs = prefs or TargetPreferences()
        self.discovery_chap = discovery_chap
        self.discovery_mutual_chap = discovery_mutual_chap
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.memory = MemoryBudget(memory_limit)
        self.max_cmd_data = min(max_cmd_data, self.memory.max_command_data)
        # idle command data buffers kept for reuse: out of the three quarters
        # of the memory limit that the data budget leaves to the rest
        self.buffers = WriteBuffers(memory_limit // POOL_SHARE)
        self.output_timeout = output_timeout     # drop a peer that has not read our output for this long
        self.max_sessions = max_sessions
        self.max_connections = max_connections
        self.source_limits = SourceLimits(max_connections_per_source, max_logins_per_source)
        self.login_throttle = login_throttle or LoginThrottle()
        self._sources: dict[IscsiConnection, str] = {}
        self._logging_in: set[IscsiConnection] = set()
        self.chap_registry = ChallengeRegistry()
        self._servers: list[asyncio.base_events.Server] = []
        self.addresses: list[tuple[str, int]] = []
        self.connections: set[IscsiConnection] = set()
        self.sessions: dict[int, Session] = {}
        self._by_key: dict[tuple, Session] = {}
        self._next_tsih = 1
        self.total_logins = 0
        # per target: logins that reached full feature phase / were rejected
        # (keys: configured targets, DISCOVERY, UNKNOWN: never client text)
        self.logins_ok: dict[str, int] = {}
        self.logins_failed: dict[str, int] = {}
        self.on_login_rejected: Callable[[str | None, str | None, str, str], None] | None = None
        self.started = False

    # -- configuration -----------------------------------------------------------
    def add_target(self, cfg: IscsiTargetConfig) -> None:
        if cfg.iqn in self.targets:
            raise ValueError(f"target {cfg.iqn} exists")
        self.targets[cfg.iqn] = cfg

    def remove_target(self, iqn: str) -> None:
        """Remove a target; its sessions are dropped."""
        cfg = self.targets.pop(iqn)
        for s in self.sessions_of(cfg):
            s.conn.abort("target removed")

    def set_scsi_target(self, iqn: str, scsi_target: Any) -> None:
        """Swap the LUN set behind a target (new commands go to the new one)."""
        self.targets[iqn].scsi_target = scsi_target
        for s in self.sessions_of(self.targets[iqn]):
            if s.lane is not None:
                s.lane.check()        # no lane answers from the old set

    def set_acl(self, iqn: str, acl: set[str] | None) -> None:
        cfg = self.targets[iqn]
        cfg.acl = set(acl) if acl is not None else None
        for s in self.sessions_of(cfg):
            if not self.initiator_allowed(cfg, s.initiator_name):
                s.conn.abort("removed from ACL")

    # -- LoginContext ------------------------------------------------------------
    def lookup_target(self, name: str) -> IscsiTargetConfig | None:
        return self.targets.get(name)

    @staticmethod
    def initiator_allowed(target: IscsiTargetConfig, initiator: str) -> bool:
        return target.acl is None or initiator in target.acl

    def allocate_tsih(self) -> int:
        for _ in range(0x10000):
            t = self._next_tsih
            self._next_tsih = t + 1 if t < 0xFFFF else 1
            if t not in self.sessions:
                return t
        raise RuntimeError("no free TSIH")

    def tsih_exists(self, tsih: int) -> bool:
        return tsih in self.sessions

    def session_capacity_left(self) -> bool:
        return len(self.sessions) < self.max_sessions

    def login_failed(self, initiator: str | None, source: str) -> float:
        return self.login_throttle.failed(initiator, source)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.portals:
                srv = await loop.create_server(lambda: IscsiConnection(self), host or None, port,
                                               reuse_address=True, backlog=128)
                self._servers.append(srv)
                for sock in srv.sockets:
                    addr = sock.getsockname()
                    self.addresses.append((addr[0], addr[1]))
        except BaseException:
            for srv in self._servers:
                srv.close()
            self._servers.clear()
            self.addresses.clear()
            raise
        self.started = True
        log.info("iSCSI target listening on %s", ", ".join(_fmt_addr(h, p) for h, p in self.addresses))

    async def add_portal(self, host: str, port: int) -> list[tuple[str, int]]:
        """Start listening on one more portal; returns the bound addresses."""
        srv = await asyncio.get_running_loop().create_server(
            lambda: IscsiConnection(self), host or None, port, reuse_address=True, backlog=128)
        self._servers.append(srv)
        self.portals.append((host, port))
        bound = [(s.getsockname()[0], s.getsockname()[1]) for s in srv.sockets]
        self.addresses += bound
        return bound

    async def remove_portal(self, host: str, port: int) -> None:
        """Stop listening on a bound address (existing connections stay)."""
        for srv in list(self._servers):
            names = [(s.getsockname()[0], s.getsockname()[1]) for s in srv.sockets]
            if (host, port) in names:
                srv.close()
                self._servers.remove(srv)
                self.addresses = [a for a in self.addresses if a not in names]

    async def stop(self, timeout: float = 10.0, *, logout_grace: float = 0.0) -> None:
        """Stop listening, let in-flight commands finish (bounded), close everything.

        With ``logout_grace`` > 0 the initiators are first asked (Async
        Message) to log out, and given that long to do so.
        """
        for srv in self._servers:
            srv.close()
        if logout_grace > 0 and self.sessions:
            for s in list(self.sessions.values()):
                s.request_logout(max(1, int(logout_grace)))
            deadline = asyncio.get_running_loop().time() + logout_grace
            while self.sessions and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        sessions = list(self.sessions.values())
        if sessions:
            await asyncio.gather(*(s.drain(timeout) for s in sessions), return_exceptions=True)
        conns = list(self.connections)
        for c in conns:
            c.close("server stop")
        if conns:
            waits = [asyncio.ensure_future(c.closed_event.wait()) for c in conns]
            done, pending = await asyncio.wait(waits, timeout=max(1.0, timeout / 2))
            for p in pending:
                p.cancel()
            for c in conns:
                if not c.closed_event.is_set():
                    c.abort("server stop")
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        self._servers.clear()
        self.addresses.clear()
        self.started = False

    # -- connection/session bookkeeping --------------------------------------------
    def _connection_made(self, conn: IscsiConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            ratelog.warning("refused", "refusing connection from %s: %d connections open",
                            conn.peer, len(self.connections))
            return False
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        source = source_of(peer[0]) if peer else conn.peer
        why = self.source_limits.admit(source)
        if why is not None:
            ratelog.warning("refused", "refusing connection from %s: %s", conn.peer, why)
            return False
        self._sources[conn] = source
        self._logging_in.add(conn)
        self.connections.add(conn)
        return True

    def _logged_in(self, conn: IscsiConnection, initiator: str) -> None:
        """``conn`` reached full feature phase: it no longer counts as logging in."""
        source = self._sources.get(conn)
        if conn in self._logging_in and source is not None:
            self._logging_in.discard(conn)
            self.source_limits.logged_in(source)
            self.login_throttle.succeeded(initiator, source)

    def _connection_lost(self, conn: IscsiConnection) -> None:
        self.connections.discard(conn)
        source = self._sources.pop(conn, None)
        if source is not None:
            self.source_limits.release(source, conn in self._logging_in)
        self._logging_in.discard(conn)

    def _create_session(self, conn: IscsiConnection, result) -> Session:
        if result.target is not None and result.target.iqn not in self.targets:
            raise RuntimeError("target removed during login")
        s = Session(self, conn, result)
        self._logged_in(conn, s.initiator_name)
        if not s.discovery:
            old = self._by_key.get(s.key)
            if old is not None:
                log.info("session reinstatement for %s: closing TSIH %d",
                         clip(s.nexus.initiator, NAME_CLIP), old.tsih)
                old.conn.abort("session reinstatement")
                old.close()
            self._by_key[s.key] = s
        self.sessions[s.tsih] = s
        self.total_logins += 1
        key = s.target.iqn if s.target else DISCOVERY
        self.logins_ok[key] = self.logins_ok.get(key, 0) + 1
        log.info("session %d: %s logged in to %s (%s)", s.tsih, clip(s.nexus.initiator, NAME_CLIP),
                 s.target.iqn if s.target else "discovery", conn.peer)
        return s

    def login_rejected(self, login: LoginMachine, reason: str) -> None:
        """A login failed: count it and tell the listener (target.events)."""
        leading = login.leading
        name = leading.get("TargetName")
        if leading.get("SessionType") == "Discovery":
            key = DISCOVERY
        else:
            key = name if name in self.targets else UNKNOWN
        self.logins_failed[key] = self.logins_failed.get(key, 0) + 1
        if self.on_login_rejected is not None:
            self.on_login_rejected(name, leading.get("InitiatorName"), login.peer, reason)

    def _session_closed(self, s: Session) -> None:
        if self.sessions.get(s.tsih) is s:
            del self.sessions[s.tsih]
        if self._by_key.get(s.key) is s:
            del self._by_key[s.key]

    def sessions_of(self, target: IscsiTargetConfig | None) -> list[Session]:
        if target is None:
            return []
        return [s for s in self.sessions.values() if s.target is target]

    # -- discovery -------------------------------------------------------------------
    def sendtargets_text(self, value: str, session: Session) -> bytes:
        initiator = session.initiator_name
        if session.discovery:
            if value == "All":
                names = list(self.targets)
            elif value == "":
                names = []
            else:
                names = [value]
        else:
            # a Normal session only ever reports its own target
            own = session.target.iqn
            names = [own] if value in ("", "All", own) else []
        pairs: list[tuple[str, str]] = []
        for name in names:
            cfg = self.targets.get(name)
            if cfg is None or not self.initiator_allowed(cfg, initiator):
                continue
            pairs.append(("TargetName", cfg.iqn))
            for host, port in self._portal_addresses(session):
                pairs.append(("TargetAddress", f"{_fmt_addr(host, port)},{cfg.tpgt}"))
        return encode_text(pairs)

    def _portal_addresses(self, session: Session) -> list[tuple[str, int]]:
        out = []
        local = session.conn.local
        for host, port in self.addresses:
            if host in ("0.0.0.0", "::", ""):
                if not local:
                    continue
                host = local[0]
            if (host, port) not in out:
                out.append((host, port))
        return out

    # -- stats -------------------------------------------------------------------------
    def stats(self) -> dict:
        per_target: dict[str, dict] = {iqn: {"sessions": 0, "commands": 0} for iqn in self.targets}
        discovery = 0
        for s in self.sessions.values():
            if s.target is None:
                discovery += 1
                continue
            d = per_target.setdefault(s.target.iqn, {"sessions": 0, "commands": 0})
            d["sessions"] += 1
            d["commands"] += s.commands
        return {
            "connections": len(self.connections),
            "connections_logging_in": len(self._logging_in),
            "sessions": len(self.sessions),
            "discovery_sessions": discovery,
            "logins": self.total_logins,
            "in_flight": sum(len(s.tasks) for s in self.sessions.values()),
            "targets": per_target,
            "portals": list(self.addresses),
            "memory": self.memory.stats(),
            "session_list": [{
                "tsih": s.tsih,
                "initiator": s.nexus.initiator,
                "target": s.target.iqn if s.target else None,
                "peer": s.conn.peer,
                "commands": s.commands,
                "in_flight": len(s.tasks),
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "header_digest": s.params.header_digest,
                "data_digest": s.params.data_digest,
            } for s in self.sessions.values()],
        }
