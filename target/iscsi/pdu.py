"""iSCSI PDU codec (RFC 7143 section 11): Basic Header Segment fields,
AHS, padding and CRC32C digests.

A received PDU is a :class:`Pdu` over its 48-byte BHS (``bytes``) plus the
AHS and a data segment that may be a memoryview into the connection's
receive buffer (valid only until the handler returns: copy what you keep).
Outgoing PDUs are built with :func:`build_bhs` and turned into a short list
of buffers by :func:`encode` for one ``transport.writelines`` call, so the
payload (a memoryview slice of the SCSI layer's data) is never copied.
"""
from __future__ import annotations

import struct

import crc32c as _crc32c

BHS_LEN = 48
DIGEST_LEN = 4
MAX_DSL = (1 << 24) - 1
ALL_ONES = 0xFFFFFFFF

# -- opcodes -------------------------------------------------------------
# initiator -> target
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TMF_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK_REQ = 0x10
# target -> initiator
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TMF_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_ASYNC_MSG = 0x32
OP_REJECT = 0x3F

INITIATOR_OPCODES = frozenset({OP_NOP_OUT, OP_SCSI_CMD, OP_TMF_REQ, OP_LOGIN_REQ, OP_TEXT_REQ,
                               OP_DATA_OUT, OP_LOGOUT_REQ, OP_SNACK_REQ})

OPCODE_NAMES = {
    OP_NOP_OUT: "NOP-Out", OP_SCSI_CMD: "SCSI-Command", OP_TMF_REQ: "TMF-Request",
    OP_LOGIN_REQ: "Login-Request", OP_TEXT_REQ: "Text-Request", OP_DATA_OUT: "Data-Out",
    OP_LOGOUT_REQ: "Logout-Request", OP_SNACK_REQ: "SNACK", OP_NOP_IN: "NOP-In",
    OP_SCSI_RSP: "SCSI-Response", OP_TMF_RSP: "TMF-Response", OP_LOGIN_RSP: "Login-Response",
    OP_TEXT_RSP: "Text-Response", OP_DATA_IN: "Data-In", OP_LOGOUT_RSP: "Logout-Response",
    OP_R2T: "R2T", OP_ASYNC_MSG: "Async-Message", OP_REJECT: "Reject",
}

# -- flag bits (byte 1) -----------------------------------------------------
FLAG_IMMEDIATE = 0x40        # byte 0
FLAG_FINAL = 0x80
FLAG_READ = 0x40             # SCSI Command
FLAG_WRITE = 0x20
ATTR_MASK = 0x07
FLAG_CONTINUE = 0x40         # Login/Text C bit
FLAG_TRANSIT = 0x80          # Login T bit
DATAIN_ACK = 0x40
DATAIN_OVERFLOW = 0x04
DATAIN_UNDERFLOW = 0x02
DATAIN_STATUS = 0x01
RSP_BIDI_OVERFLOW = 0x10
RSP_BIDI_UNDERFLOW = 0x08
RSP_OVERFLOW = 0x04
RSP_UNDERFLOW = 0x02

# -- Reject reasons -----------------------------------------------------------
REJECT_DATA_DIGEST = 0x02
REJECT_SNACK = 0x03
REJECT_PROTOCOL_ERROR = 0x04
REJECT_CMD_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE_CMD = 0x06
REJECT_TASK_IN_PROGRESS = 0x07
REJECT_INVALID_DATA_ACK = 0x08
REJECT_INVALID_PDU_FIELD = 0x09
REJECT_LONG_OP = 0x0A
REJECT_WAITING_FOR_LOGOUT = 0x0C

# -- Task management ---------------------------------------------------------
TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_ACA = 3
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_TASK_REASSIGN = 8

TMF_RSP_COMPLETE = 0
TMF_RSP_NO_TASK = 1
TMF_RSP_NO_LUN = 2
TMF_RSP_STILL_ALLEGIANT = 3
TMF_RSP_REASSIGN_NOT_SUPPORTED = 4
TMF_RSP_NOT_SUPPORTED = 5
TMF_RSP_AUTH_FAILED = 6
TMF_RSP_REJECTED = 255

# -- Logout --------------------------------------------------------------------
LOGOUT_CLOSE_SESSION = 0
LOGOUT_CLOSE_CONNECTION = 1
LOGOUT_REMOVE_FOR_RECOVERY = 2
LOGOUT_RSP_OK = 0
LOGOUT_RSP_CID_NOT_FOUND = 1
LOGOUT_RSP_RECOVERY_NOT_SUPPORTED = 2
LOGOUT_RSP_CLEANUP_FAILED = 3

# -- Login status (class, detail) --------------------------------------------
LOGIN_SUCCESS = (0x00, 0x00)
LOGIN_INITIATOR_ERROR = (0x02, 0x00)
LOGIN_AUTH_FAILED = (0x02, 0x01)
LOGIN_AUTHORIZATION_FAILED = (0x02, 0x02)
LOGIN_NOT_FOUND = (0x02, 0x03)
LOGIN_TARGET_REMOVED = (0x02, 0x04)
LOGIN_UNSUPPORTED_VERSION = (0x02, 0x05)
LOGIN_TOO_MANY_CONNECTIONS = (0x02, 0x06)
LOGIN_MISSING_PARAMETER = (0x02, 0x07)
LOGIN_CANT_INCLUDE_IN_SESSION = (0x02, 0x08)
LOGIN_SESSION_TYPE_UNSUPPORTED = (0x02, 0x09)
LOGIN_SESSION_DOES_NOT_EXIST = (0x02, 0x0A)
LOGIN_INVALID_DURING_LOGIN = (0x02, 0x0B)
LOGIN_TARGET_ERROR = (0x03, 0x00)
LOGIN_SERVICE_UNAVAILABLE = (0x03, 0x01)
LOGIN_OUT_OF_RESOURCES = (0x03, 0x02)

STAGE_SECURITY = 0
STAGE_OPERATIONAL = 1
STAGE_FULL_FEATURE = 3

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_LE32 = struct.Struct("<I")


class PduError(Exception):
    """A PDU that cannot be framed or parsed; ``fatal`` means the byte stream
    can no longer be trusted (the connection must be dropped)."""

    def __init__(self, message: str, *, fatal: bool = True, reason: int = REJECT_PROTOCOL_ERROR,
                 bhs: bytes | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.reason = reason
        self.bhs = bhs


class DigestError(PduError):
    pass


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def digest_bytes(*parts) -> bytes:
    """CRC32C over the concatenation of parts, as sent on the wire (little endian)."""
    v = 0
    for p in parts:
        if p:
            v = _crc32c.crc32c(p, v)
    return _LE32.pack(v)


def pad_len(n: int) -> int:
    return (-n) & 3


_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")


def padding(n: int) -> bytes:
    return _PADS[(-n) & 3]


# -- LUN field (SAM-5 single level LUN structures) ------------------------------

def encode_lun(lun: int) -> bytes:
    if lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    if lun < 16384:
        return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))
    raise ValueError(f"LUN {lun} not representable")


def decode_lun(field: bytes) -> int:
    b0 = field[0]
    method = b0 >> 6
    if method == 0:        # peripheral device addressing, bus 0
        return field[1] if (b0 & 0x3F) == 0 else -1
    if method == 1:        # flat space addressing
        return ((b0 & 0x3F) << 8) | field[1]
    return -1


# -- received PDU ---------------------------------------------------------------

# bytes 0..27 of a BHS: opcode byte, flags, (2 opcode-specific), TotalAHSLength
# + DataSegmentLength as one word, LUN, ITT, and the words at 20 and 24
_HEAD = struct.Struct(">BB2xI8sIII")


class Pdu:
    """A received (or test-built) PDU. The fields every PDU has are decoded
    at once (one struct unpack; read per command); ``u32``/``u16`` read others."""

    __slots__ = ("bhs", "ahs", "data", "opcode", "immediate", "flags", "itt", "dlen", "raw_lun",
                 "ttt", "cmdsn")

    def __init__(self, bhs: bytes, ahs: bytes = b"", data=b"") -> None:
        self.bhs = bhs
        self.ahs = ahs
        self.data = data
        b0, self.flags, lengths, self.raw_lun, self.itt, self.ttt, self.cmdsn = _HEAD.unpack_from(bhs)
        self.opcode = b0 & 0x3F
        self.immediate = bool(b0 & FLAG_IMMEDIATE)
        self.dlen = lengths & 0xFFFFFF
        # ttt: bytes 20..23, the Target Transfer Tag of Data-Out / NOP-Out
        # (the Expected Data Transfer Length of a SCSI Command, see u32(20));
        # cmdsn: bytes 24..27 of the PDUs that carry one

    @property
    def final(self) -> bool:
        return bool(self.flags & FLAG_FINAL)

    def u32(self, off: int) -> int:
        return _U32.unpack_from(self.bhs, off)[0]

    def u16(self, off: int) -> int:
        return _U16.unpack_from(self.bhs, off)[0]

    @property
    def lun(self) -> int:
        return decode_lun(self.raw_lun)

    @property
    def exp_statsn(self) -> int:
        return self.u32(28)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"<Pdu {OPCODE_NAMES.get(self.opcode, hex(self.opcode))} itt=0x{self.itt:08x} "
                f"flags=0x{self.flags:02x} dlen={self.dlen}>")


def parse_bhs_lengths(bhs) -> tuple[int, int]:
    """(AHS length in bytes, data segment length) of a BHS."""
    return bhs[4] * 4, (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]


def iter_ahs(ahs: bytes):
    """Yield (type, AHS-specific bytes) for each AHS (RFC 7143 11.2.2: the
    AHSLength counts the AHS-specific bytes, which start right after the type)."""
    off = 0
    n = len(ahs)
    while off + 3 <= n:
        alen = _U16.unpack_from(ahs, off)[0]
        atype = ahs[off + 2]
        if off + 3 + alen > n:
            raise PduError("AHS overruns the AHS area", fatal=False, reason=REJECT_INVALID_PDU_FIELD)
        yield atype, bytes(ahs[off + 3: off + 3 + alen])
        total = 3 + alen
        off += total + pad_len(total)


def build_ahs(atype: int, specific: bytes) -> bytes:
    """One AHS, padded to 4 bytes; ``specific`` includes any reserved byte."""
    raw = _U16.pack(len(specific)) + bytes((atype,)) + specific
    return raw + padding(len(raw))


AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2


def decode_pdu(buf, *, header_digest: bool = False, data_digest: bool = False,
               max_data: int = MAX_DSL) -> tuple[Pdu, int]:
    """Decode one whole PDU from the start of ``buf``; returns (pdu, bytes used).

    Raises PduError if ``buf`` holds less than one PDU or the PDU is invalid.
    Used by tests and the test initiator; the server's receive path frames
    PDUs incrementally with the same checks (see connection.py).
    """
    mv = memoryview(buf)
    if len(mv) < BHS_LEN:
        raise PduError("truncated BHS")
    ahs_len, dlen = parse_bhs_lengths(mv)
    hlen = BHS_LEN + ahs_len + (DIGEST_LEN if header_digest else 0)
    if len(mv) < hlen:
        raise PduError("truncated header")
    if header_digest:
        if digest_bytes(mv[:BHS_LEN + ahs_len]) != bytes(mv[BHS_LEN + ahs_len:hlen]):
            raise DigestError("header digest mismatch")
    if dlen > max_data:
        raise PduError(f"data segment {dlen} > {max_data}")
    dtotal = dlen + pad_len(dlen) + (DIGEST_LEN if data_digest and dlen else 0)
    if len(mv) < hlen + dtotal:
        raise PduError("truncated data segment")
    data = mv[hlen:hlen + dlen]
    if data_digest and dlen:
        padded = mv[hlen:hlen + dlen + pad_len(dlen)]
        if digest_bytes(padded) != bytes(mv[hlen + dlen + pad_len(dlen):hlen + dtotal]):
            raise DigestError("data digest mismatch", fatal=False, reason=REJECT_DATA_DIGEST,
                              bhs=bytes(mv[:BHS_LEN]))
    pdu = Pdu(bytes(mv[:BHS_LEN]), bytes(mv[BHS_LEN:BHS_LEN + ahs_len]), bytes(data))
    return pdu, hlen + dtotal


# -- building outgoing PDUs ---------------------------------------------------------

def build_bhs(opcode: int, flags: int = 0, *, immediate: bool = False, b2: int = 0, b3: int = 0,
              ahs_len: int = 0, dlen: int = 0, lun: bytes | int | None = None,
              itt: int = 0, fields: dict[int, int] | None = None, raw: dict[int, bytes] | None = None) -> bytearray:
    """A 48-byte BHS. ``fields`` maps byte offsets (20..44) to 32-bit values,
    ``raw`` maps offsets to raw bytes (e.g. ISID)."""
    bhs = bytearray(BHS_LEN)
    bhs[0] = (opcode & 0x3F) | (FLAG_IMMEDIATE if immediate else 0)
    bhs[1] = flags & 0xFF
    bhs[2] = b2 & 0xFF
    bhs[3] = b3 & 0xFF
    if ahs_len % 4:
        raise ValueError("AHS length must be a multiple of 4")
    bhs[4] = ahs_len // 4
    if dlen > MAX_DSL:
        raise ValueError("data segment too long")
    bhs[5] = (dlen >> 16) & 0xFF
    bhs[6] = (dlen >> 8) & 0xFF
    bhs[7] = dlen & 0xFF
    if lun is not None:
        bhs[8:16] = encode_lun(lun) if isinstance(lun, int) else lun
    _U32.pack_into(bhs, 16, itt & ALL_ONES)
    if fields:
        for off, val in fields.items():
            _U32.pack_into(bhs, off, val & ALL_ONES)
    if raw:
        for off, val in raw.items():
            bhs[off:off + len(val)] = val
    return bhs


# a whole BHS without AHS: opcode, flags, bytes 2-3, TotalAHSLength (0) and
# DataSegmentLength as one word, LUN, ITT and the eight words at 20..44
BHS_WORDS = struct.Struct(">BBBBI8s8I")
ZERO_LUN = bytes(8)


def pack_bhs(opcode: int, flags: int, b2: int, b3: int, lun: bytes, itt: int, f20: int = 0,
             f24: int = 0, f28: int = 0, f32: int = 0, f36: int = 0, f40: int = 0,
             f44: int = 0, dlen: int = 0) -> bytearray:
    """Fast path of build_bhs for the hot target PDUs (Data-In, SCSI Response,
    R2T): one struct pack. The data segment length is either given here
    (a header sent as is, no AHS) or filled in by encode()."""
    if dlen > MAX_DSL:
        raise ValueError("data segment too long")
    # bytes 4..7: TotalAHSLength (0) and the 24-bit DataSegmentLength, as one word
    return bytearray(BHS_WORDS.pack(opcode, flags, b2, b3, dlen, lun or ZERO_LUN, itt, f20, f24, f28,
                                 f32, f36, f40, f44))


def encode(bhs: bytearray, data=b"", *, ahs: bytes = b"", header_digest: bool = False,
           data_digest: bool = False) -> list:
    """Buffers for ``writelines``: header(+AHS+digest), data, padding(+digest).

    The BHS's length fields are (re)written from ``ahs`` and ``data``.
    """
    dlen = len(data)
    if dlen > MAX_DSL:
        raise ValueError("data segment too long")
    bhs[4] = len(ahs) // 4
    bhs[5] = (dlen >> 16) & 0xFF
    bhs[6] = (dlen >> 8) & 0xFF
    bhs[7] = dlen & 0xFF
    if ahs:
        bhs += ahs
    if header_digest:
        bhs += digest_bytes(bhs)
    if not dlen:
        return [bhs]
    pad = _PADS[(-dlen) & 3]
    if data_digest:
        tail = pad + digest_bytes(data, pad)
    else:
        tail = pad
    if tail:
        return [bhs, data, tail]
    return [bhs, data]


def wire_len(buffers: list) -> int:
    """The bytes a PDU's buffers put on the wire (memoryviews of any
    format counted in bytes)."""
    return sum(b.nbytes if b.__class__ is memoryview else len(b) for b in buffers)


def encode_bytes(bhs: bytearray, data=b"", **kw) -> bytes:
    return b"".join(bytes(x) for x in encode(bhs, data, **kw))
