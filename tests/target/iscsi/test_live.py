"""End-to-end over loopback: the test initiator against a live IscsiServer
with the fake SCSI target."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

import pytest

from target.iscsi import IscsiServer, IscsiTargetConfig, TargetPreferences
from target.iscsi import pdu as P

from .fake_scsi import FakeScsiTarget, MemLun
from .initiator import Initiator, InitiatorError, LoginError

IQN = "iqn.2025-01.org.test:disk"
IQN2 = "iqn.2025-01.org.test:secret-disk"


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(targets=None, portals=(("127.0.0.1", 0),), fake=None, **kw):
    fake = fake or FakeScsiTarget({0: MemLun(4 << 20), 1: MemLun(1 << 20)})
    if targets is None:
        targets = [IscsiTargetConfig(IQN, fake, alias="disk")]
    srv = IscsiServer(targets, portals, **kw)
    await srv.start()
    try:
        yield srv, fake
    finally:
        await srv.stop(timeout=5)


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def addr(srv):
    return srv.addresses[0]


async def logged_in(srv, target=IQN, **kw) -> Initiator:
    i = Initiator(*addr(srv), **{k: kw.pop(k) for k in ("name", "isid") if k in kw})
    await i.login(target, **kw)
    return i


# -- discovery ------------------------------------------------------------------------

def test_discovery_lists_only_visible_targets():
    async def main():
        fake = FakeScsiTarget()
        targets = [IscsiTargetConfig(IQN, fake, tpgt=3),
                   IscsiTargetConfig(IQN2, fake, acl={"iqn.2025-01.org.test:someone-else"})]
        async with serving(targets, portals=[("127.0.0.1", 0), ("::1", 0)]) as (srv, _):
            i = Initiator(*addr(srv))
            await i.login(discovery=True)
            got = await i.send_targets("All")
            ports = [p for h, p in srv.addresses]
            assert got == [("TargetName", IQN),
                           ("TargetAddress", f"127.0.0.1:{ports[0]},3"),
                           ("TargetAddress", f"[::1]:{ports[1]},3")]
            assert await i.send_targets(IQN2) == []          # hidden by its ACL
            assert (await i.send_targets(IQN))[0] == ("TargetName", IQN)
            assert await i.logout() == 0
            await i.close()
            j = Initiator(*addr(srv), name="iqn.2025-01.org.test:someone-else")
            await j.login(discovery=True)
            names = [v for k, v in await j.send_targets() if k == "TargetName"]
            assert names == [IQN, IQN2]
            await j.close()
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    run(main())


def test_discovery_chap():
    async def main():
        async with serving(discovery_chap=("disc", "discovery-secret"),
                           discovery_mutual_chap=("tgt", "target-secret")) as (srv, _):
            i = Initiator(*addr(srv))
            with pytest.raises(LoginError) as ei:
                await i.login(discovery=True)
            assert ei.value.status == (2, 1)
            await i.close()
            j = Initiator(*addr(srv))
            await j.login(discovery=True, chap=("disc", "discovery-secret"),
                          mutual=("tgt", "target-secret"))
            assert (await j.send_targets())[0] == ("TargetName", IQN)
            await j.close()
    run(main())


def test_discovery_session_refuses_scsi_commands():
    async def main():
        async with serving() as (srv, _):
            i = Initiator(*addr(srv))
            await i.login(discovery=True)
            with pytest.raises(InitiatorError, match="rejected"):
                await i.scsi(0, bytes(6))           # TEST UNIT READY
            await i.close()
    run(main())


def test_sendtargets_continuation_for_long_answers():
    async def main():
        fake = FakeScsiTarget()
        targets = [IscsiTargetConfig(f"iqn.2025-01.org.test:target-with-a-long-name-{n:04d}", fake)
                   for n in range(200)]
        async with serving(targets) as (srv, _):
            i = Initiator(*addr(srv))
            await i.login(discovery=True, mrdsl=512)
            got = await i.send_targets()
            assert [v for k, v in got if k == "TargetName"] == [t.iqn for t in targets]
            await i.close()
    run(main())


# -- login ------------------------------------------------------------------------------

def test_login_failures_have_status():
    async def main():
        fake = FakeScsiTarget()
        targets = [IscsiTargetConfig(IQN, fake, acl={"iqn.2025-01.org.test:allowed"}),
                   IscsiTargetConfig(IQN2, fake, chap=("alice", "alice-secret1"))]
        async with serving(targets) as (srv, _):
            for target, kw, st in [
                ("iqn.2025-01.org.test:nope", {}, (2, 3)),
                (IQN, {}, (2, 2)),
                (IQN2, {}, (2, 1)),
                (IQN2, {"chap": ("alice", "wrong-secret")}, (2, 1)),
                (IQN2, {"chap": ("bob", "alice-secret1")}, (2, 1)),
            ]:
                i = Initiator(*addr(srv))
                with pytest.raises(LoginError) as ei:
                    await i.login(target, **kw)
                assert ei.value.status == st, target
                # the target closes the connection after a failed login
                assert await i.reader.read(1) == b""
                await i.close()
            assert srv.stats()["sessions"] == 0
    run(main())


def test_chap_and_mutual_chap_login():
    async def main():
        fake = FakeScsiTarget()
        targets = [IscsiTargetConfig(IQN2, fake, chap=("alice", "alice-secret1"),
                                     mutual_chap=("target", "target-secret"))]
        async with serving(targets) as (srv, _):
            i = Initiator(*addr(srv))
            await i.login(IQN2, chap=("alice", "alice-secret1"))
            assert (await i.scsi(0, bytes(6))).status == 0
            await i.close()
            j = Initiator(*addr(srv))
            await j.login(IQN2, chap=("alice", "alice-secret1"), mutual=("target", "target-secret"))
            assert (await j.scsi(0, bytes(6))).status == 0
            await j.close()
    run(main())


# -- data transfer ------------------------------------------------------------------------

WRITE_COMBOS = [
    # immediate_data, initial_r2t, first_burst, max_burst, target mrdsl, max_outstanding_r2t, length
    (True, False, 65536, 262144, 262144, 1, 1 << 20),
    (True, True, 65536, 262144, 262144, 1, 1 << 20),
    (False, True, 65536, 262144, 262144, 4, 1 << 20),
    (False, False, 65536, 65536, 8192, 2, 300 * 1024),
    (True, False, 8192, 16384, 4096, 3, 100 * 512),
    (True, False, 262144, 262144, 262144, 1, 4096),       # fits in immediate data
    (False, False, 16384, 16384, 8192, 1, 16384),         # all unsolicited Data-Out
]


@pytest.mark.parametrize("imm,ir2t,fbl,mbl,mrdsl,mor2t,length", WRITE_COMBOS)
def test_write_read_combos(imm, ir2t, fbl, mbl, mrdsl, mor2t, length):
    async def main():
        prefs = TargetPreferences(max_recv_data_segment_length=mrdsl)
        async with serving(prefs=prefs) as (srv, fake):
            i = await logged_in(srv, immediate_data=imm, initial_r2t=ir2t, first_burst=fbl,
                                max_burst=mbl, max_outstanding_r2t=mor2t)
            assert i.target_mrdsl == mrdsl
            data = os.urandom(length)
            r = await i.write(0, 8, data)
            assert r.response.u32(36) == len(r.r2ts)          # ExpDataSN counts the R2Ts
            sent_unsolicited = 0
            if imm:
                sent_unsolicited = min(fbl, mrdsl, length)
            if not ir2t:
                sent_unsolicited = min(fbl, length)
            solicited = sum(p.u32(44) for p in r.r2ts)
            assert solicited == length - sent_unsolicited
            assert all(p.u32(44) <= mbl for p in r.r2ts)
            offsets = [p.u32(40) for p in r.r2ts]
            assert offsets == sorted(offsets)
            assert fake.luns_map[0].data[8 * 512: 8 * 512 + length] == data
            assert await i.read(0, 8, length // 512) == data
            await i.close()
    run(main())


def test_big_read_split_into_data_in_pdus():
    async def main():
        async with serving() as (srv, fake):
            pattern = os.urandom(1 << 20)
            fake.luns_map[0].data[: 1 << 20] = pattern
            i = await logged_in(srv, mrdsl=8192, max_burst=65536)
            r = await i.scsi(0, struct.pack(">BBQIBB", 0x88, 0, 0, 2048, 0, 0), read_len=1 << 20)
            assert r.status == 0 and r.data == pattern
            assert len(r.datain) == 128
            assert all(len(p.data) == 8192 for p in r.datain)
            assert [p.u32(36) for p in r.datain] == list(range(128))           # DataSN
            assert [p.u32(40) for p in r.datain] == [n * 8192 for n in range(128)]
            finals = [n for n, p in enumerate(r.datain) if p.flags & P.FLAG_FINAL]
            assert finals == [n for n in range(128) if n % 8 == 7]            # MaxBurstLength sequences
            status = [n for n, p in enumerate(r.datain) if p.flags & P.DATAIN_STATUS]
            assert status == [127]                                           # phase collapse
            assert all(p.ttt == P.ALL_ONES for p in r.datain)
            await i.close()
    run(main())


def test_digests_on():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, header_digest="CRC32C,None", data_digest="CRC32C,None",
                                mrdsl=16384)
            assert i.hd and i.dd
            data = os.urandom(200 * 512 + 0)
            await i.write(0, 0, data)
            assert await i.read(0, 0, 200) == data
            assert (await i.nop(b"abc")).data == b"abc"            # padded + digested
            await i.close()
    run(main())


@pytest.mark.parametrize("digests", [False, True])
def test_large_data_out_received_in_place(digests):
    async def main():
        async with serving(fake=FakeScsiTarget({0: MemLun(16 << 20)})) as (srv, fake):
            i = await logged_in(srv, header_digest="CRC32C" if digests else "None",
                                data_digest="CRC32C" if digests else "None",
                                immediate_data=False, initial_r2t=True, max_burst=1 << 20,
                                max_outstanding_r2t=2)
            for n in range(4):
                data = os.urandom((4 << 20) - 512 * n)      # odd sizes: padding on the last PDU
                await i.write(0, n * 8192, data)
                assert fake.luns_map[0].data[n * 8192 * 512:n * 8192 * 512 + len(data)] == data
            conn = next(iter(srv.connections))
            assert conn.direct_pdus > 0
            # a corrupted payload received in place is still caught by the data digest
            if digests:
                itt = i.new_itt()
                q = i.queues[itt] = asyncio.Queue()
                cmd = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_WRITE | 1, lun=0, itt=itt,
                                  fields={20: 65536, 24: i.cmdsn, 28: i.exp_statsn},
                                  raw={32: struct.pack(">BBQIBB", 0x8A, 0, 0, 128, 0, 0)})
                i.send(cmd)
                i.cmdsn += 1
                r2t = await asyncio.wait_for(q.get(), 5)
                bhs = P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL, lun=0, itt=itt,
                                  fields={20: r2t.ttt, 40: 0})
                raw = bytearray(P.encode_bytes(bhs, b"q" * 65536, header_digest=True, data_digest=True))
                raw[-10] ^= 1
                before = conn.direct_pdus
                i.send_raw(bytes(raw[:100]))
                await asyncio.sleep(0.05)
                i.send_raw(bytes(raw[100:]))
                rej = await asyncio.wait_for(i.rejects.get(), 5)
                assert rej.bhs[2] == P.REJECT_DATA_DIGEST
                assert conn.direct_pdus == before
            await i.close()
    run(main())


def test_data_out_already_sent_is_read_on_without_a_loop_turn():
    """A bulk writer is ahead of the target: the rest of a big payload (and
    the next PDU) is read at once in the same wake-up (connection._pull),
    at most PULL_READS reads per wake-up, and the data lands intact; the
    header read on is read alone, so its payload is not copied."""
    from target.iscsi import connection as C

    async def main():
        async with serving(fake=FakeScsiTarget({0: MemLun(16 << 20)})) as (srv, fake):
            i = await logged_in(srv, immediate_data=False, initial_r2t=True, max_burst=1 << 20,
                                max_outstanding_r2t=4)
            conn = next(iter(srv.connections))
            wakeups = most = 0
            updated = conn.buffer_updated

            def counted(nbytes: int) -> None:
                nonlocal wakeups, most
                wakeups += 1
                before = conn.pulled_reads
                updated(nbytes)
                most = max(most, conn.pulled_reads - before)
            conn.buffer_updated = counted
            through_buffer = []           # payload bytes that came with their header
            start_direct = conn._start_direct

            def watched(s: int, hlen: int, dlen: int, avail: int) -> bool:
                through_buffer.append(avail - hlen)
                return start_direct(s, hlen, dlen, avail)
            conn._start_direct = watched
            for n in range(4):
                data = os.urandom(4 << 20)
                await i.write(0, n * 8192, data)
                assert fake.luns_map[0].data[n * 8192 * 512:n * 8192 * 512 + len(data)] == data
            assert conn.direct_pdus >= 64 and conn.pulled_reads > 0
            # the rest of a payload and the next header came without a poll
            assert wakeups < 2 * conn.direct_pdus
            assert most <= C.PULL_READS          # the loop's other work is not starved
            # read on after a placed payload, the next header comes alone: its
            # payload then goes straight to its buffer, none copied from ours
            assert through_buffer.count(0) >= len(through_buffer) // 2
            await i.close()
    run(main())


def test_bad_data_digest_gets_reject_and_drop():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, header_digest="CRC32C", data_digest="CRC32C", start_reader=False)
            bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, lun=0, itt=77,
                              fields={20: P.ALL_ONES, 24: i.cmdsn, 28: i.exp_statsn})
            raw = bytearray(P.encode_bytes(bhs, b"ping", header_digest=True, data_digest=True))
            raw[-1] ^= 0xFF
            i.send_raw(bytes(raw))
            rej = await i.recv()
            assert rej.opcode == P.OP_REJECT and rej.bhs[2] == P.REJECT_DATA_DIGEST
            assert rej.data[:48] == bytes(bhs[:48])
            assert await i.reader.read(1) == b""
            await i.close()
    run(main())


def test_residuals_and_sense():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            # READ of 1 block with EDTL 1024: underflow of 512
            cdb = struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0)
            r = await i.scsi(0, cdb, read_len=1024)
            assert r.status == 0 and len(r.data) == 512
            assert r.flags & P.DATAIN_UNDERFLOW and r.residual == 512
            # READ of 2 blocks with EDTL 512: overflow of 512, only EDTL bytes sent
            cdb = struct.pack(">BBQIBB", 0x88, 0, 0, 2, 0, 0)
            r = await i.scsi(0, cdb, read_len=512)
            assert len(r.data) == 512 and r.flags & P.DATAIN_OVERFLOW and r.residual == 512
            # out of range: CHECK CONDITION with sense in a SCSI Response
            cdb = struct.pack(">BBQIBB", 0x88, 0, 1 << 40, 1, 0, 0)
            r = await i.scsi(0, cdb, read_len=512)
            assert r.response.opcode == P.OP_SCSI_RSP and r.status == 2
            assert r.sense[2] == 5 and r.sense[12] == 0x21
            assert r.flags & P.RSP_UNDERFLOW and r.residual == 512
            # INQUIRY through LUN 1, REPORT LUNS
            r = await i.scsi(1, bytes((0x12, 0, 0, 0, 96, 0)), read_len=96)
            assert r.data[8:16] == b"LIVERST " and r.flags & P.DATAIN_UNDERFLOW and r.residual == 60
            r = await i.scsi(0, bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)), read_len=256)
            assert r.data[:4] == (16).to_bytes(4, "big")
            # extended CDB via AHS reaches the SCSI layer whole (unknown opcode -> sense)
            r = await i.scsi(0, bytes([0x7F]) + bytes(31))
            assert r.status == 2 and fake.executed[-1][1] == bytes([0x7F]) + bytes(31)
            await i.close()
    run(main())


def test_scsi_layer_exception_becomes_check_condition():
    async def main():
        class Exploding(FakeScsiTarget):
            async def execute(self, cmd):
                if cmd.cdb[0] == 0xEE:
                    raise RuntimeError("boom")
                return await super().execute(cmd)
        async with serving(fake=Exploding()) as (srv, fake):
            i = await logged_in(srv, extra=[("X-com.example.Frob", "1"), ("UnheardOf", "2")])
            assert i.answers["X-com.example.Frob"] == "NotUnderstood"
            assert i.answers["UnheardOf"] == "NotUnderstood"
            r = await i.scsi(0, bytes((0xEE, 0, 0, 0, 0, 0)))
            assert r.status == 2 and (r.sense[2] & 0x0F, r.sense[12]) == (0x04, 0x44)
            assert (await i.scsi(0, bytes(6))).status == 0
            await i.close()
    run(main())


def test_immediate_command_and_statsn_sequence():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            for n in range(5):
                await i.scsi(0, bytes(6), immediate=(n % 2 == 0))
            await i.nop(b"x")
            await i.nop(b"y", immediate=False)
            sts = i.statsns
            assert all((b - a) % (1 << 32) == 1 for a, b in zip(sts, sts[1:])), sts
            await i.close()
    run(main())


# -- NOP --------------------------------------------------------------------------------

def test_nop_ping_and_keepalive():
    async def main():
        async with serving(nop_interval=0.2, nop_timeout=0.6) as (srv, fake):
            i = await logged_in(srv)
            rsp = await i.nop(b"ping-data" * 10)
            assert rsp.opcode == P.OP_NOP_IN and rsp.data == b"ping-data" * 10 and rsp.ttt == P.ALL_ONES
            for _ in range(100):                  # the target pings an idle initiator...
                if len(i.nopins) >= 3:
                    break
                await asyncio.sleep(0.05)
            assert len(i.nopins) >= 3 and all(p.ttt != P.ALL_ONES for p in i.nopins)
            assert srv.stats()["connections"] == 1      # ... and we answered, so we stay
            i.answer_nops = False
            for _ in range(200):                  # silent initiator: dropped
                if i.closed:
                    break
                await asyncio.sleep(0.05)
            assert i.closed
            assert srv.stats()["sessions"] == 0 and len(fake.lost) == 1
            await i.close()
    run(main())


# -- task management ---------------------------------------------------------------------

def test_abort_task():
    async def main():
        async with serving() as (srv, fake):
            fake.gate = asyncio.Event()
            i = await logged_in(srv)
            itt_before = i.itt
            read = asyncio.ensure_future(i.read(0, 0, 8))
            for _ in range(100):
                if fake.executed:
                    break
                await asyncio.sleep(0.01)
            assert await i.tmf(P.TMF_ABORT_TASK, 0, ref_itt=itt_before + 1) == P.TMF_RSP_COMPLETE
            assert fake.cancelled == 1
            assert await i.tmf(P.TMF_ABORT_TASK, 0, ref_itt=0x7777) == P.TMF_RSP_NO_TASK
            fake.gate.set()
            done, _ = await asyncio.wait([read], timeout=0.3)
            assert not done                         # no response for an aborted task
            read.cancel()
            assert (await i.scsi(0, bytes(6))).status == 0
            assert await i.read(0, 0, 1) == bytes(512)
            await i.close()
    run(main())


def test_abort_write_waiting_for_data():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, immediate_data=False, initial_r2t=True, start_reader=False)
            i.start_reader()
            # a write whose data we never send: the target holds it waiting for Data-Out
            itt = i.new_itt()
            q = i.queues[itt] = asyncio.Queue()
            bhs = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_WRITE | 1, lun=0, itt=itt,
                              fields={20: 4096, 24: i.cmdsn, 28: i.exp_statsn},
                              raw={32: struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0)})
            i.send(bhs)
            i.cmdsn += 1
            r2t = await asyncio.wait_for(q.get(), 5)
            assert r2t.opcode == P.OP_R2T and r2t.u32(44) == 4096
            assert await i.tmf(P.TMF_ABORT_TASK, 0, ref_itt=itt) == P.TMF_RSP_COMPLETE
            assert q.empty()
            assert srv.stats()["in_flight"] == 0
            assert (await i.scsi(0, bytes(6))).status == 0
            await i.close()
    run(main())


def test_lun_reset_and_other_tmfs():
    async def main():
        async with serving() as (srv, fake):
            fake.gate = asyncio.Event()
            i = await logged_in(srv)
            j = await logged_in(srv)
            r1 = asyncio.ensure_future(i.read(0, 0, 1))
            r2 = asyncio.ensure_future(j.scsi(0, struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0), read_len=512))
            for _ in range(100):
                if len(fake.executed) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert await i.tmf(P.TMF_LUN_RESET, 0) == P.TMF_RSP_COMPLETE
            assert fake.lun_resets == [0]
            # the other session's command ends with TASK ABORTED
            r = await asyncio.wait_for(r2, 5)
            assert r.status == 0x40
            r1.cancel()
            assert await i.tmf(P.TMF_LUN_RESET, 9) == P.TMF_RSP_NO_LUN
            assert await i.tmf(P.TMF_ABORT_TASK_SET, 1) == P.TMF_RSP_COMPLETE
            assert await i.tmf(P.TMF_CLEAR_TASK_SET, 1) == P.TMF_RSP_COMPLETE
            assert await i.tmf(P.TMF_CLEAR_ACA, 0) == P.TMF_RSP_NOT_SUPPORTED
            assert await i.tmf(P.TMF_TASK_REASSIGN, 0) == P.TMF_RSP_REASSIGN_NOT_SUPPORTED
            assert await i.tmf(0x30, 0) == P.TMF_RSP_NOT_SUPPORTED
            assert await i.tmf(P.TMF_TARGET_WARM_RESET, 0) == P.TMF_RSP_COMPLETE
            assert fake.target_resets == 1
            fake.gate.set()
            assert (await j.scsi(0, bytes(6))).status == 0
            assert await i.tmf(P.TMF_TARGET_COLD_RESET, 0) == P.TMF_RSP_COMPLETE
            for _ in range(100):
                if i.closed and j.closed:
                    break
                await asyncio.sleep(0.02)
            assert i.closed and j.closed              # cold reset drops every session
            await i.close()
            await j.close()
    run(main())


# -- logout, reinstatement, concurrency ----------------------------------------------------

def test_logout_ends_writes_still_waiting_for_data():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, immediate_data=False, initial_r2t=True)
            itt, q = await _write_cmd(i, 8)
            assert (await asyncio.wait_for(q.get(), 5)).opcode == P.OP_R2T
            # no Data-Out: log out right away; the target must not wait for it
            assert await asyncio.wait_for(i.logout(), 5) == P.LOGOUT_RSP_OK
            assert not fake.executed
            await i.close()
    run(main())


def test_logout_closes_and_reports_nexus_lost():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            await i.write(0, 0, b"\1" * 4096)
            assert await i.logout(P.LOGOUT_REMOVE_FOR_RECOVERY) == P.LOGOUT_RSP_RECOVERY_NOT_SUPPORTED
            assert await i.logout() == P.LOGOUT_RSP_OK
            for _ in range(100):
                if i.closed:
                    break
                await asyncio.sleep(0.02)
            assert i.closed and srv.stats()["sessions"] == 0
            assert [n.initiator for n in fake.lost] == [f"{i.name},i,0x{i.isid.hex()}"]
            n = fake.lost[0]
            assert n.target_port == f"{IQN},t,0x0001" and n.initiator_name == i.name
            tid = n.transport_id
            assert tid[0] == 0x45 and int.from_bytes(tid[2:4], "big") == len(tid) - 4
            assert tid[4:].rstrip(b"\0").decode() == n.initiator and len(tid) % 4 == 0
            await i.close()
    run(main())


def test_session_reinstatement():
    async def main():
        async with serving() as (srv, fake):
            isid = bytes.fromhex("400001370042")
            a = await logged_in(srv, isid=isid)
            b = await logged_in(srv, isid=isid)
            for _ in range(100):
                if a.closed:
                    break
                await asyncio.sleep(0.02)
            assert a.closed and not b.closed
            assert srv.stats()["sessions"] == 1
            assert (await b.scsi(0, bytes(6))).status == 0
            await a.close()
            await b.close()
    run(main())


def test_four_concurrent_sessions():
    async def main():
        async with serving(fake=FakeScsiTarget({0: MemLun(8 << 20)})) as (srv, fake):
            inits = [await logged_in(srv, mrdsl=[8192, 65536, 262144, 4096][n]) for n in range(4)]
            assert srv.stats()["sessions"] == 4

            async def worker(n, ini):
                for k in range(6):
                    lba = (n * 6 + k) * 128
                    data = bytes([n * 16 + k]) * (128 * 512)
                    await ini.write(0, lba, data)
                    assert await ini.read(0, lba, 128) == data
                await asyncio.gather(*(ini.read(0, n * 768, 16) for _ in range(20)))
            await asyncio.gather(*(worker(n, ini) for n, ini in enumerate(inits)))
            assert srv.stats()["targets"][IQN]["sessions"] == 4
            for ini in inits:
                assert await ini.logout() == 0
                await ini.close()
    run(main())


def test_many_sessions_full_queue():
    """32 sessions log in at once and each keeps 32 commands in flight."""
    async def main():
        async with serving(fake=FakeScsiTarget({0: MemLun(4 << 20)})) as (srv, fake):
            inits = [Initiator(*addr(srv), name=f"iqn.2025-01.org.test:host{n}") for n in range(32)]
            await asyncio.gather(*(i.login(IQN, mrdsl=8192) for i in inits))
            assert srv.stats()["sessions"] == 32

            async def worker(n, ini):
                data = bytes([n]) * 4096
                await ini.write(0, n * 8, data)
                got = await asyncio.gather(*(ini.read(0, n * 8, 8) for _ in range(32)))
                assert all(g == data for g in got)
            await asyncio.gather(*(worker(n, ini) for n, ini in enumerate(inits)))
            await asyncio.gather(*(i.logout() for i in inits))
            for i in inits:
                await i.close()
            for _ in range(100):
                if srv.stats()["sessions"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert srv.stats()["sessions"] == 0 and len(fake.lost) == 32
    run(main())


def test_queue_depth_and_ordering():
    async def main():
        async with serving(queue_depth=8) as (srv, fake):
            i = await logged_in(srv)
            assert (i.max_cmdsn - i.cmdsn) % (1 << 32) == 7
            fake.gate = asyncio.Event()
            reads = [asyncio.ensure_future(i.read(0, n, 1)) for n in range(8)]
            for _ in range(100):
                if len(fake.executed) >= 8:
                    break
                await asyncio.sleep(0.01)
            lbas = [struct.unpack_from(">Q", cdb, 2)[0] for _, cdb in fake.executed]
            assert lbas == list(range(8))               # delivered in CmdSN order
            # window is full: the target does not open it until commands complete
            assert (i.max_cmdsn - i.cmdsn) % (1 << 32) == (1 << 32) - 1
            fake.gate.set()
            await asyncio.gather(*reads)
            assert (i.max_cmdsn - i.cmdsn) % (1 << 32) == 7
            await i.close()
    run(main())


def test_ordered_and_head_of_queue_task_attributes():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            fake.gate = asyncio.Event()
            a = asyncio.ensure_future(i.read(0, 0, 1))                       # SIMPLE, held by the gate
            await asyncio.sleep(0.05)
            tur = bytes(6)
            b = asyncio.ensure_future(i.scsi(0, bytes((0x00, 0, 0, 0, 0, 0xB0))[:6], attr=2))   # ORDERED
            c = asyncio.ensure_future(i.scsi(0, bytes((0x00, 0, 0, 0, 0, 0xC0))[:6], attr=1))   # SIMPLE
            d = asyncio.ensure_future(i.scsi(0, bytes((0x00, 0, 0, 0, 0, 0xD0))[:6], attr=3))   # HEAD OF QUEUE
            await asyncio.wait_for(d, 5)
            await asyncio.sleep(0.1)
            assert not b.done() and not c.done()
            ctl = [cdb[5] for _, cdb in fake.executed if cdb[0] == 0]
            assert ctl == [0xD0]
            fake.gate.set()
            await asyncio.gather(a, b, c)
            ctl = [cdb[5] for _, cdb in fake.executed if cdb[0] == 0]
            assert ctl == [0xD0, 0xB0, 0xC0]
            assert (await i.scsi(0, tur, attr=1)).status == 0
            await i.close()
    run(main())


def test_out_of_order_cmdsn_held_until_gap_filled_and_out_of_window_ignored():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            base = i.cmdsn
            q = {}
            def tur(cmdsn):
                itt = i.new_itt()
                q[cmdsn] = i.queues[itt] = asyncio.Queue()
                bhs = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL, lun=0, itt=itt,
                                  fields={20: 0, 24: cmdsn, 28: i.exp_statsn})
                i.send(bhs)
            tur(base + 1)
            tur(base + 100000)               # outside the window: ignored
            await asyncio.sleep(0.1)
            assert all(x.empty() for x in q.values()) and not fake.executed
            tur(base)
            r0 = await asyncio.wait_for(q[base].get(), 5)
            r1 = await asyncio.wait_for(q[base + 1].get(), 5)
            assert r0.opcode == r1.opcode == P.OP_SCSI_RSP
            assert q[base + 100000].empty() and len(fake.executed) == 2
            i.cmdsn = base + 2
            assert (await i.scsi(0, bytes(6))).status == 0
            await i.close()
    run(main())


# -- bad input on a live session -----------------------------------------------------------

def test_reject_unknown_opcode_and_snack():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            for op, reason in ((0x1C, P.REJECT_CMD_NOT_SUPPORTED), (P.OP_SNACK_REQ, P.REJECT_PROTOCOL_ERROR),
                               (P.OP_NOP_IN, P.REJECT_CMD_NOT_SUPPORTED)):
                bhs = P.build_bhs(op, P.FLAG_FINAL, immediate=True, itt=0x1234)
                i.send(bhs)
                rej = await asyncio.wait_for(i.rejects.get(), 5)
                assert rej.bhs[2] == reason and rej.data[:48] == bytes(bhs[:48])
            # duplicate ITT while the first is in flight
            fake.gate = asyncio.Event()
            rd = asyncio.ensure_future(i.read(0, 0, 1))
            await asyncio.sleep(0.05)
            i.route_rejects = False
            bhs = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL, immediate=True, lun=0, itt=i.itt,
                              fields={24: i.cmdsn})
            i.send(bhs)
            rej = await asyncio.wait_for(i.rejects.get(), 5)
            assert rej.bhs[2] == P.REJECT_TASK_IN_PROGRESS
            fake.gate.set()
            assert len(await rd) == 512
            assert (await i.nop(b"still alive")).data == b"still alive"
            await i.close()
    run(main())


def test_oversized_segment_drops_connection_only():
    async def main():
        async with serving() as (srv, fake):
            good = await logged_in(srv)
            bad = await logged_in(srv, start_reader=False)
            bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, itt=5, fields={20: P.ALL_ONES})
            bhs[5:8] = (1 << 24 - 1).to_bytes(3, "big")
            bad.send_raw(bytes(bhs) + bytes(100))
            rej = await bad.recv()
            assert rej.opcode == P.OP_REJECT and rej.bhs[2] == P.REJECT_PROTOCOL_ERROR
            assert await bad.reader.read(1) == b""
            assert (await good.nop(b"ok")).data == b"ok"
            await good.close()
            await bad.close()
    run(main())


async def _write_cmd(i, nblocks, itt=None):
    itt = itt or i.new_itt()
    q = i.queues[itt] = asyncio.Queue()
    cmd = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_WRITE | 1, lun=0, itt=itt,
                      fields={20: nblocks * 512, 24: i.cmdsn, 28: i.exp_statsn},
                      raw={32: struct.pack(">BBQIBB", 0x8A, 0, 0, nblocks, 0, 0)})
    i.send(cmd)
    i.cmdsn += 1
    return itt, q


async def _expect_check(q, key, asc, ascq):
    rsp = await asyncio.wait_for(q.get(), 5)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.bhs[3] == 2
    sense = rsp.data[2:]
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (key, asc, ascq)


def test_bad_data_out_fails_the_command_not_the_connection():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, immediate_data=False, initial_r2t=True)
            bhs = P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL, lun=0, itt=0x999,
                              fields={20: P.ALL_ONES, 40: 0})
            i.send(bhs, b"x" * 512)              # unknown ITT: ignored
            assert (await i.nop(b"a")).data == b"a"
            # wrong buffer offset
            itt, q = await _write_cmd(i, 2)
            r2t = await asyncio.wait_for(q.get(), 5)
            i.send(P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL, lun=0, itt=itt,
                               fields={20: r2t.ttt, 40: 512}), b"y" * 512)
            await _expect_check(q, 0x0B, 0x4B, 0x05)
            # unknown target transfer tag
            itt, q = await _write_cmd(i, 1)
            r2t = await asyncio.wait_for(q.get(), 5)
            i.send(P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL, lun=0, itt=itt,
                               fields={20: r2t.ttt ^ 0x5555, 40: 0}), b"y" * 512)
            await _expect_check(q, 0x0B, 0x4B, 0x01)
            # unsolicited data although InitialR2T=Yes
            itt, q = await _write_cmd(i, 1)
            i.send(P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL, lun=0, itt=itt,
                               fields={20: P.ALL_ONES, 40: 0}), b"y" * 512)
            rsp = await asyncio.wait_for(q.get(), 5)
            if rsp.opcode == P.OP_R2T:          # the R2T may or may not have gone out first
                rsp = await asyncio.wait_for(q.get(), 5)
            assert rsp.opcode == P.OP_SCSI_RSP
            assert rsp.bhs[3] == 2 and rsp.data[2 + 12:2 + 14] == b"\x0c\x0c"
            assert fake.luns_map[0].data[:1024] == bytes(1024)     # nothing written
            assert not fake.executed
            # the session carries on
            await i.write(0, 0, b"k" * 1024)
            assert await i.read(0, 0, 2) == b"k" * 1024
            assert srv.stats()["in_flight"] == 0
            await i.close()
    run(main())


def test_final_bit_on_command_means_no_unsolicited_data():
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, immediate_data=True, initial_r2t=False, first_burst=65536)
            itt = i.new_itt()
            q = i.queues[itt] = asyncio.Queue()
            data = os.urandom(8192)
            cmd = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_WRITE | 1, lun=0, itt=itt,
                              fields={20: 8192, 24: i.cmdsn, 28: i.exp_statsn},
                              raw={32: struct.pack(">BBQIBB", 0x8A, 0, 0, 16, 0, 0)})
            i.send(cmd, data[:1024])        # F=1: only immediate data, the rest by R2T
            i.cmdsn += 1
            r2t = await asyncio.wait_for(q.get(), 5)
            assert r2t.opcode == P.OP_R2T and (r2t.u32(40), r2t.u32(44)) == (1024, 7168)
            i._send_data(itt, 0, r2t.ttt, 1024, 8192, data)
            rsp = await asyncio.wait_for(q.get(), 5)
            assert rsp.opcode == P.OP_SCSI_RSP and rsp.bhs[3] == 0
            assert fake.luns_map[0].data[:8192] == data
            await i.close()
    run(main())


@pytest.mark.parametrize("datasns", [[0, 0], [1, 0], [0, 27], [0xFFFFFFFF, 0]])
def test_data_out_datasn_checked(datasns):
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv, immediate_data=False, initial_r2t=True)
            itt, q = await _write_cmd(i, 2)
            r2t = await asyncio.wait_for(q.get(), 5)
            assert r2t.opcode == P.OP_R2T
            for n, sn in enumerate(datasns):
                bhs = P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL if n == 1 else 0, lun=0, itt=itt,
                                  fields={20: r2t.ttt, 36: sn, 40: 512 * n})
                i.send(bhs, b"z" * 512)
            await _expect_check(q, 0x0B, 0x4B, 0x00)
            assert fake.luns_map[0].data[:1024] == bytes(1024)
            assert (await i.nop(b"alive")).data == b"alive"
            await i.close()
    run(main())


# -- server lifecycle ----------------------------------------------------------------------

def test_graceful_stop_drains_in_flight():
    async def main():
        fake = FakeScsiTarget()
        srv = IscsiServer([IscsiTargetConfig(IQN, fake)], [("127.0.0.1", 0)])
        await srv.start()
        i = await logged_in(srv)
        fake.gate = asyncio.Event()
        rd = asyncio.ensure_future(i.read(0, 0, 4))
        for _ in range(100):
            if fake.executed:
                break
            await asyncio.sleep(0.01)
        stopper = asyncio.ensure_future(srv.stop(timeout=10))
        await asyncio.sleep(0.1)
        assert not stopper.done()
        fake.gate.set()
        assert len(await asyncio.wait_for(rd, 5)) == 2048        # answered before the close
        await asyncio.wait_for(stopper, 10)
        assert srv.stats()["connections"] == 0
        await i.close()
    run(main())


def test_stop_asks_initiators_to_log_out():
    async def main():
        fake = FakeScsiTarget()
        srv = IscsiServer([IscsiTargetConfig(IQN, fake)], [("127.0.0.1", 0)])
        await srv.start()
        i = await logged_in(srv)

        async def obey():
            msg = await asyncio.wait_for(i.async_msgs.get(), 5)
            assert msg.bhs[36] == 1 and int.from_bytes(msg.bhs[42:44], "big") == 5
            assert msg.itt == P.ALL_ONES
            return await i.logout()
        obeyed = asyncio.ensure_future(obey())
        await srv.stop(timeout=5, logout_grace=5)
        assert await asyncio.wait_for(obeyed, 5) == 0
        assert len(fake.lost) == 1 and srv.stats()["sessions"] == 0
        await i.close()
    run(main())


def test_runtime_portals():
    async def main():
        async with serving() as (srv, fake):
            bound = await srv.add_portal("127.0.0.1", 0)
            assert len(bound) == 1 and bound[0] in srv.addresses
            i = Initiator(*bound[0])
            await i.login(discovery=True)
            addrs = [v for k, v in await i.send_targets() if k == "TargetAddress"]
            assert f"127.0.0.1:{bound[0][1]},1" in addrs and len(addrs) == 2
            await i.close()
            await srv.remove_portal(*bound[0])
            assert bound[0] not in srv.addresses
            with pytest.raises(OSError):
                await asyncio.open_connection(*bound[0])
    run(main())


def test_runtime_target_changes_and_stats():
    async def main():
        async with serving() as (srv, fake):
            other = FakeScsiTarget({3: MemLun(1 << 20)})
            srv.add_target(IscsiTargetConfig(IQN2, other))
            with pytest.raises(ValueError):
                srv.add_target(IscsiTargetConfig(IQN2, other))
            i = await logged_in(srv, IQN2)
            r = await i.scsi(3, bytes(6))
            assert r.status == 0
            st = srv.stats()
            assert st["sessions"] == 1 and st["targets"][IQN2]["sessions"] == 1
            (sd,) = st["session_list"]
            assert sd["target"] == IQN2 and sd["initiator"].startswith(i.name + ",i,0x")
            assert sd["commands"] == 1 and sd["in_flight"] == 0
            newer = FakeScsiTarget({3: MemLun(1 << 20)})
            srv.set_scsi_target(IQN2, newer)
            assert (await i.scsi(3, bytes(6))).status == 0 and len(newer.executed) == 1
            srv.remove_target(IQN2)
            for _ in range(100):
                if i.closed:
                    break
                await asyncio.sleep(0.02)
            assert i.closed
            j = Initiator(*addr(srv))
            with pytest.raises(LoginError) as ei:
                await j.login(IQN2)
            assert ei.value.status == (2, 3)
            await i.close()
            await j.close()
    run(main())


def test_session_and_connection_limits():
    async def main():
        async with serving(max_sessions=2, max_connections=3) as (srv, fake):
            a = await logged_in(srv)
            b = await logged_in(srv)
            c = Initiator(*addr(srv))
            with pytest.raises(LoginError) as ei:
                await c.login(IQN)
            assert ei.value.status == (3, 2)           # out of resources
            await c.close()
            for _ in range(100):
                if srv.stats()["connections"] == 2:
                    break
                await asyncio.sleep(0.02)
            idle = await asyncio.open_connection(*addr(srv))          # 3rd connection: accepted
            r, w = await asyncio.open_connection(*addr(srv))          # 4th: refused at once
            assert await asyncio.wait_for(r.read(1), 5) == b""
            w.close()
            idle[1].close()
            await a.close()
            await b.close()
    run(main())


def test_login_timeout_drops_silent_connection():
    async def main():
        async with serving(login_timeout=0.3) as (srv, fake):
            r, w = await asyncio.open_connection(*addr(srv))
            assert await asyncio.wait_for(r.read(1), 5) == b""
            w.close()
    run(main())
