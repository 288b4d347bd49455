"""CHAP (RFC 1994 with MD5, as used by iSCSI, RFC 7143 12.1.3), target side,
including mutual (bidirectional) authentication.

Response = MD5(identifier byte || secret || challenge). Binary values go on
the wire as ``0x`` hex (``0b`` base64 is accepted too).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict

from ..logsafe import clip

CHAP_MD5 = 5
CHALLENGE_LEN = 16
MIN_CHALLENGE_LEN = 1
MAX_CHALLENGE_LEN = 1024


class ChapError(Exception):
    """Authentication failed (login status 0x0201)."""


def chap_md5(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes((ident & 0xFF,)) + secret + challenge).digest()


def encode_binary(b: bytes) -> str:
    return "0x" + b.hex()


def decode_binary(s: str) -> bytes:
    try:
        if s[:2] in ("0x", "0X"):
            h = s[2:]
            if len(h) % 2:
                h = "0" + h
            return bytes.fromhex(h)
        if s[:2] in ("0b", "0B"):
            return base64.b64decode(s[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise ChapError(f"bad binary value {clip(s, 20)}")


def _secret(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else bytes(s)


class ChallengeRegistry:
    """Remembers recent challenges, ours and the initiators', so a challenge
    is never accepted twice (replay) nor reflected back at us."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, c: bytes) -> bool:
        return c in self._seen

    def add(self, c: bytes) -> None:
        self._seen[c] = None
        self._seen.move_to_end(c)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def new_challenge(self, rng=os.urandom) -> bytes:
        for _ in range(16):
            c = rng(CHALLENGE_LEN)
            if c not in self._seen:
                self.add(c)
                return c
        raise ChapError("cannot generate a fresh challenge")


class ChapAuthenticator:
    """Target side CHAP exchange.

    step 1: initiator sends CHAP_A (list) -> we answer CHAP_A=5, CHAP_I, CHAP_C
    step 2: initiator sends CHAP_N, CHAP_R (+ CHAP_I, CHAP_C for mutual)
            -> we verify and, for mutual, answer CHAP_N, CHAP_R.
    """

    def __init__(self, credentials: tuple[str, str], mutual: tuple[str, str] | None = None,
                 registry: ChallengeRegistry | None = None, rng=os.urandom) -> None:
        self.user, secret = credentials
        self.secret = _secret(secret)
        self.mutual = (mutual[0], _secret(mutual[1])) if mutual else None
        self.registry = registry if registry is not None else ChallengeRegistry()
        self.rng = rng
        self.state = "wait_a"
        self.ident = 0
        self.challenge = b""

    @property
    def done(self) -> bool:
        return self.state == "done"

    def step(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if self.state == "wait_a":
            if "CHAP_A" not in keys:
                if any(k.startswith("CHAP_") for k in keys):
                    raise ChapError("CHAP keys out of order")
                return []           # keep waiting (e.g. AuthMethod only)
            algs = keys["CHAP_A"].split(",")
            if str(CHAP_MD5) not in algs:
                raise ChapError(f"no supported CHAP algorithm in {clip(keys['CHAP_A'])}")
            self.ident = self.rng(1)[0]
            self.challenge = self.registry.new_challenge(self.rng)
            self.state = "wait_r"
            return [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", str(self.ident)),
                    ("CHAP_C", encode_binary(self.challenge))]
        if self.state == "wait_r":
            name = keys.get("CHAP_N")
            resp = keys.get("CHAP_R")
            if name is None or resp is None:
                raise ChapError("CHAP_N/CHAP_R missing")
            if name != self.user:
                raise ChapError(f"unknown CHAP user {clip(name)}")
            got = decode_binary(resp)
            want = chap_md5(self.ident, self.secret, self.challenge)
            if not hmac.compare_digest(got, want):
                raise ChapError(f"bad CHAP response for user {clip(name)}")
            out: list[tuple[str, str]] = []
            if "CHAP_I" in keys or "CHAP_C" in keys:
                if self.mutual is None:
                    raise ChapError("initiator asks for mutual CHAP, none configured")
                try:
                    ident = int(keys["CHAP_I"], 0)
                except (KeyError, ValueError):
                    raise ChapError("bad CHAP_I") from None
                if not 0 <= ident <= 255:
                    raise ChapError("bad CHAP_I")
                c = decode_binary(keys.get("CHAP_C", ""))
                if not MIN_CHALLENGE_LEN <= len(c) <= MAX_CHALLENGE_LEN:
                    raise ChapError("bad mutual challenge length")
                if c == self.challenge or c in self.registry:
                    raise ChapError("reused/reflected CHAP challenge")
                self.registry.add(c)
                out = [("CHAP_N", self.mutual[0]),
                       ("CHAP_R", encode_binary(chap_md5(ident, self.mutual[1], c)))]
            self.state = "done"
            return out
        raise ChapError("CHAP exchange already complete")
