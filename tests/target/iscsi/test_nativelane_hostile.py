"""The native READ lane (target/iscsi/_nativelane.c, lane.py) against what
is not a plain READ of a quiet LU: state changes that are not this target's
commands, task management with lane reads in flight, and hostile PDUs. Each
expects the answer the Python path gives with the lane off.

The route poll is made an hour long here: LUNs are published by calling
check() and every revocation must come from a synchronous hook (a test that
a poll could rescue would pass with the hook removed)."""
from __future__ import annotations

import asyncio
import os
import struct
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest

from target.iscsi import lane as lane_mod

if lane_mod.Lane is None:
    pytest.skip("the native lane is not built", allow_module_level=True)

from restore_core.engine import Engine  # noqa: E402
from restore_core.metadata import MemoryMetadataStore  # noqa: E402
from restore_core.stores.file import FileBlockStore  # noqa: E402
from target.iscsi import IscsiServer, IscsiTargetConfig, datapath, session, tmf  # noqa: E402
from target.scsi.device import ScsiDevice  # noqa: E402
from target.scsi.identity import DeviceIdentity  # noqa: E402
from target.scsi.lunset import LunSet  # noqa: E402

from .initiator import Initiator  # noqa: E402
from .test_scsi_integration import IQN, ready, run, start  # noqa: E402

ORDERED = 2
ASC_REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
ASC_CAPACITY_CHANGED = (0x2A, 0x09)
ASC_LU_NOT_SUPPORTED = (0x25, 0x00)


@pytest.fixture(autouse=True)
def lane_on(monkeypatch):
    """The lane on whatever the default, and no route poll to rescue a
    missing hook."""
    for m in (lane_mod, datapath, session, tmf):
        monkeypatch.setattr(m, "ENABLED" if m is lane_mod else "LANE_ENABLED", True)
    monkeypatch.setattr(lane_mod, "ROUTE_CHECK_S", 3600.0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def publish(srv, *luns: int) -> None:
    """Every session's lane serves ``luns`` now (no poll waited for)."""
    for s in srv.sessions.values():
        s.lane.check()
        assert all(lun in s.lane._leases for lun in luns), (luns, s.lane._leases)


def none_published(srv) -> bool:
    """No lane answers for any LUN (checked right after a change returns:
    revocation is synchronous, not the next loop turn's)."""
    return not any(s.lane.native.published for s in srv.sessions.values())


def lane_reads(srv) -> int:
    return sum(s.lane.native.commands for s in srv.sessions.values())


def asc(r) -> tuple[int, int]:
    return r.sense[12], r.sense[13]


class Lu:
    """A server with LUNs 0 and 5, one logged-in initiator, the LUNs it is
    ready on published to its lane."""

    def __init__(self, srv, files: dict, i: Initiator) -> None:
        self.srv, self.files, self.i = srv, files, i

    def device(self, lun: int = 0):
        return self.srv.targets[IQN].scsi_target.device(lun)

    async def read(self, lun: int = 0, lba: int = 0):
        return await self.i.scsi(lun, read10(lba, 1), read_len=512)


@asynccontextmanager
async def published_lu(tmp_path, *luns: int) -> AsyncIterator[Lu]:
    srv, files = await start(tmp_path)
    try:
        i = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:hostile")
        await i.login(IQN, immediate_data=True)
        for lun in luns:
            await ready(i, lun)
        publish(srv, *luns)
        yield Lu(srv, files, i)
        await i.close()
    finally:
        await srv.stop()


# -- state changes that are not commands of this target's sessions ------------------
def test_lun_removed_revokes_it_and_queues_the_inventory_ua_at_once(tmp_path):
    async def main():
        async with published_lu(tmp_path, 0, 5) as lu:
            assert (await lu.read(5)).status == 0
            assert lane_reads(lu.srv) == 1
            lu.srv.targets[IQN].scsi_target.remove(5)       # a control request, no command
            assert none_published(lu.srv)
            r = await lu.read(5)
            assert r.status == 2 and asc(r) == ASC_LU_NOT_SUPPORTED, r.sense.hex()
            r = await lu.read(0)
            assert r.status == 2 and asc(r) == ASC_REPORTED_LUNS_CHANGED, r.sense.hex()
            assert lane_reads(lu.srv) == 1
    run(main())


def test_capacity_change_outside_commands_stops_the_lane_until_reported(tmp_path):
    async def main():
        async with published_lu(tmp_path, 0) as lu:
            dev = lu.device()
            dev.lunio.store.grow(lu.files[0][1] + (1 << 20))
            dev.lunio_changed()                             # what volume resize calls
            assert none_published(lu.srv)
            r = await lu.read()
            assert r.status == 2 and asc(r) == ASC_CAPACITY_CHANGED, r.sense.hex()
            assert lane_reads(lu.srv) == 0
    run(main())


def test_reservation_made_elsewhere_conflicts_at_once(tmp_path):
    """A reservation by a nexus of another transport (TCMU, another target
    exporting the LU) reaches no HOLDS of this target: the device's hook
    must revoke the lane."""
    async def main():
        async with published_lu(tmp_path, 0) as lu:
            elsewhere = ("iqn.2025-01.org.test:elsewhere", "tcmu")
            lu.device().pr.reserve_spc2(elsewhere)
            assert none_published(lu.srv)
            assert (await lu.read()).status == 0x18
            assert lane_reads(lu.srv) == 0
            lu.device().pr.release_spc2(elsewhere)
    run(main())


def test_mode_change_elsewhere_takes_the_lun_back_at_once(tmp_path):
    async def main():
        async with published_lu(tmp_path, 0) as lu:
            caching = bytes((0x08, 0x12)) + bytes(18)      # WCE off
            assert lu.device().mode.select(bytes((0x15, 0x10, 0, 0, 24, 0)), bytes(4) + caching,
                                           ten=False, block_size=512)
            assert none_published(lu.srv)
            assert (await lu.read()).status == 0
            assert lane_reads(lu.srv) == 0
    run(main())


def test_pair_created_on_the_volume_revokes_at_once(tmp_path):
    """The LunIO's own changes (here a pair created on the volume: a paired
    volume is never direct) reach the lane through its lease
    (DirectLease.on_change), inside the change."""
    async def main():
        eng = Engine(MemoryMetadataStore())
        for name in ("src", "cln"):
            eng.add_volume(name, FileBlockStore(str(tmp_path / f"{name}.img"), 4 << 20, create=True))
        await eng.start()
        ident = DeviceIdentity(product_id="liverestore", revision="0001", serial="lanepair",
                               naa="5000000000000002", t10_vendor_id="lanepair")
        srv = IscsiServer([IscsiTargetConfig(IQN, LunSet({0: ScsiDevice(eng.volume_io("cln"), ident)}))],
                          [("127.0.0.1", 0)])
        await srv.start()
        try:
            i = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:pair")
            await i.login(IQN)
            await ready(i, 0)
            publish(srv, 0)
            assert (await i.scsi(0, read10(0, 1), read_len=512)).status == 0
            assert lane_reads(srv) == 1
            p = await eng.create_pair("src", "cln", extent_size=65536)
            assert none_published(srv)
            await i.scsi(0, read10(0, 1), read_len=512)     # Python's answer, whatever it is
            assert lane_reads(srv) == 1
            await eng.wait_job(p.id, 30)
            await eng.delete_pair(p.id, force=True)
            await ready(i, 0)
            publish(srv, 0)                                 # direct again
            await i.close()
        finally:
            await srv.stop()
            await eng.close()
    run(main())


def test_simple_read_after_an_ordered_write_waits_for_it(tmp_path):
    """SAM: a SIMPLE task does not start before an earlier ORDERED one ends.
    An ORDERED FUA write waits for its flush in Python; the READ behind it
    must see its data and be answered after it (a higher StatSN), not by
    the lane meanwhile."""
    async def main():
        async with published_lu(tmp_path, 0) as lu:
            i = lu.i
            for k in range(8):
                data = os.urandom(4096)
                w, r = await asyncio.gather(
                    i.scsi(0, write10(200 + 8 * k, 8, fua=True), data_out=data, attr=ORDERED),
                    i.scsi(0, read10(200 + 8 * k, 8), read_len=4096))
                assert w.status == 0 and r.status == 0
                assert r.data == data, k
                assert w.response.u32(24) < r.response.u32(24), k
                publish(lu.srv, 0)
    run(main())


# -- hostile PDUs: the same bytes on the wire as Python's with the lane off ----------
#: after the answer to the closing ping, a quiet gap this long ends what
#: the target sends for a case (answers that run off the loop come late)
QUIET_S = 0.2
PING_ITT = 0x7FFF0000
LAST_LBA = (32 << 20) // 512 - 1          # LUN 0 of test_scsi_integration.start
PATTERN = bytes(range(256)) * 4096        # the first MiB of LUN 0


def set_lane(on: bool) -> None:
    """The lane for the sessions logged in from now on (monkeypatched back
    by the fixture)."""
    lane_mod.ENABLED = datapath.LANE_ENABLED = session.LANE_ENABLED = tmf.LANE_ENABLED = on


class Wire:
    """Raw PDUs built from the test initiator's sequence numbers."""

    def __init__(self, i: Initiator) -> None:
        self.i = i

    def cmd(self, cdb: bytes, edtl: int, *, lun: bytes | int = 0, flags: int = 0xC1,
            byte0: int = 0x01, itt: int | None = None, cmdsn: int | None = None,
            data: bytes = b"") -> bytes:
        """A SCSI Command PDU (default: F R, SIMPLE, the next CmdSN)."""
        i = self.i
        if cmdsn is None:
            cmdsn = i.cmdsn
            if not byte0 & 0x40:
                i.cmdsn = (i.cmdsn + 1) & 0xFFFFFFFF
        bhs = bytearray(48)
        bhs[0], bhs[1] = byte0, flags
        bhs[5:8] = len(data).to_bytes(3, "big")
        bhs[8:16] = lun if isinstance(lun, bytes) else bytes((0, lun)) + bytes(6)
        struct.pack_into(">IIII", bhs, 16, i.new_itt() if itt is None else itt, edtl, cmdsn,
                         i.exp_statsn)
        bhs[32:32 + len(cdb)] = cdb
        return bytes(bhs) + data + bytes(-len(data) % 4)

    def read(self, lba: int = 0, blocks: int = 8, *, edtl: int | None = None, b1: int = 0,
             ctl: int = 0, sixteen: bool = False, **kw) -> bytes:
        if sixteen:
            cdb = struct.pack(">BBQIBB", 0x88, b1, lba, blocks, 0, ctl)
        else:
            cdb = struct.pack(">BBIBHB", 0x28, b1, lba, 0, blocks, ctl)
        return self.cmd(cdb, blocks * 512 if edtl is None else edtl, **kw)

    def tmf(self, func: int, ref_itt: int, ref_cmdsn: int, *, immediate: bool = True) -> bytes:
        i = self.i
        bhs = bytearray(48)
        bhs[0] = 0x02 | (0x40 if immediate else 0)
        bhs[1] = 0x80 | func
        struct.pack_into(">IIIIII", bhs, 16, i.new_itt(), ref_itt, i.cmdsn, i.exp_statsn,
                         ref_cmdsn, 0)
        if not immediate:
            i.cmdsn += 1
        return bytes(bhs)

    def ping(self) -> bytes:
        """An immediate NOP-Out whose NOP-In says every PDU before it was
        parsed."""
        i = self.i
        bhs = bytearray(48)
        bhs[0], bhs[1] = 0x00 | 0x40, 0x80
        struct.pack_into(">IIII", bhs, 16, PING_ITT, 0xFFFFFFFF, i.cmdsn, i.exp_statsn)
        return bytes(bhs)

    def logout(self) -> bytes:
        i = self.i
        bhs = bytearray(48)
        bhs[0], bhs[1] = 0x06 | 0x40, 0x80
        struct.pack_into(">III", bhs, 16, i.new_itt(), 0, i.cmdsn)
        struct.pack_into(">I", bhs, 28, i.exp_statsn)
        return bytes(bhs)


def _r2t_write(w: Wire, itt: int) -> bytes:
    """A WRITE(10) of 8 blocks with no data sent: its task waits for Data-Out."""
    return w.cmd(write10(300, 8), 4096, flags=0xA1, itt=itt)


def _ahs_read(w: Wire) -> bytes:
    pdu = bytearray(w.read(0, 8))
    pdu[4] = 1                                  # one word of AHS: an extended CDB of nothing
    return bytes(pdu) + struct.pack(">HBB", 1, 1, 0)


CASES = {
    "plain reads, 10 and 16": lambda w: [w.read(0, 8) + w.read(8, 8, sixteen=True) + w.read(LAST_LBA, 1)],
    "ITT of a Python task": lambda w: [_r2t_write(w, 0x7000) + w.read(0, 8, itt=0x7000) + w.read(8, 8)],
    "ITT all ones": lambda w: [w.read(0, 8, itt=0xFFFFFFFF) + w.read(8, 8)],
    "same ITT twice in a row": lambda w: [w.read(0, 8, itt=0x7001) + w.read(8, 8, itt=0x7001)],
    "CmdSN ahead, then the gap": lambda w: (
        lambda c: [w.read(8, 8, cmdsn=c + 1) + w.read(0, 8, cmdsn=c) + w.read(16, 8, cmdsn=c + 2)])(
        w.i.cmdsn),
    "CmdSN ahead, gap later": lambda w: (
        lambda c: [w.read(8, 8, cmdsn=c + 1), QUIET_S, w.read(0, 8, cmdsn=c)
                   + w.read(16, 8, cmdsn=c + 2)])(w.i.cmdsn),
    "CmdSN behind": lambda w: [w.read(0, 8, cmdsn=w.i.cmdsn - 1) + w.read(8, 8)],
    "CmdSN far beyond the window": lambda w: [w.read(0, 8, cmdsn=w.i.cmdsn + 5000) + w.read(8, 8)],
    "window closed": lambda w: [w.read(0, 8) + b"".join(w.cmd(write10(300 + 8 * k, 8), 4096, flags=0xA1)
                                                         for k in range(128)) + w.read(8, 8)],
    "immediate bit": lambda w: [w.read(0, 8) + w.read(8, 8, byte0=0x41) + w.read(16, 8)],
    "reserved opcode bit": lambda w: [w.read(0, 8) + w.read(8, 8, byte0=0x81) + w.read(16, 8)],
    "LUN 5 peripheral": lambda w: [w.read(0, 8, lun=5)],
    "LUN 0 flat": lambda w: [w.read(0, 8) + w.read(0, 8, lun=b"\x40\x00" + bytes(6))],
    "LUN 5 flat": lambda w: [w.read(0, 8) + w.read(0, 8, lun=b"\x40\x05" + bytes(6))],
    "LUN 0 bus 1": lambda w: [w.read(0, 8) + w.read(0, 8, lun=b"\x01\x00" + bytes(6))],
    "LUN 0 second level": lambda w: [w.read(0, 8) + w.read(0, 8, lun=b"\x00\x00\x00\x01" + bytes(4))],
    "LUN logical unit addressing": lambda w: [w.read(0, 8) + w.read(0, 8, lun=b"\x80\x00" + bytes(6))],
    "LUN extended addressing": lambda w: [w.read(0, 8) + w.read(0, 8, lun=b"\xc1\x00" + bytes(6))],
    "LUN absent": lambda w: [w.read(0, 8) + w.read(0, 8, lun=7)],
    "EDTL below": lambda w: [w.read(0, 8) + w.read(0, 8, edtl=4096 - 512) + w.read(8, 8)],
    "EDTL above": lambda w: [w.read(0, 8) + w.read(0, 8, edtl=4096 + 512) + w.read(8, 8)],
    "EDTL zero": lambda w: [w.read(0, 8) + w.read(0, 8, edtl=0) + w.read(8, 8)],
    "zero blocks": lambda w: [w.read(0, 8) + w.read(0, 0) + w.read(8, 8)],
    "beyond one Data-In": lambda w: [w.read(0, 8) + w.read(0, 1024) + w.read(8, 8)],
    "huge": lambda w: [w.read(0, 8) + w.read(0, 0xFFFF) + w.read(8, 8)],
    "past the end": lambda w: [w.read(0, 8) + w.read(LAST_LBA, 2) + w.read(8, 8)],
    "LBA 2^63": lambda w: [w.read(0, 8) + w.read(1 << 63, 1, sixteen=True) + w.read(8, 8)],
    "NACA": lambda w: [w.read(0, 8) + w.read(0, 8, ctl=0x04) + w.read(8, 8, sixteen=True, ctl=0x04)],
    "RDPROTECT": lambda w: [w.read(0, 8) + w.read(0, 8, b1=0x20) + w.read(8, 8, sixteen=True, b1=0x60)],
    "FUA DPO, LINK, vendor bits": lambda w: [w.read(0, 8, b1=0x18) + w.read(8, 8, ctl=0x01)
                                             + w.read(16, 8, ctl=0xC0)],
    "F=0": lambda w: [w.read(0, 8) + w.read(0, 8, flags=0x41) + w.read(8, 8)],
    "W and R": lambda w: [w.read(0, 8) + w.read(0, 8, flags=0xE1) + w.read(8, 8)],
    "no R": lambda w: [w.read(0, 8) + w.read(0, 8, flags=0x81) + w.read(8, 8)],
    "attributes": lambda w: [w.read(0, 8, flags=0xC0) + w.read(8, 8, flags=0xC2) + w.read(16, 8, flags=0xC3)
                             + w.read(24, 8, flags=0xC4) + w.read(32, 8, flags=0xC5) + w.read(40, 8)],
    "data segment on a READ": lambda w: [w.read(0, 8) + w.read(0, 8, data=bytes(512))],
    "AHS": lambda w: [w.read(0, 8) + _ahs_read(w) + w.read(8, 8)],
    "header split": lambda w: (lambda a, b: [a + b[:20], 0.05, b[20:40], 0.05, b[40:]])(
        w.read(0, 8), w.read(8, 8)),
    "ABORT TASK of an answered read": lambda w: (
        lambda itt, c: [w.read(0, 8, itt=itt) + w.tmf(1, itt, c) + w.read(8, 8)])(0x7002, w.i.cmdsn),
    "ABORT TASK, not immediate": lambda w: (
        lambda itt, c: [w.read(0, 8, itt=itt) + w.tmf(1, itt, c, immediate=False) + w.read(8, 8)])(
        0x7003, w.i.cmdsn),
    "LUN RESET behind reads": lambda w: [w.read(0, 8) + w.tmf(5, 0xFFFFFFFF, 0) + w.read(8, 8)],
    "logout behind reads": lambda w: [w.read(0, 8) + w.read(8, 8) + w.logout()],
}


async def send_case(i: Initiator, case) -> None:
    """Take the initiator's socket over and send the case's parts raw (a
    float: a pause), then the closing ping."""
    i._reader_task.cancel()
    await asyncio.gather(i._reader_task, return_exceptions=True)
    w = Wire(i)
    for part in case(w):
        if isinstance(part, float):
            await asyncio.sleep(part)
        else:
            i.writer.write(part)
    i.writer.write(w.ping())


async def _exchange(tmp_path, case, on: bool, stall: float = 0.0) -> tuple[bytes, int, int]:
    """Log in, then send the case's bytes raw; everything the target
    answers until it is quiet (or closes), how many READs the lane
    answered, and the most output the target held for this peer (queued in
    its transport or corked) while the peer did not read for ``stall`` s."""
    set_lane(on)
    d = tmp_path / ("on" if on else "off")
    d.mkdir()
    srv, files = await start(d)
    try:
        with open(files[0][0], "r+b") as f:
            f.write(PATTERN)
        i = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:wire",
                      isid=bytes((0x40, 0, 1, 0x37, 0, 1)))
        await i.login(IQN, immediate_data=True, initial_r2t=True)
        await ready(i, 0)
        await ready(i, 5)
        lanes = [s.lane for s in srv.sessions.values() if s.lane is not None]
        conn = next(iter(srv.sessions.values())).conn
        if on:
            publish(srv, 0, 5)
        await send_case(i, case)
        held = 0
        for _ in range(int(stall / 0.01)):
            await asyncio.sleep(0.01)
            t = conn.transport
            held = max(held, conn._wbytes + (t.get_write_buffer_size() if t is not None else 0))
        out = await _collect(i)
        answered = sum(lane.native.commands for lane in lanes)
        i.writer.close()
        return out, answered, held
    finally:
        await srv.stop()


async def _collect(i: Initiator) -> bytes:
    """What the target sends until the ping's NOP-In and a quiet gap after
    it (or until it closes)."""
    out = bytearray()
    s = 0
    pinged = False
    ping = PING_ITT.to_bytes(4, "big")
    while True:
        try:
            chunk = await asyncio.wait_for(i.reader.read(1 << 20), QUIET_S if pinged else 20)
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        out += chunk
        while not pinged and s + 48 <= len(out):
            dlen = int.from_bytes(out[s + 5:s + 8], "big")
            n = 48 + out[s + 4] * 4 + dlen + (-dlen % 4)
            if s + n > len(out):
                break
            pinged = out[s] & 0x3F == 0x20 and out[s + 16:s + 20] == ping
            s += n
    return bytes(out)


def _pdus(wire: bytes) -> list[bytes]:
    out, s = [], 0
    while s + 48 <= len(wire):
        dlen = int.from_bytes(wire[s + 5:s + 8], "big")
        n = 48 + wire[s + 4] * 4 + dlen + (-dlen % 4)
        out.append(wire[s:s + n])
        s += n
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_pdu_gets_pythons_bytes(tmp_path, name):
    async def main():
        off, _, _ = await _exchange(tmp_path, CASES[name], False)
        on, answered, _ = await _exchange(tmp_path, CASES[name], True)
        assert answered, "the lane answered nothing: the case compares Python with itself"
        assert on == off, _differ(name, off, on)
        assert off, "the target answered nothing"
    run(main())


def _differ(name: str, off: bytes, on: bytes) -> str:
    a, b = _pdus(off), _pdus(on)
    k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"{name}: {len(a)} PDUs off, {len(b)} on; PDU {k} differs:\n"
            f"off {a[k][:48].hex() if k < len(a) else None}\n"
            f"on  {b[k][:48].hex() if k < len(b) else None}")


STREAM = 100_000


def test_a_stream_of_reads_to_a_peer_that_does_not_read(tmp_path):
    """10^5 READs in one write (far past MaxCmdSN), and the peer reads
    nothing for 2 s: the target holds a bounded amount of output for it and
    then answers every READ, in order, with its blocks. (Python alone, lane
    off, holds as much but parks READs behind the unread output until the
    window closes, so such a peer loses commands: iSCSI allows that, and it
    is not this test's comparison.)"""
    async def main():
        itts: list[int] = []

        def case(w: Wire) -> list[bytes]:
            pdus = [w.read(k % 2048, 1) for k in range(STREAM)]
            itts.extend(struct.unpack_from(">I", p, 16)[0] for p in pdus)
            return [b"".join(pdus)]
        _, _, held_off = await _exchange(tmp_path, case, False, stall=2.0)
        itts.clear()
        on, answered, held_on = await _exchange(tmp_path, case, True, stall=2.0)
        print(f"held for the peer: lane off {held_off} B, on {held_on} B; lane answered {answered}")
        pdus = _pdus(on)
        assert len(pdus) == STREAM + 1 and answered == STREAM
        statsn = struct.unpack_from(">I", pdus[0], 24)[0]
        for k, p in enumerate(pdus[:-1]):
            assert p[:2] == b"\x25\x81" and struct.unpack_from(">II", p, 16)[0] == itts[k], k
            assert struct.unpack_from(">I", p, 24)[0] == statsn + k, k
            assert p[48:] == PATTERN[(k % 2048) * 512:(k % 2048 + 1) * 512], k
        assert held_on <= 4 << 20, (held_on, held_off)
    run(main(), timeout=300)
