"""The command table: for each supported (opcode, service action) its CDB
length and usage mask (REPORT SUPPORTED OPERATION CODES), handler, and the
properties the device checks before dispatch:

* ``pr``: reservation class (pr.ALLOW / pr.READ / pr.WRITE, SPC-4 5.13.1)
* ``spc2_ok``: allowed while another nexus holds an SPC-2 reservation
* ``needs_ready``: refused with NOT READY when the LU cannot serve I/O
* ``writes``: refused with DATA PROTECT when the LU is read-only
* ``ua_exempt``: neither reports nor clears unit attentions (SAM-5 5.14)
* ``lba`` / ``count``: where the LBA and the transfer length (blocks, or
  the parameter list length in bytes) sit in the CDB
* ``out_len``: Data-Out bytes the CDB calls for, from the CDB and its
  decoded count (the SCSI transfer length transports need for residuals),
  for commands that carry Data-Out; ``data_in``: the command returns Data-In

``decode`` reads all of that once per command into a ``Cdb``: the device's
checks, its handlers and the transports (residuals, TCMU buffer direction)
use it, and nothing else in the target knows these field positions.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import constants as c
from . import pr
from . import sbc, spc
from .api import ScsiCommand

if TYPE_CHECKING:
    from .device import ScsiDevice

# A handler returns the Data-In bytes or None, or -- READ/WRITE, which may
# finish without waiting -- a coroutine to await for them.
Handler = Callable[..., object]
# (cdb, decoded count, block size) -> Data-Out bytes
OutLen = Callable[[bytes, int, int], int]
Field = tuple[int, int]          # [start, end) byte offsets in the CDB
_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}     # big-endian field widths


def _verify_len(cdb: bytes, n: int, bs: int) -> int:
    bytchk = (cdb[1] >> 1) & 0x03
    return n * bs if bytchk == 1 else (bs if bytchk == 3 and n else 0)


_BLOCKS: OutLen = lambda cdb, n, bs: n * bs                    # noqa: E731
_BYTES: OutLen = lambda cdb, n, bs: n                          # noqa: E731
_ONE_BLOCK: OutLen = lambda cdb, n, bs: bs                     # noqa: E731
# READ/WRITE(6): a 21-bit LBA in bytes 1-3, a one-byte count where 0 means 256
_SIX = frozenset((c.READ_6, c.WRITE_6))
_LBA6, _COUNT6 = (1, 4), (4, 5)
_LBA10, _COUNT10 = (2, 6), (7, 9)
_LBA12, _COUNT12 = (2, 6), (6, 10)
_LBA16, _COUNT16 = (2, 10), (10, 14)


def _fields(lba: Field | None, count: Field | None) -> struct.Struct | None:
    """One struct reading the LBA and the count (in that order) of a CDB;
    for READ/WRITE(6), whose 21-bit LBA no struct reads, only the count."""
    fmt, at = ">", 0
    for f in (lba if lba != _LBA6 else None, count):
        if f is not None:
            fmt += f"{f[0] - at}x" + _FORMATS[f[1] - f[0]]
            at = f[1]
    return None if fmt == ">" else struct.Struct(fmt)


@dataclass(frozen=True)
class CommandSpec:
    opcode: int
    sa: int | None
    name: str
    usage: bytes
    handler: Handler
    pr: str = pr.WRITE
    spc2_ok: bool = False
    needs_ready: bool = True
    writes: bool = False
    ua_exempt: bool = False
    lba: Field | None = None
    count: Field | None = None
    out_len: OutLen | None = None
    data_in: bool = False
    # derived once, read on every command: len(usage), and what decodes
    # the LBA and count fields
    cdb_len: int = field(init=False)
    fields: struct.Struct | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cdb_len", len(self.usage))
        object.__setattr__(self, "fields", _fields(self.lba, self.count))


async def _report_supported_opcodes(dev: "ScsiDevice", cmd: ScsiCommand, d: Cdb) -> bytes:
    # The table describes itself: it hands itself to the SPC encoder, which
    # therefore need not import this module (which imports it).
    return spc.report_supported_opcodes(COMMANDS, SA_OPCODES, d.raw)


def _u(*b: int) -> bytes:
    return bytes(b)


F = 0xFF
CTL = 0x04   # control byte: only NACA is evaluated (and refused)

_CONTROL_ONLY = dict(pr=pr.ALLOW, needs_ready=False)

_IN = dict(data_in=True)
_RW6 = dict(lba=_LBA6, count=_COUNT6)
_RW10 = dict(lba=_LBA10, count=_COUNT10)
_RW12 = dict(lba=_LBA12, count=_COUNT12)
_RW16 = dict(lba=_LBA16, count=_COUNT16)

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(c.TEST_UNIT_READY, None, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, CTL),
                spc.test_unit_ready, pr=pr.ALLOW),
    CommandSpec(c.REQUEST_SENSE, None, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, F, CTL),
                spc.request_sense, spc2_ok=True, ua_exempt=True, **_CONTROL_ONLY, **_IN),
    CommandSpec(c.INQUIRY, None, "INQUIRY", _u(0x12, 0x03, F, F, F, CTL),
                spc.inquiry, spc2_ok=True, ua_exempt=True, **_CONTROL_ONLY, **_IN),
    CommandSpec(c.MODE_SELECT_6, None, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, F, CTL),
                spc.mode_select, pr=pr.WRITE, needs_ready=False, count=(4, 5), out_len=_BYTES),
    CommandSpec(c.RESERVE_6, None, "RESERVE(6)", _u(0x16, 0x11, 0, 0, 0, CTL),
                spc.reserve, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.RELEASE_6, None, "RELEASE(6)", _u(0x17, 0x11, 0, 0, 0, CTL),
                spc.release, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.MODE_SENSE_6, None, "MODE SENSE(6)", _u(0x1A, 0x08, F, F, F, CTL),
                spc.mode_sense, pr=pr.READ, needs_ready=False, **_IN),
    CommandSpec(c.START_STOP_UNIT, None, "START STOP UNIT", _u(0x1B, 0, 0, 0, 0, CTL),
                spc.start_stop_unit, pr=pr.READ, needs_ready=False),
    CommandSpec(c.READ_6, None, "READ(6)", _u(0x08, 0x1F, F, F, F, CTL), sbc.read, pr=pr.READ,
                **_RW6, **_IN),
    CommandSpec(c.WRITE_6, None, "WRITE(6)", _u(0x0A, 0x1F, F, F, F, CTL), sbc.write, writes=True,
                **_RW6, out_len=_BLOCKS),
    CommandSpec(c.READ_CAPACITY_10, None, "READ CAPACITY(10)",
                _u(0x25, 0, F, F, F, F, 0, 0, 0x01, CTL), sbc.read_capacity_10, **_CONTROL_ONLY,
                **_IN),
    CommandSpec(c.READ_10, None, "READ(10)", _u(0x28, 0xF8, F, F, F, F, 0, F, F, CTL),
                sbc.read, pr=pr.READ, **_RW10, **_IN),
    CommandSpec(c.WRITE_10, None, "WRITE(10)", _u(0x2A, 0xF8, F, F, F, F, 0, F, F, CTL),
                sbc.write, writes=True, **_RW10, out_len=_BLOCKS),
    CommandSpec(c.WRITE_AND_VERIFY_10, None, "WRITE AND VERIFY(10)",
                _u(0x2E, 0xF6, F, F, F, F, 0, F, F, CTL), sbc.write_and_verify, writes=True,
                **_RW10, out_len=_BLOCKS),
    CommandSpec(c.VERIFY_10, None, "VERIFY(10)", _u(0x2F, 0xF6, F, F, F, F, 0, F, F, CTL),
                sbc.verify, pr=pr.READ, **_RW10, out_len=_verify_len),
    CommandSpec(c.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
                _u(0x35, 0x02, F, F, F, F, 0, F, F, CTL), sbc.synchronize_cache, **_RW10),
    CommandSpec(c.PRE_FETCH_10, None, "PRE-FETCH(10)", _u(0x34, 0x02, F, F, F, F, 0, F, F, CTL),
                sbc.pre_fetch, pr=pr.READ, **_RW10),
    CommandSpec(c.WRITE_SAME_10, None, "WRITE SAME(10)", _u(0x41, 0xFE, F, F, F, F, 0, F, F, CTL),
                sbc.write_same, writes=True, **_RW10, out_len=_ONE_BLOCK),
    CommandSpec(c.UNMAP, None, "UNMAP", _u(0x42, 0x01, 0, 0, 0, 0, 0, F, F, CTL),
                sbc.unmap, writes=True, count=(7, 9), out_len=_BYTES),
    CommandSpec(c.MODE_SELECT_10, None, "MODE SELECT(10)", _u(0x55, 0x11, 0, 0, 0, 0, 0, F, F, CTL),
                spc.mode_select, pr=pr.WRITE, needs_ready=False, count=(7, 9), out_len=_BYTES),
    CommandSpec(c.RESERVE_10, None, "RESERVE(10)", _u(0x56, 0x13, 0, 0, 0, 0, 0, 0, 0, CTL),
                spc.reserve, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.RELEASE_10, None, "RELEASE(10)", _u(0x57, 0x11, 0, 0, 0, 0, 0, 0, 0, CTL),
                spc.release, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.MODE_SENSE_10, None, "MODE SENSE(10)", _u(0x5A, 0x18, F, F, 0, 0, 0, F, F, CTL),
                spc.mode_sense, pr=pr.READ, needs_ready=False, **_IN),
    *(CommandSpec(c.PERSISTENT_RESERVE_IN, sa, f"PERSISTENT RESERVE IN/{sa:02x}",
                  _u(0x5E, sa, 0, 0, 0, 0, 0, F, F, CTL), spc.persistent_reserve_in,
                  **_CONTROL_ONLY, **_IN) for sa in range(4)),
    *(CommandSpec(c.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT/{sa:02x}",
                  _u(0x5F, sa, F, 0, 0, F, F, F, F, CTL), spc.persistent_reserve_out,
                  count=(5, 9), out_len=_BYTES, **_CONTROL_ONLY) for sa in range(7)),
    CommandSpec(c.READ_16, None, "READ(16)", _u(0x88, 0xF8, *[F] * 12, 0, CTL), sbc.read, pr=pr.READ,
                **_RW16, **_IN),
    CommandSpec(c.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
                _u(0x89, 0xF8, *[F] * 8, 0, 0, 0, F, 0, CTL), sbc.compare_and_write, writes=True,
                lba=(2, 10), count=(13, 14), out_len=lambda cdb, n, bs: 2 * n * bs),
    CommandSpec(c.WRITE_16, None, "WRITE(16)", _u(0x8A, 0xF8, *[F] * 12, 0, CTL),
                sbc.write, writes=True, **_RW16, out_len=_BLOCKS),
    CommandSpec(c.WRITE_AND_VERIFY_16, None, "WRITE AND VERIFY(16)",
                _u(0x8E, 0xF6, *[F] * 12, 0, CTL), sbc.write_and_verify, writes=True,
                **_RW16, out_len=_BLOCKS),
    CommandSpec(c.VERIFY_16, None, "VERIFY(16)", _u(0x8F, 0xF6, *[F] * 12, 0, CTL),
                sbc.verify, pr=pr.READ, **_RW16, out_len=_verify_len),
    CommandSpec(c.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
                _u(0x91, 0x02, *[F] * 12, 0, CTL), sbc.synchronize_cache, **_RW16),
    CommandSpec(c.PRE_FETCH_16, None, "PRE-FETCH(16)", _u(0x90, 0x02, *[F] * 12, 0, CTL),
                sbc.pre_fetch, pr=pr.READ, **_RW16),
    CommandSpec(c.WRITE_SAME_16, None, "WRITE SAME(16)", _u(0x93, 0xFF, *[F] * 12, 0, CTL),
                sbc.write_same, writes=True, **_RW16,
                out_len=lambda cdb, n, bs: 0 if cdb[1] & 0x01 else bs),    # NDOB: no data
    CommandSpec(c.SERVICE_ACTION_IN_16, c.SAI_READ_CAPACITY_16, "READ CAPACITY(16)",
                _u(0x9E, c.SAI_READ_CAPACITY_16, *[0] * 8, F, F, F, F, 0, CTL),
                sbc.read_capacity_16, **_CONTROL_ONLY, **_IN),
    CommandSpec(c.SERVICE_ACTION_IN_16, c.SAI_GET_LBA_STATUS, "GET LBA STATUS",
                _u(0x9E, c.SAI_GET_LBA_STATUS, *[F] * 12, 0, CTL), sbc.get_lba_status, pr=pr.READ,
                lba=(2, 10), **_IN),
    CommandSpec(c.REPORT_LUNS, None, "REPORT LUNS", _u(0xA0, 0, F, 0, 0, 0, F, F, F, F, 0, CTL),
                spc.report_luns, spc2_ok=True, ua_exempt=True, **_CONTROL_ONLY, **_IN),
    CommandSpec(c.MAINTENANCE_IN, c.MI_REPORT_SUPPORTED_OPERATION_CODES,
                "REPORT SUPPORTED OPERATION CODES",
                _u(0xA3, c.MI_REPORT_SUPPORTED_OPERATION_CODES, 0x87, F, F, F, F, F, F, F, 0, CTL),
                _report_supported_opcodes, spc2_ok=True, **_CONTROL_ONLY, **_IN),
    CommandSpec(c.READ_12, None, "READ(12)", _u(0xA8, 0xF8, *[F] * 8, 0, CTL), sbc.read, pr=pr.READ,
                **_RW12, **_IN),
    CommandSpec(c.WRITE_12, None, "WRITE(12)", _u(0xAA, 0xF8, *[F] * 8, 0, CTL),
                sbc.write, writes=True, **_RW12, out_len=_BLOCKS),
    CommandSpec(c.WRITE_AND_VERIFY_12, None, "WRITE AND VERIFY(12)",
                _u(0xAE, 0xF6, *[F] * 8, 0, CTL), sbc.write_and_verify, writes=True,
                **_RW12, out_len=_BLOCKS),
    CommandSpec(c.VERIFY_12, None, "VERIFY(12)", _u(0xAF, 0xF6, *[F] * 8, 0, CTL),
                sbc.verify, pr=pr.READ, **_RW12, out_len=_verify_len),
)

# Opcodes whose CDB byte 1 (bits 4-0) carries a service action.
SA_OPCODES = frozenset(s.opcode for s in COMMANDS if s.sa is not None)

_BY_OPCODE: dict[int, CommandSpec] = {s.opcode: s for s in COMMANDS if s.sa is None}
_BY_SA: dict[tuple[int, int], CommandSpec] = {(s.opcode, s.sa): s for s in COMMANDS
                                              if s.sa is not None}

# Opcodes without service actions whose data phase is Data-In (returns_data_in).
_DATA_IN_OPCODES = frozenset(s.opcode for s in COMMANDS if s.sa is None and s.data_in)

# Opcodes that skip unit attention handling, known before the CDB is parsed.
UA_EXEMPT = frozenset(s.opcode for s in COMMANDS if s.ua_exempt)


def lookup(cdb: bytes) -> CommandSpec | None | int:
    """The spec for a CDB; None for an unknown opcode; -1 for an unknown
    service action of a known opcode."""
    op = cdb[0]
    if op in SA_OPCODES:
        if len(cdb) < 2:
            return -1
        return _BY_SA.get((op, cdb[1] & 0x1F), -1)
    return _BY_OPCODE.get(op)


@dataclass(slots=True)
class Cdb:
    """One CDB decoded once, before any check: what the device's checks, the
    handlers and the transports read instead of the CDB's bytes.

    ``spec`` is the table entry (None: unknown opcode; -1: unknown service
    action). The fields below are decoded only when the CDB is at least as
    long as its opcode requires (else the command fails before a handler
    runs): ``lba``; ``count`` the transfer length field (blocks, or bytes of
    a parameter list) at CDB offset ``count_at``; ``data_out`` the bytes of
    Data-Out the command calls for (None: it carries none).
    """
    raw: bytes
    spec: CommandSpec | None | int
    lba: int = 0
    count: int = 0
    count_at: int = 0
    data_out: int | None = None


def decode(cdb: bytes, block_size: int) -> Cdb:
    if not cdb:
        spec = None
    elif cdb[0] in SA_OPCODES:
        spec = lookup(cdb)
    else:
        spec = _BY_OPCODE.get(cdb[0])
    if spec.__class__ is not CommandSpec or len(cdb) < spec.cdb_len:
        return Cdb(cdb, spec)
    lba = count = count_at = 0
    read = spec.fields
    if read is not None:
        values = read.unpack_from(cdb)
        if spec.lba is not None:
            lba = values[0]
        if spec.count is not None:
            count_at = spec.count[0]
            count = values[-1]
        if spec.opcode in _SIX:
            lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF   # bits 7-5 of byte 1 are not the LBA's
            count = count or 256                                 # 0 means 256 blocks
    out = spec.out_len
    return Cdb(cdb, spec, lba, count, count_at,
               None if out is None else out(cdb, count, block_size))


def returns_data_in(cdb: bytes) -> bool:
    """Whether a known command's data phase is Data-In (a transport that is
    not told the direction, TCMU, asks this); False for unknown opcodes,
    whose buffers are then treated as Data-Out, which is always safe."""
    if not cdb:
        return False
    if cdb[0] in SA_OPCODES:
        spec = lookup(cdb)
        return spec.__class__ is CommandSpec and spec.data_in
    return cdb[0] in _DATA_IN_OPCODES
