"""Transfer lengths near every field width, through a live server over the
real SCSI emulation: the CDB transfer length (8/16/32 bits for
READ/WRITE(6/10/12/16)), the Expected Data Transfer Length (32 bits), the
Residual Count (32 bits), MaxBurstLength / FirstBurstLength and the block
size multiplication. Every answer is either a correct residual (RFC 7143
11.4.5) or a CHECK CONDITION, the connection stays up and the log holds no
traceback."""
from __future__ import annotations

import asyncio
import logging
import struct

import pytest

pytest.importorskip("target.scsi.lunset")

from target.iscsi import IscsiServer, IscsiTargetConfig  # noqa: E402
from target.iscsi import pdu as P  # noqa: E402
from target.iscsi.__main__ import build_lunset  # noqa: E402

from .initiator import Initiator, ScsiResult  # noqa: E402

IQN = "iqn.2025-01.org.test:residual-sweep"
BS = 512
LUN_BYTES = 8 << 20
FIRST_BURST = 65536
MAX_BURST = 131072
GOOD, CHECK_CONDITION = 0x00, 0x02
ILLEGAL_REQUEST = 0x05
ASC_LBA_OUT_OF_RANGE, ASC_INVALID_FIELD_CDB = 0x21, 0x24
RESIDUAL_MAX = 0xFFFFFFFF
MAX_SENT = 64 << 20        # the server's default max_cmd_data: larger writes are refused up front

# (opcode, CDB builder (lba, blocks), width of the transfer length field in bits)
READS = {
    "READ(6)": (lambda lba, n: struct.pack(">BBHBB", 0x08, 0, lba, n & 0xFF, 0), 8),
    "READ(10)": (lambda lba, n: struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0), 16),
    "READ(12)": (lambda lba, n: struct.pack(">BBIIBB", 0xA8, 0, lba, n, 0, 0), 32),
    "READ(16)": (lambda lba, n: struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0), 32),
}
WRITES = {
    "WRITE(6)": (lambda lba, n: struct.pack(">BBHBB", 0x0A, 0, lba, n & 0xFF, 0), 8),
    "WRITE(10)": (lambda lba, n: struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0), 16),
    "WRITE(12)": (lambda lba, n: struct.pack(">BBIIBB", 0xAA, 0, lba, n, 0, 0), 32),
    "WRITE(16)": (lambda lba, n: struct.pack(">BBQIBB", 0x8A, 0, lba, n, 0, 0), 32),
}


def _lengths(width: int) -> list[int]:
    """Transfer lengths (blocks) at the edges of a field ``width`` bits wide
    and of the 32-bit byte counts they get multiplied into."""
    top = (1 << width) - 1
    near = {0, 1, 2, top - 1, top, 1 << 7, (1 << 7) + 1, 0xFF,
            # blocks whose byte count (512-byte blocks) crosses 2^24, 2^32, 2^40
            0xFFFF, 0x10000, 0x7FFFFF, 0x800000, 0x800001, 0xFFFFFF, 0x1000000, 0x7FFFFFFF, 0x80000000}
    return sorted(n for n in near if n <= top)


def _edtls(blocks: int, width: int) -> list[int]:
    nbytes = (blocks or (256 if width == 8 else 0)) * BS
    cands = {0, BS, nbytes, nbytes - 1, nbytes + 1, FIRST_BURST - 1, FIRST_BURST, FIRST_BURST + 1,
             MAX_BURST, MAX_BURST + 1, RESIDUAL_MAX}
    return sorted(e for e in cands if 0 <= e <= RESIDUAL_MAX)


def _cases(table: dict) -> list:
    out = []
    for name, (build, width) in table.items():
        for blocks in _lengths(width):
            for edtl in _edtls(blocks, width):
                out.append(pytest.param(name, blocks, edtl, id=f"{name}-{blocks:#x}-edtl{edtl:#x}"))
    return out


def _check(r, name: str, blocks: int, edtl: int, width: int) -> None:
    """The answer is GOOD with the right residual, or a CHECK CONDITION that
    says why (and whose residual, if flagged, is still exact)."""
    xfer = (blocks or (256 if width == 8 else 0)) * BS
    if r.status == CHECK_CONDITION:
        assert r.sense, f"{name}: CHECK CONDITION without sense"
        key, asc = r.sense[2] & 0x0F, r.sense[12]
        assert (key, asc) in ((ILLEGAL_REQUEST, ASC_INVALID_FIELD_CDB),
                              (ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE),
                              (ILLEGAL_REQUEST, 0x0E),   # INVALID FIELD IN COMMAND INFORMATION UNIT (short data)
                              (0x0B, 0x4B), (0x05, 0x0C)), r.sense.hex()
    else:
        assert r.status == GOOD, f"{name}: status {r.status:#x}"
    over = r.flags & P.RSP_OVERFLOW
    under = r.flags & P.RSP_UNDERFLOW
    assert not (over and under)
    if r.status == GOOD:
        assert (r.flags & (P.RSP_OVERFLOW | P.RSP_UNDERFLOW), r.residual) == _residual(xfer, edtl), \
            (r.flags, r.residual)
    elif over or under:
        # a failed command reports against the CDB's transfer length or
        # against what was actually transferred (nothing, for a failed read)
        assert (r.flags & (P.RSP_OVERFLOW | P.RSP_UNDERFLOW), r.residual) in (
            _residual(xfer, edtl), _residual(len(r.data), edtl)), (r.flags, r.residual)


def _residual(xfer: int, edtl: int) -> tuple[int, int]:
    if xfer > edtl:
        return P.RSP_OVERFLOW, min(xfer - edtl, RESIDUAL_MAX)
    if xfer < edtl:
        return P.RSP_UNDERFLOW, edtl - xfer
    return 0, 0


class _Live:
    """One server and one logged-in initiator for the whole sweep (a new
    login per case would dominate the run time)."""

    def __init__(self, tmp_path) -> None:
        self.loop = asyncio.new_event_loop()
        lunset = build_lunset({0: (str(tmp_path / "lun0.img"), LUN_BYTES)}, IQN)
        self.srv = IscsiServer([IscsiTargetConfig(IQN, lunset)], [("127.0.0.1", 0)])
        self.run(self.srv.start())
        self.i = Initiator(*self.srv.addresses[0])
        self.run(self.i.login(IQN, immediate_data=True, initial_r2t=False, first_burst=FIRST_BURST,
                              max_burst=MAX_BURST, mrdsl=65536))
        for _ in range(3):        # swallow the power-on unit attention
            if self.run(self.i.scsi(0, bytes(6))).status == GOOD:
                break

    def run(self, coro, timeout: float = 30):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.run(self.i.close())
        self.run(self.srv.stop(timeout=2))
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    lv = _Live(tmp_path_factory.mktemp("sweep"))
    yield lv
    lv.close()


def _no_traceback(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("name,blocks,edtl", _cases(READS))
def test_read_transfer_lengths(live, caplog, name, blocks, edtl):
    build, width = READS[name]
    r = live.run(live.i.scsi(0, build(0, blocks), read_len=edtl or 1, edtl=edtl))
    _check(r, name, blocks, edtl, width)
    assert len(r.data) <= edtl
    assert live.run(live.i.scsi(0, bytes(6))).status == GOOD      # the connection is still up
    _no_traceback(caplog)


@pytest.mark.parametrize("name,blocks,edtl", _cases(WRITES))
def test_write_transfer_lengths(live, caplog, name, blocks, edtl):
    build, width = WRITES[name]
    if edtl <= MAX_SENT:
        r = live.run(live.i.scsi(0, build(0, blocks), data_out=bytes(edtl), edtl=edtl))
    else:
        r = live.run(_write_unsent(live.i, build(0, blocks), edtl))
        assert r.status == CHECK_CONDITION
    _check(r, name, blocks, edtl, width)
    assert live.run(live.i.scsi(0, bytes(6))).status == GOOD
    _no_traceback(caplog)


async def _write_unsent(i: Initiator, cdb: bytes, edtl: int) -> ScsiResult:
    """A WRITE announcing more data than the target accepts per command
    (its max_cmd_data): only the immediate part is sent; the target must
    fail the command at once instead of soliciting gigabytes."""
    itt = i.new_itt()
    q = i.queues[itt] = asyncio.Queue()
    try:
        await i._wait_window()
        bhs = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_WRITE | P.FLAG_FINAL | 1, lun=0, itt=itt,
                          fields={20: edtl, 24: i.cmdsn, 28: i.exp_statsn},
                          raw={32: cdb.ljust(16, b"\0")})
        i.send(bhs, bytes(min(i.first_burst, i.target_mrdsl)))
        i.cmdsn = (i.cmdsn + 1) & 0xFFFFFFFF
        pdu = await i._get(q)
        assert pdu.opcode == P.OP_SCSI_RSP, f"opcode {pdu.opcode:#x}"
        res = ScsiResult(pdu.bhs[3], b"", b"", pdu, residual=pdu.u32(44), flags=pdu.flags)
        if len(pdu.data) >= 2:
            sl = struct.unpack_from(">H", pdu.data, 0)[0]
            res.sense = bytes(pdu.data[2:2 + sl])
        return res
    finally:
        i.queues.pop(itt, None)
