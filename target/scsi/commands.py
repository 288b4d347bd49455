"""The command table: for each supported (opcode, service action) its CDB
length and usage mask (REPORT SUPPORTED OPERATION CODES), handler, and the
properties the device checks before dispatch:

* ``pr``: reservation class (pr.ALLOW / pr.READ / pr.WRITE, SPC-4 5.13.1)
* ``spc2_ok``: allowed while another nexus holds an SPC-2 reservation
* ``needs_ready``: refused with NOT READY when the LU cannot serve I/O
* ``writes``: refused with DATA PROTECT when the LU is read-only
* ``ua_exempt``: neither reports nor clears unit attentions (SAM-5 5.14)
* ``out_len``: Data-Out bytes the CDB calls for (the SCSI transfer length
  transports need for residuals), for commands that carry Data-Out
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from . import constants as c
from . import pr
from . import sbc, spc
from .api import ScsiCommand

if TYPE_CHECKING:
    from .device import ScsiDevice

Handler = Callable[..., Awaitable[object]]
OutLen = Callable[[bytes, int], int]


def _be(cdb: bytes, a: int, b: int) -> int:
    return int.from_bytes(cdb[a:b], "big")


def _verify_len(n: int, cdb: bytes, bs: int) -> int:
    bytchk = (cdb[1] >> 1) & 0x03
    return n * bs if bytchk == 1 else (bs if bytchk == 3 and n else 0)


_OUT6: OutLen = lambda cdb, bs: (cdb[4] or 256) * bs          # noqa: E731
_OUT10: OutLen = lambda cdb, bs: _be(cdb, 7, 9) * bs           # noqa: E731
_OUT12: OutLen = lambda cdb, bs: _be(cdb, 6, 10) * bs          # noqa: E731
_OUT16: OutLen = lambda cdb, bs: _be(cdb, 10, 14) * bs         # noqa: E731


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
    out_len: OutLen | None = None

    @property
    def cdb_len(self) -> int:
        return len(self.usage)


async def _report_supported_opcodes(dev: "ScsiDevice", cmd: ScsiCommand, cdb: bytes) -> bytes:
    # The table describes itself: it hands itself to the SPC encoder, which
    # therefore need not import this module (which imports it).
    return spc.report_supported_opcodes(COMMANDS, SA_OPCODES, cdb)


def _u(*b: int) -> bytes:
    return bytes(b)


F = 0xFF
CTL = 0x04   # control byte: only NACA is evaluated (and refused)

_CONTROL_ONLY = dict(pr=pr.ALLOW, needs_ready=False)

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(c.TEST_UNIT_READY, None, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, CTL),
                spc.test_unit_ready, pr=pr.ALLOW),
    CommandSpec(c.REQUEST_SENSE, None, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, F, CTL),
                spc.request_sense, spc2_ok=True, ua_exempt=True, **_CONTROL_ONLY),
    CommandSpec(c.INQUIRY, None, "INQUIRY", _u(0x12, 0x03, F, F, F, CTL),
                spc.inquiry, spc2_ok=True, ua_exempt=True, **_CONTROL_ONLY),
    CommandSpec(c.MODE_SELECT_6, None, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, F, CTL),
                spc.mode_select, pr=pr.WRITE, needs_ready=False,
                out_len=lambda cdb, bs: cdb[4]),
    CommandSpec(c.RESERVE_6, None, "RESERVE(6)", _u(0x16, 0x11, 0, 0, 0, CTL),
                spc.reserve, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.RELEASE_6, None, "RELEASE(6)", _u(0x17, 0x11, 0, 0, 0, CTL),
                spc.release, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.MODE_SENSE_6, None, "MODE SENSE(6)", _u(0x1A, 0x08, F, F, F, CTL),
                spc.mode_sense, pr=pr.READ, needs_ready=False),
    CommandSpec(c.START_STOP_UNIT, None, "START STOP UNIT", _u(0x1B, 0, 0, 0, 0, CTL),
                spc.start_stop_unit, pr=pr.READ, needs_ready=False),
    CommandSpec(c.READ_6, None, "READ(6)", _u(0x08, 0x1F, F, F, F, CTL), sbc.read, pr=pr.READ),
    CommandSpec(c.WRITE_6, None, "WRITE(6)", _u(0x0A, 0x1F, F, F, F, CTL), sbc.write, writes=True, out_len=_OUT6),
    CommandSpec(c.READ_CAPACITY_10, None, "READ CAPACITY(10)",
                _u(0x25, 0, F, F, F, F, 0, 0, 0x01, CTL), sbc.read_capacity_10, **_CONTROL_ONLY),
    CommandSpec(c.READ_10, None, "READ(10)", _u(0x28, 0xF8, F, F, F, F, 0, F, F, CTL),
                sbc.read, pr=pr.READ),
    CommandSpec(c.WRITE_10, None, "WRITE(10)", _u(0x2A, 0xF8, F, F, F, F, 0, F, F, CTL),
                sbc.write, writes=True, out_len=_OUT10),
    CommandSpec(c.WRITE_AND_VERIFY_10, None, "WRITE AND VERIFY(10)",
                _u(0x2E, 0xF6, F, F, F, F, 0, F, F, CTL), sbc.write_and_verify, writes=True,
                out_len=_OUT10),
    CommandSpec(c.VERIFY_10, None, "VERIFY(10)", _u(0x2F, 0xF6, F, F, F, F, 0, F, F, CTL),
                sbc.verify, pr=pr.READ,
                out_len=lambda cdb, bs: _verify_len(_be(cdb, 7, 9), cdb, bs)),
    CommandSpec(c.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
                _u(0x35, 0x02, F, F, F, F, 0, F, F, CTL), sbc.synchronize_cache),
    CommandSpec(c.PRE_FETCH_10, None, "PRE-FETCH(10)", _u(0x34, 0x02, F, F, F, F, 0, F, F, CTL),
                sbc.pre_fetch, pr=pr.READ),
    CommandSpec(c.WRITE_SAME_10, None, "WRITE SAME(10)", _u(0x41, 0xFE, F, F, F, F, 0, F, F, CTL),
                sbc.write_same, writes=True, out_len=lambda cdb, bs: bs),
    CommandSpec(c.UNMAP, None, "UNMAP", _u(0x42, 0x01, 0, 0, 0, 0, 0, F, F, CTL),
                sbc.unmap, writes=True, out_len=lambda cdb, bs: _be(cdb, 7, 9)),
    CommandSpec(c.MODE_SELECT_10, None, "MODE SELECT(10)", _u(0x55, 0x11, 0, 0, 0, 0, 0, F, F, CTL),
                spc.mode_select, pr=pr.WRITE, needs_ready=False,
                out_len=lambda cdb, bs: _be(cdb, 7, 9)),
    CommandSpec(c.RESERVE_10, None, "RESERVE(10)", _u(0x56, 0x13, 0, 0, 0, 0, 0, 0, 0, CTL),
                spc.reserve, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.RELEASE_10, None, "RELEASE(10)", _u(0x57, 0x11, 0, 0, 0, 0, 0, 0, 0, CTL),
                spc.release, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.MODE_SENSE_10, None, "MODE SENSE(10)", _u(0x5A, 0x18, F, F, 0, 0, 0, F, F, CTL),
                spc.mode_sense, pr=pr.READ, needs_ready=False),
    *(CommandSpec(c.PERSISTENT_RESERVE_IN, sa, f"PERSISTENT RESERVE IN/{sa:02x}",
                  _u(0x5E, sa, 0, 0, 0, 0, 0, F, F, CTL), spc.persistent_reserve_in,
                  **_CONTROL_ONLY) for sa in range(4)),
    *(CommandSpec(c.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT/{sa:02x}",
                  _u(0x5F, sa, F, 0, 0, F, F, F, F, CTL), spc.persistent_reserve_out,
                  out_len=lambda cdb, bs: _be(cdb, 5, 9), **_CONTROL_ONLY) for sa in range(7)),
    CommandSpec(c.READ_16, None, "READ(16)", _u(0x88, 0xF8, *[F] * 12, 0, CTL), sbc.read, pr=pr.READ),
    CommandSpec(c.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
                _u(0x89, 0xF8, *[F] * 8, 0, 0, 0, F, 0, CTL), sbc.compare_and_write, writes=True,
                out_len=lambda cdb, bs: 2 * cdb[13] * bs),
    CommandSpec(c.WRITE_16, None, "WRITE(16)", _u(0x8A, 0xF8, *[F] * 12, 0, CTL),
                sbc.write, writes=True, out_len=_OUT16),
    CommandSpec(c.WRITE_AND_VERIFY_16, None, "WRITE AND VERIFY(16)",
                _u(0x8E, 0xF6, *[F] * 12, 0, CTL), sbc.write_and_verify, writes=True,
                out_len=_OUT16),
    CommandSpec(c.VERIFY_16, None, "VERIFY(16)", _u(0x8F, 0xF6, *[F] * 12, 0, CTL),
                sbc.verify, pr=pr.READ,
                out_len=lambda cdb, bs: _verify_len(_be(cdb, 10, 14), cdb, bs)),
    CommandSpec(c.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
                _u(0x91, 0x02, *[F] * 12, 0, CTL), sbc.synchronize_cache),
    CommandSpec(c.PRE_FETCH_16, None, "PRE-FETCH(16)", _u(0x90, 0x02, *[F] * 12, 0, CTL),
                sbc.pre_fetch, pr=pr.READ),
    CommandSpec(c.WRITE_SAME_16, None, "WRITE SAME(16)", _u(0x93, 0xFF, *[F] * 12, 0, CTL),
                sbc.write_same, writes=True,
                out_len=lambda cdb, bs: 0 if cdb[1] & 0x01 else bs),
    CommandSpec(c.SERVICE_ACTION_IN_16, c.SAI_READ_CAPACITY_16, "READ CAPACITY(16)",
                _u(0x9E, c.SAI_READ_CAPACITY_16, *[0] * 8, F, F, F, F, 0, CTL),
                sbc.read_capacity_16, **_CONTROL_ONLY),
    CommandSpec(c.SERVICE_ACTION_IN_16, c.SAI_GET_LBA_STATUS, "GET LBA STATUS",
                _u(0x9E, c.SAI_GET_LBA_STATUS, *[F] * 12, 0, CTL), sbc.get_lba_status, pr=pr.READ),
    CommandSpec(c.REPORT_LUNS, None, "REPORT LUNS", _u(0xA0, 0, F, 0, 0, 0, F, F, F, F, 0, CTL),
                spc.report_luns, spc2_ok=True, ua_exempt=True, **_CONTROL_ONLY),
    CommandSpec(c.MAINTENANCE_IN, c.MI_REPORT_SUPPORTED_OPERATION_CODES,
                "REPORT SUPPORTED OPERATION CODES",
                _u(0xA3, c.MI_REPORT_SUPPORTED_OPERATION_CODES, 0x87, F, F, F, F, F, F, F, 0, CTL),
                _report_supported_opcodes, spc2_ok=True, **_CONTROL_ONLY),
    CommandSpec(c.READ_12, None, "READ(12)", _u(0xA8, 0xF8, *[F] * 8, 0, CTL), sbc.read, pr=pr.READ),
    CommandSpec(c.WRITE_12, None, "WRITE(12)", _u(0xAA, 0xF8, *[F] * 8, 0, CTL),
                sbc.write, writes=True, out_len=_OUT12),
    CommandSpec(c.WRITE_AND_VERIFY_12, None, "WRITE AND VERIFY(12)",
                _u(0xAE, 0xF6, *[F] * 8, 0, CTL), sbc.write_and_verify, writes=True,
                out_len=_OUT12),
    CommandSpec(c.VERIFY_12, None, "VERIFY(12)", _u(0xAF, 0xF6, *[F] * 8, 0, CTL),
                sbc.verify, pr=pr.READ,
                out_len=lambda cdb, bs: _verify_len(_be(cdb, 6, 10), cdb, bs)),
)

# Opcodes whose CDB byte 1 (bits 4-0) carries a service action.
SA_OPCODES = frozenset(s.opcode for s in COMMANDS if s.sa is not None)

_BY_OPCODE: dict[int, CommandSpec] = {s.opcode: s for s in COMMANDS if s.sa is None}
_BY_SA: dict[tuple[int, int], CommandSpec] = {(s.opcode, s.sa): s for s in COMMANDS
                                              if s.sa is not None}

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
