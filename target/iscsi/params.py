"""Text keys (RFC 7143 section 6 and 13): key=value encoding and the
target side of login/operational negotiation.

Responses follow the result functions of RFC 7143 13: for Boolean keys the
answer is the OR/AND of both values, for numerical keys the min/max, for
list keys the first initiator value the target accepts; declarative keys
get no answer, unknown keys get ``NotUnderstood``, bad values ``Reject``.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_KEY_LEN = 63
MAX_VALUE_LEN = 8192

NOT_UNDERSTOOD = "NotUnderstood"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"
RESPONSE_VALUES = frozenset({NOT_UNDERSTOOD, REJECT, IRRELEVANT})


class TextError(ValueError):
    """Malformed key=value text."""


def parse_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Split a text data segment into (key, value) pairs, in order."""
    raw = bytes(data)
    if not raw:
        return []
    items = raw.split(b"\0")
    if items and items[-1] == b"":
        items.pop()
    pairs = []
    for item in items:
        if not item:
            continue        # tolerate stray NULs (some initiators pad)
        key, sep, value = item.partition(b"=")
        if not sep:
            raise TextError(f"no '=' in text item {item[:40]!r}")
        if not key or len(key) > MAX_KEY_LEN:
            raise TextError("bad key length")
        if len(value) > MAX_VALUE_LEN:
            raise TextError("value too long")
        try:
            k = key.decode("ascii")
            v = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextError(f"bad text encoding: {e}") from None
        if not all(c.isalnum() or c in ".-+@_#" for c in k):
            raise TextError(f"bad key {k!r}")
        pairs.append((k, v))
    return pairs


def encode_text(pairs) -> bytes:
    if isinstance(pairs, dict):
        pairs = pairs.items()
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def _bool(v: str) -> bool:
    if v == "Yes":
        return True
    if v == "No":
        return False
    raise ValueError(v)


def _yn(b: bool) -> str:
    return "Yes" if b else "No"


def _num(v: str) -> int:
    # RFC 7143 5.1: decimal, or 0x hex
    if v.startswith(("0x", "0X")):
        return int(v[2:], 16)
    if not v.isdigit() or len(v) > 20:
        raise ValueError(v)
    return int(v)


@dataclass
class TargetPreferences:
    """What the target offers; answers are clamped by these."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False
    max_outstanding_r2t: int = 16
    header_digests: tuple[str, ...] = ("CRC32C", "None")   # acceptable, any order
    data_digests: tuple[str, ...] = ("CRC32C", "None")
    default_time2wait: int = 2
    default_time2retain: int = 0        # ERL 0: nothing to retain


@dataclass
class SessionParams:
    """Operational parameters in force in full feature phase (RFC defaults
    for whatever was not negotiated)."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    # declaratives: what each side may receive in one PDU
    initiator_mrdsl: int = 8192      # we must not send more than this per PDU
    target_mrdsl: int = 8192         # the initiator must not send us more
    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str = ""
    target_name: str = ""


# key -> (kind, lo, hi)
_NUMERIC = {
    "MaxConnections": ("min", 1, 65535),
    "MaxBurstLength": ("min", 512, (1 << 24) - 1),
    "FirstBurstLength": ("min", 512, (1 << 24) - 1),
    "DefaultTime2Wait": ("max", 0, 3600),
    "DefaultTime2Retain": ("min", 0, 3600),
    "MaxOutstandingR2T": ("min", 1, 65535),
    "ErrorRecoveryLevel": ("min", 0, 2),
    "iSCSIProtocolLevel": ("min", 0, 31),
}
_BOOLEAN = {
    "InitialR2T": "or",
    "ImmediateData": "and",
    "DataPDUInOrder": "or",
    "DataSequenceInOrder": "or",
    "IFMarker": "and",
    "OFMarker": "and",
}
_DECLARATIVE_FROM_INITIATOR = frozenset({"InitiatorName", "InitiatorAlias", "SessionType",
                                         "TargetName", "MaxRecvDataSegmentLength"})
_TARGET_ONLY = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})
_SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
_FFP_ONLY = frozenset({"SendTargets"})


class Negotiator:
    """Target side of operational key negotiation for one login.

    ``offer(pairs)`` takes the initiator's keys (one login request's worth,
    already joined across C-bit continuations) and returns the response
    pairs; ``params`` accumulates the result. ``errors`` collects keys the
    initiator got wrong in ways that must fail the login.
    """

    def __init__(self, prefs: TargetPreferences | None = None) -> None:
        self.prefs = prefs or TargetPreferences()
        self.params = SessionParams()
        self.params.target_mrdsl = self.prefs.max_recv_data_segment_length
        self.seen: set[str] = set()
        self.declared_mrdsl = False
        self.errors: list[str] = []

    def ours(self, key: str):
        p = self.prefs
        return {
            "MaxConnections": 1,
            "MaxBurstLength": p.max_burst_length,
            "FirstBurstLength": p.first_burst_length,
            "DefaultTime2Wait": p.default_time2wait,
            "DefaultTime2Retain": p.default_time2retain,
            "MaxOutstandingR2T": p.max_outstanding_r2t,
            "ErrorRecoveryLevel": 0,
            "iSCSIProtocolLevel": 1,
            "InitialR2T": p.initial_r2t,
            "ImmediateData": p.immediate_data,
            "DataPDUInOrder": True,        # we only do in-order data
            "DataSequenceInOrder": True,
            "IFMarker": False,
            "OFMarker": False,
        }[key]

    def negotiate_key(self, key: str, value: str) -> str | None:
        """Answer for one key (None: no answer needed)."""
        if value in RESPONSE_VALUES:
            return None                      # an answer to something we proposed
        if key in _NUMERIC:
            kind, lo, hi = _NUMERIC[key]
            try:
                v = _num(value)
            except ValueError:
                return REJECT
            if not lo <= v <= hi:
                return REJECT
            mine = self.ours(key)
            res = min(v, mine) if kind == "min" else max(v, mine)
            if key == "FirstBurstLength":
                res = min(res, self.params.max_burst_length if "MaxBurstLength" in self.seen
                          else self.prefs.max_burst_length)
            self._store(key, res)
            return str(res)
        if key in _BOOLEAN:
            try:
                v = _bool(value)
            except ValueError:
                return REJECT
            mine = self.ours(key)
            res = (v or mine) if _BOOLEAN[key] == "or" else (v and mine)
            self._store(key, res)
            return _yn(res)
        if key in ("HeaderDigest", "DataDigest"):
            acceptable = self.prefs.header_digests if key == "HeaderDigest" else self.prefs.data_digests
            for choice in value.split(","):
                if choice in acceptable:
                    self._store(key, choice == "CRC32C")
                    return choice
            return REJECT
        if key in ("IFMarkInt", "OFMarkInt"):
            return IRRELEVANT
        if key == "TaskReporting":
            return "RFC3720"
        if key == "MaxRecvDataSegmentLength":
            try:
                v = _num(value)
            except ValueError:
                return REJECT
            if not 512 <= v <= (1 << 24) - 1:
                return REJECT
            self.params.initiator_mrdsl = v
            self.declared_mrdsl = True
            return str(self.prefs.max_recv_data_segment_length)    # our declaration
        if key == "InitiatorName":
            self.params.initiator_name = value
            return None
        if key == "InitiatorAlias":
            self.params.initiator_alias = value
            return None
        if key == "TargetName":
            self.params.target_name = value
            return None
        if key == "SessionType":
            if value not in ("Normal", "Discovery"):
                return REJECT
            self.params.session_type = value
            return None
        if key in _TARGET_ONLY or key in _FFP_ONLY:
            return REJECT
        return NOT_UNDERSTOOD

    def _store(self, key: str, v) -> None:
        p = self.params
        attr = {
            "MaxConnections": "max_connections", "MaxBurstLength": "max_burst_length",
            "FirstBurstLength": "first_burst_length", "DefaultTime2Wait": "default_time2wait",
            "DefaultTime2Retain": "default_time2retain", "MaxOutstandingR2T": "max_outstanding_r2t",
            "ErrorRecoveryLevel": "error_recovery_level", "InitialR2T": "initial_r2t",
            "ImmediateData": "immediate_data", "DataPDUInOrder": "data_pdu_in_order",
            "DataSequenceInOrder": "data_sequence_in_order", "HeaderDigest": "header_digest",
            "DataDigest": "data_digest",
        }.get(key)
        if attr:
            setattr(p, attr, v)

    def offer(self, pairs: list[tuple[str, str]], *, skip_security: bool = True) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for key, value in pairs:
            if skip_security and key in _SECURITY_KEYS:
                continue
            if key in self.seen and key not in _DECLARATIVE_FROM_INITIATOR:
                # RFC 7143 6.1: a key may be negotiated only once
                self.errors.append(f"{key} offered twice")
                continue
            self.seen.add(key)
            ans = self.negotiate_key(key, value)
            if ans is not None:
                out.append((key, ans))
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Declarations still owed when login ends; fix up dependent values."""
        out = []
        if not self.declared_mrdsl:
            self.declared_mrdsl = True
            out.append(("MaxRecvDataSegmentLength", str(self.prefs.max_recv_data_segment_length)))
        p = self.params
        if p.first_burst_length > p.max_burst_length:
            p.first_burst_length = p.max_burst_length
        return out
