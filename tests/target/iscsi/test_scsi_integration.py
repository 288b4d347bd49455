"""The iSCSI transport over the real SCSI emulation: target.scsi LunSet of
ScsiDevices over PlainLunIO(FileBlockStore), driven by the test initiator."""
from __future__ import annotations

import asyncio
import os
import struct

import pytest

pytest.importorskip("target.scsi.lunset")

from target.iscsi import IscsiServer, IscsiTargetConfig  # noqa: E402
from target.iscsi.__main__ import build_lunset  # noqa: E402

from .initiator import Initiator  # noqa: E402

IQN = "iqn.2025-01.org.test:scsi-integration"


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def ready(i: Initiator, lun: int) -> None:
    """Swallow the power-on/reset unit attention a fresh nexus gets."""
    for _ in range(5):
        r = await i.scsi(lun, bytes(6))
        if r.status == 0:
            return
        assert r.status == 2 and (r.sense[2] & 0x0F) == 6, r.sense.hex()
    raise AssertionError("TEST UNIT READY never succeeded")


async def start(tmp_path, **kw):
    files = {0: (str(tmp_path / "lun0.img"), 32 << 20), 5: (str(tmp_path / "lun5.img"), 4 << 20)}
    lunset = build_lunset(files, IQN)
    srv = IscsiServer([IscsiTargetConfig(IQN, lunset)], [("127.0.0.1", 0)], **kw)
    await srv.start()
    return srv, files


def test_io_inquiry_capacity_report_luns(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        try:
            i = Initiator(*srv.addresses[0])
            await i.login(IQN, header_digest="CRC32C", data_digest="CRC32C", immediate_data=True,
                          initial_r2t=False, first_burst=65536, max_burst=131072, mrdsl=32768)
            await ready(i, 0)
            r = await i.scsi(0, bytes((0x12, 0, 0, 0, 255, 0)), read_len=255)
            assert r.status == 0 and r.data[0] == 0 and b"liverestore" in r.data[16:32]
            r = await i.scsi(0, struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), read_len=32)
            last_lba, bs = struct.unpack_from(">QI", r.data)
            assert (last_lba + 1) * bs == 32 << 20
            r = await i.scsi(0, bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)), read_len=256)
            assert r.data[:4] == (16).to_bytes(4, "big") and r.data[8:10] == b"\0\0" and r.data[17] == 5
            data = os.urandom(1 << 20)
            await i.write(0, 2048, data)
            assert await i.read(0, 2048, 2048) == data
            with open(files[0][0], "rb") as f:
                f.seek(2048 * 512)
                assert f.read(1 << 20) == data
            # a LUN that does not exist
            r = await i.scsi(7, bytes(6))
            assert r.status == 2 and (r.sense[2] & 0x0F) == 5
            assert await i.logout() == 0
            await i.close()
        finally:
            await srv.stop()
    run(main())


def pr_out(sa: int, rtype: int, key: int, sakey: int) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBHIB", 0x5F, sa, rtype, 0, 24, 0)
    params = struct.pack(">QQIBBH", key, sakey, 0, 0, 0, 0)
    return cdb, params


def test_persistent_reservations_see_distinct_nexuses(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        try:
            a = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:host-a")
            b = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:host-b")
            await a.login(IQN)
            await b.login(IQN)
            await ready(a, 0)
            await ready(b, 0)
            cdb, params = pr_out(0x00, 0, 0, 0xAAAA)        # REGISTER
            assert (await a.scsi(0, cdb, data_out=params)).status == 0
            cdb, params = pr_out(0x01, 0x01, 0xAAAA, 0)     # RESERVE, Write Exclusive
            assert (await a.scsi(0, cdb, data_out=params)).status == 0
            # b is not the holder: its write is refused, a's goes through
            wcdb = struct.pack(">BBQIBB", 0x8A, 0, 0, 1, 0, 0)
            assert (await b.scsi(0, wcdb, data_out=b"b" * 512)).status == 0x18
            assert (await a.scsi(0, wcdb, data_out=b"a" * 512)).status == 0
            # READ FULL STATUS reports a's iSCSI TransportID (format 01h, with ISID)
            r = await a.scsi(0, struct.pack(">BB5sHB", 0x5E, 0x03, b"", 1024, 0), read_len=1024)
            assert r.status == 0
            tid_len = struct.unpack_from(">I", r.data, 8 + 20)[0]
            tid = r.data[8 + 24: 8 + 24 + tid_len]
            assert tid[0] == 0x45
            assert tid[4:].rstrip(b"\0").decode() == f"{a.name},i,0x{a.isid.hex()}"
            # a logs out: its nexus goes, yet the registration persists (SPC-4)
            assert await a.logout() == 0
            await a.close()
            await b.close()
        finally:
            await srv.stop()
    run(main())


def test_lun_reset_through_lunset(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        try:
            i = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:resetter")
            j = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:bystander")
            await i.login(IQN)
            await j.login(IQN)
            await ready(i, 5)
            await ready(j, 5)
            assert await i.tmf(5, 5) == 0                    # LUN RESET
            await ready(i, 5)        # (whether the issuer sees the UA too is the SCSI layer's call)
            # the other nexus gets BUS DEVICE RESET FUNCTION OCCURRED (29/03)
            r = await j.scsi(5, bytes(6))
            assert r.status == 2 and (r.sense[2] & 0x0F) == 6 and r.sense[12:14] == b"\x29\x03"
            assert await i.tmf(5, 9) == 2                    # no such LUN
            await i.close()
            await j.close()
        finally:
            await srv.stop()
    run(main())


def test_commands_answered_at_once_leave_nothing_behind(tmp_path):
    """4 KiB reads and writes the SCSI layer completes at once take the data
    path's synchronous way (no coroutine): every answer is right (an odd
    length one padded), and once all are answered the session holds no
    budget, no task and no CmdSN slot."""
    async def main():
        srv, _ = await start(tmp_path)
        try:
            i = Initiator(*srv.addresses[0])
            await i.login(IQN, immediate_data=True, initial_r2t=False, first_burst=65536)
            await ready(i, 0)
            blocks = {lba: os.urandom(4096) for lba in range(0, 512, 8)}
            await asyncio.gather(*(i.write(0, lba, d) for lba, d in blocks.items()))
            got = await asyncio.gather(*(i.read(0, lba, 8) for lba in blocks))
            assert got == list(blocks.values())
            r = await i.scsi(0, bytes((0x12, 0, 0, 0, 5, 0)), read_len=5)     # INQUIRY, 5 bytes
            assert r.status == 0 and len(r.data) == 5 and r.data[0] == 0
            (s,) = srv.sessions.values()
            assert s.budget.used == 0 and srv.memory.used == 0
            assert not s.tasks and s.window.inflight == 0
            assert s.window.max_cmdsn == (s.window.exp_cmdsn + s.window.depth - 1) % (1 << 32)
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_queued_byte_count_is_exact_for_every_kind_of_answer(tmp_path):
    """The connection takes a writev that wrote its queued byte count as
    having written every queued buffer, so that count must be exact
    whatever was queued: Data-In with status (padded or not), a read split
    into several Data-In PDUs, R2Ts, SCSI Responses with and without sense,
    NOP-In, with and without digests. An overcount would only cost a walk
    of the buffers; an undercount would lose answers."""
    from target.iscsi import pdu as P

    async def main():
        srv, _ = await start(tmp_path)
        try:
            for digest in ("None", "CRC32C"):
                i = Initiator(*srv.addresses[0])
                await i.login(IQN, header_digest=digest, data_digest=digest, mrdsl=8192,
                              immediate_data=True, initial_r2t=False, first_burst=4096, max_burst=16384)
                await ready(i, 0)
                conn = next(c for c in srv.connections if c.session is not None and not c.closing)
                flush = conn.flush
                checked = []

                def checking_flush():
                    assert conn._wbytes == P.wire_len(conn._wbuf), digest
                    checked.append(len(conn._wbuf))
                    flush()
                conn.flush = checking_flush
                await i.write(0, 0, os.urandom(40960))                    # R2Ts, then a status
                await asyncio.gather(i.read(0, 0, 8), i.read(0, 3, 1), i.read(0, 0, 80))
                r = await i.scsi(0, struct.pack(">BBIBHB", 0x28, 0, 0xFFFFFFF0, 0, 8, 0), read_len=4096)
                assert r.status == 0x02 and r.sense                       # with sense data
                r = await i.scsi(0, bytes((0x12, 0, 0, 0, 5, 0)), read_len=5)   # padded Data-In
                assert r.status == 0 and len(r.data) == 5
                await i.nop(b"ping!")
                assert sum(checked) >= 10
                await i.close()
        finally:
            await srv.stop()
    run(main())
