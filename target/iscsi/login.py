"""Login phase state machine (RFC 7143 6.3, 11.12, 11.13), target side.

One instance per connection; ``process`` takes each Login Request and
returns the Login Response to send plus the outcome. It knows nothing of
sockets: the connection sends the response and, on success, starts full
feature phase with ``result``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..logsafe import MESSAGE_CLIP, RateLimitedLog, clip
from . import pdu as P
from .admission import THROTTLED_STATUSES, source_of_peer
from .chap import ChapAuthenticator, ChapError, ChallengeRegistry
from .names import printable_token
from .params import Negotiator, SessionParams, TargetPreferences, TextError, encode_text, parse_text

if TYPE_CHECKING:  # pragma: no cover
    from .server import IscsiTargetConfig

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)

MAX_LOGIN_TEXT = 64 * 1024     # across C-bit continuations
# Declared once, in the first Login Request (RFC 7143 13.5, 13.6): a later
# different value would make the session act as someone the ACL never saw.
LEADING_KEYS = ("InitiatorName", "SessionType", "TargetName")


class LoginContext(Protocol):
    prefs: TargetPreferences
    chap_registry: ChallengeRegistry
    queue_depth: int
    discovery_chap: tuple[str, str] | None
    discovery_mutual_chap: tuple[str, str] | None

    def lookup_target(self, name: str) -> "IscsiTargetConfig | None": ...

    def initiator_allowed(self, target: "IscsiTargetConfig", initiator: str) -> bool: ...

    def allocate_tsih(self) -> int: ...

    def tsih_exists(self, tsih: int) -> bool: ...

    def session_capacity_left(self) -> bool: ...

    def login_failed(self, initiator: str | None, source: str) -> float:
        """Record a failed guess; seconds to hold the answer back."""
        ...


class LoginFailed(Exception):
    def __init__(self, status: tuple[int, int], message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LoginResult:
    params: SessionParams
    target: "IscsiTargetConfig | None"      # None for discovery sessions
    isid: bytes
    tsih: int
    cid: int
    initial_cmdsn: int
    statsn: int                              # next StatSN to use in FFP
    discovery: bool


@dataclass
class LoginStep:
    bhs: bytearray
    data: bytes
    outcome: str          # "continue" | "success" | "fail"
    delay: float = 0.0    # seconds to hold a "fail" back (brute-force throttle)
    reason: str = ""      # why a "fail" failed (events, metrics)


class LoginMachine:
    def __init__(self, ctx: LoginContext, peer: str = "?") -> None:
        self.ctx = ctx
        self.peer = peer
        self.neg = Negotiator(ctx.prefs)
        self.first = True
        self.stage: int | None = None
        self.isid = b"\0" * 6
        self.tsih = 0
        self.itt = 0
        self.cid = 0
        self.cmdsn = 0
        self.statsn = 0
        self.text = bytearray()
        self.leading: dict[str, str | None] = {}
        self.target = None
        self.discovery = False
        self.chap_creds: tuple[str, str] | None = None
        self.mutual_creds: tuple[str, str] | None = None
        self.auth_method: str | None = None
        self.auth: ChapAuthenticator | None = None
        self.authenticated = False
        self.sent_tpgt = False
        self.result: LoginResult | None = None

    # -- responses ------------------------------------------------------------
    def _rsp(self, flags: int, data: bytes = b"", status=P.LOGIN_SUCCESS, tsih: int | None = None,
             itt: int | None = None) -> bytearray:
        max_cmdsn = (self.cmdsn + self.ctx.queue_depth - 1) & P.ALL_ONES
        bhs = P.build_bhs(
            P.OP_LOGIN_RSP, flags, b2=0, b3=0, itt=self.itt if itt is None else itt,
            raw={8: self.isid + (self.tsih if tsih is None else tsih).to_bytes(2, "big"),
                 36: bytes(status)},
            fields={24: self.statsn, 28: self.cmdsn, 32: max_cmdsn},
        )
        bhs[5:8] = len(data).to_bytes(3, "big")
        if status == P.LOGIN_SUCCESS:
            self.statsn = (self.statsn + 1) & P.ALL_ONES
        return bhs

    def fail(self, status: tuple[int, int], message: str, itt: int | None = None) -> LoginStep:
        delay = 0.0
        if status in THROTTLED_STATUSES:
            delay = self.ctx.login_failed(self.leading.get("InitiatorName"), source_of_peer(self.peer))
        ratelog.info("login-rejected", "login from %s rejected (%02x/%02x): %s", self.peer,
                     status[0], status[1], clip(message, MESSAGE_CLIP, quote=False))
        return LoginStep(self._rsp(0, status=status, itt=itt), b"", "fail", delay, message)

    # -- processing -------------------------------------------------------------
    def process(self, pdu: P.Pdu) -> LoginStep:
        try:
            return self._process(pdu)
        except LoginFailed as e:
            return self.fail(e.status, str(e))
        except (TextError, ValueError) as e:
            return self.fail(P.LOGIN_INITIATOR_ERROR, f"bad login request: {e}")

    def _process(self, pdu: P.Pdu) -> LoginStep:
        if pdu.opcode != P.OP_LOGIN_REQ:
            self.itt = pdu.itt
            raise LoginFailed(P.LOGIN_INVALID_DURING_LOGIN,
                              f"{P.OPCODE_NAMES.get(pdu.opcode, hex(pdu.opcode))} during login")
        bhs = pdu.bhs
        flags = pdu.flags
        transit = bool(flags & P.FLAG_TRANSIT)
        cont = bool(flags & P.FLAG_CONTINUE)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        isid = bytes(bhs[8:14])
        tsih = pdu.u16(14)
        if self.first:
            self.isid, self.tsih, self.itt = isid, tsih, pdu.itt
            self.cid = pdu.u16(20)
            self.cmdsn = pdu.cmdsn
            self.statsn = pdu.exp_statsn
            if bhs[3] > 0:       # Version-min
                raise LoginFailed(P.LOGIN_UNSUPPORTED_VERSION, f"version-min {bhs[3]}")
        else:
            if isid != self.isid or tsih != self.tsih:
                raise LoginFailed(P.LOGIN_INITIATOR_ERROR, "ISID/TSIH changed during login")
            self.itt = pdu.itt
        if transit and cont:
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR, "T and C both set")
        if csg not in (P.STAGE_SECURITY, P.STAGE_OPERATIONAL):
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR, f"bad CSG {csg}")
        if transit and (nsg == 2 or nsg <= csg):
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR, f"bad NSG {nsg} from CSG {csg}")
        if self.stage is not None and csg != self.stage:
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR, f"CSG {csg} but stage is {self.stage}")
        self.stage = csg

        self.text += pdu.data
        if len(self.text) > MAX_LOGIN_TEXT:
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR, "login text too long")
        if cont:
            # more text follows: acknowledge with an empty response
            return LoginStep(self._rsp((csg << 2)), b"", "continue")
        pairs = parse_text(self.text)
        self.text = bytearray()
        keys = dict(pairs)

        out: list[tuple[str, str]] = []
        if self.first:
            self.first = False
            self.leading = {k: keys.get(k) for k in LEADING_KEYS}
            self._leading(keys)
            if self.target is not None:
                out.append(("TargetPortalGroupTag", str(self.target.tpgt)))
                self.sent_tpgt = True
                if self.target.alias:
                    out.append(("TargetAlias", self.target.alias))
        else:
            for k in LEADING_KEYS:
                if k in keys and keys[k] != self.leading[k]:
                    raise LoginFailed(P.LOGIN_INITIATOR_ERROR, f"{k} changed during login")

        if csg == P.STAGE_SECURITY:
            out += self._security(keys)
        else:
            if self.needs_auth and not self.authenticated:
                raise LoginFailed(P.LOGIN_AUTH_FAILED, "authentication required, initiator skipped it")
        out += self.neg.offer(pairs)
        if self.neg.errors:
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR, "; ".join(self.neg.errors))

        can_transit = transit
        if csg == P.STAGE_SECURITY and transit:
            if self.auth_method is None:
                if self.needs_auth:
                    raise LoginFailed(P.LOGIN_AUTH_FAILED, "no AuthMethod offered")
                self.auth_method = "None"
                self.authenticated = True
            if self.auth_method == "CHAP" and not self.authenticated:
                can_transit = False     # answer T=0 until the exchange ends

        if can_transit:
            self.stage = nsg
            flags_out = P.FLAG_TRANSIT | (csg << 2) | nsg
            if nsg == P.STAGE_FULL_FEATURE:
                out += self.neg.finish()
                p = self.neg.params
                if p.max_connections != 1 or p.error_recovery_level != 0:
                    raise LoginFailed(P.LOGIN_INITIATOR_ERROR, "unsupported MaxConnections/ERL")
                new_tsih = self.ctx.allocate_tsih()
                data = encode_text(out)
                self._check_len(data)
                rsp = self._rsp(flags_out, data, tsih=new_tsih)
                self.result = LoginResult(
                    params=p, target=self.target, isid=self.isid, tsih=new_tsih, cid=self.cid,
                    initial_cmdsn=self.cmdsn, statsn=self.statsn, discovery=self.discovery)
                return LoginStep(rsp, data, "success")
        else:
            flags_out = csg << 2
        data = encode_text(out)
        self._check_len(data)
        return LoginStep(self._rsp(flags_out, data), data, "continue")

    @staticmethod
    def _check_len(data: bytes) -> None:
        if len(data) > 8192:
            raise LoginFailed(P.LOGIN_TARGET_ERROR, "login response text too long")

    @property
    def needs_auth(self) -> bool:
        return self.chap_creds is not None

    def _leading(self, keys: dict[str, str]) -> None:
        initiator = keys.get("InitiatorName")
        if not initiator:
            raise LoginFailed(P.LOGIN_MISSING_PARAMETER, "InitiatorName missing")
        if not printable_token(initiator):
            # It is logged, matched against ACLs and shown in status: one token.
            raise LoginFailed(P.LOGIN_INITIATOR_ERROR,
                              "InitiatorName has spaces or control characters")
        stype = keys.get("SessionType", "Normal")
        if stype == "Discovery":
            self.discovery = True
            self.chap_creds = self.ctx.discovery_chap
            self.mutual_creds = self.ctx.discovery_mutual_chap
        elif stype == "Normal":
            name = keys.get("TargetName")
            if not name:
                raise LoginFailed(P.LOGIN_MISSING_PARAMETER, "TargetName missing")
            target = self.ctx.lookup_target(name)
            if target is None:
                raise LoginFailed(P.LOGIN_NOT_FOUND, f"no target {clip(name)}")
            if not self.ctx.initiator_allowed(target, initiator):
                raise LoginFailed(P.LOGIN_AUTHORIZATION_FAILED, f"{clip(initiator)} not in ACL of {name}")
            self.target = target
            self.chap_creds = target.chap
            self.mutual_creds = target.mutual_chap
        else:
            raise LoginFailed(P.LOGIN_SESSION_TYPE_UNSUPPORTED, f"SessionType {clip(stype)}")
        if not self.ctx.session_capacity_left():
            raise LoginFailed(P.LOGIN_OUT_OF_RESOURCES, "too many sessions")
        if self.tsih != 0:
            # MaxConnections=1: no connection may join an existing session
            raise LoginFailed(P.LOGIN_TOO_MANY_CONNECTIONS if self.ctx.tsih_exists(self.tsih)
                              else P.LOGIN_SESSION_DOES_NOT_EXIST,
                              f"connection for existing session TSIH {self.tsih}")

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if "AuthMethod" in keys and self.auth_method is None:
            offered = [m.strip() for m in keys["AuthMethod"].split(",")]
            if self.needs_auth:
                if "CHAP" not in offered:
                    raise LoginFailed(P.LOGIN_AUTH_FAILED, f"CHAP required, offered {clip(offered)}")
                self.auth_method = "CHAP"
                self.auth = ChapAuthenticator(self.chap_creds, self.mutual_creds, self.ctx.chap_registry)
            elif "None" in offered:
                self.auth_method = "None"
                self.authenticated = True
            else:
                raise LoginFailed(P.LOGIN_AUTH_FAILED, f"no acceptable AuthMethod in {clip(offered)}")
            out.append(("AuthMethod", self.auth_method))
        chap_keys = {k: v for k, v in keys.items() if k.startswith("CHAP_")}
        if chap_keys:
            if self.auth is None or self.authenticated:
                raise LoginFailed(P.LOGIN_INITIATOR_ERROR, "CHAP keys without a CHAP exchange")
            try:
                out += self.auth.step(chap_keys)
            except ChapError as e:
                raise LoginFailed(P.LOGIN_AUTH_FAILED, str(e)) from None
            if self.auth.done:
                self.authenticated = True
        return out
