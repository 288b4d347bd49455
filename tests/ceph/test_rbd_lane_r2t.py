"""WRITEs whose data needs R2Ts, taken by the native lane on RBD LUs
(target/iscsi/_nativelane.c: a write collecting its data; lane.py) against
the real cluster.

The lane takes such a write (MaxOutstandingR2T 1), sends its R2Ts, takes
the Data-Outs that are exactly the next piece of the burst it solicited
(placed straight into its request when big), and queues the write on the
store's submitter once all of it is in. Anything else hands the write over
to Python's path exactly where it stands (SessionLane._adopt): a Data-Out
the lane does not judge (Python answers it as it would have), its LUN taken
back (task management, logout, a command that holds the lanes), a failure
in librbd. So the hostile sequences below must get Python's answers, lane
off vs on, with only the R2Ts' TTTs differing (a range of the lane's own),
and the image must hold the same bytes."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import struct
from typing import Any, Awaitable, Callable

import pytest

from target.iscsi import lane as lane_mod
from tests.ceph.test_rbd_lane import GOOD, MiB, rig, until  # noqa: F401
from tests.ceph.test_rbd_lane import lane_on  # noqa: F401 (autouse fixture)
from tests.ceph.test_rbd_lane_write_hostile import _image, _key, _statsns, served
from tests.ceph.util import read_image
from tests.target.iscsi.initiator import Initiator
from tests.target.iscsi.test_nativelane_hostile import PING_ITT, Wire, _pdus, set_lane
from tests.target.iscsi.test_scsi_integration import ready

IQN = "iqn.2025-01.org.test:rbd-lane-w"     # (served()'s)
FIRST_BURST = 65536
MAX_BURST = 65536
BLOCKS_256K = 512
R2T_LOGIN = dict(max_outstanding_r2t=1, first_burst=FIRST_BURST, max_burst=MAX_BURST,
                 initial_r2t=True)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


# -- the lane's R2T writes through the test initiator -----------------------------------

def test_r2t_writes_ride_the_lane_and_land_on_the_image(ceph, tmp_path):
    """1 MiB writes, 64 KiB immediate and 64 KiB bursts, 8 at once: the
    lane takes every one (its R2Ts are the ones Python would send: offsets,
    lengths, R2TSN, checked by the initiator), the image holds them, and
    nothing is left collecting or charged."""
    async def go():
        async with rig(tmp_path, ceph, **R2T_LOGIN) as r:
            s, lane = r.session, r.session.lane
            data = os.urandom(8 * MiB)
            written, r2ts, bytes_in = lane.native.written, lane.native.r2ts, s.bytes_in
            got = await asyncio.gather(*(
                r.i.scsi(0, write10(2048 * k, 2048), data_out=data[MiB * k:MiB * (k + 1)])
                for k in range(8)))
            assert [x.status for x in got] == [GOOD] * 8
            assert all(len(x.r2ts) == 15 for x in got)        # (1 MiB - 64 KiB) / 64 KiB
            assert lane.native.written - written == 8
            assert lane.native.r2ts - r2ts == 8 * 15
            assert s.bytes_in - bytes_in == 8 * MiB
            assert await asyncio.to_thread(read_image, r.spec, 0, 8 * MiB) == data
            assert lane.native.collecting == lane.native.inflight == 0
            assert not s.tasks
            assert lane.native.credit <= 2 * lane_mod.CREDIT_BLOCK
    asyncio.run(go())


def test_without_immediate_data_every_byte_is_solicited(ceph, tmp_path):
    async def go():
        async with rig(tmp_path, ceph, immediate_data=False, **R2T_LOGIN) as r:
            lane = r.session.lane
            data = os.urandom(256 * 1024)
            written = lane.native.written
            x = await r.i.scsi(0, write10(0, BLOCKS_256K), data_out=data)
            assert x.status == GOOD and len(x.r2ts) == 4
            assert lane.native.written - written == 1
            assert await asyncio.to_thread(read_image, r.spec, 0, len(data)) == data
    asyncio.run(go())


def test_more_outstanding_r2ts_leave_r2t_writes_to_python(ceph, tmp_path):
    """MaxOutstandingR2T 4: Python's path sends up to four R2Ts at once;
    the lane sends one at a time, so it leaves such sessions' writes that
    need R2Ts alone (their all-immediate ones are still its)."""
    async def go():
        async with rig(tmp_path, ceph, max_outstanding_r2t=4, first_burst=FIRST_BURST,
                       max_burst=MAX_BURST) as r:
            lane = r.session.lane
            x = await r.i.scsi(0, write10(0, BLOCKS_256K), data_out=os.urandom(256 * 1024))
            assert x.status == GOOD and len(x.r2ts) == 3
            assert lane.native.r2ts == 0 and lane.native.written == 0
            x = await r.i.scsi(0, write10(0, 8), data_out=bytes(4096))
            assert x.status == GOOD and lane.native.written == 1
    asyncio.run(go())


# -- raw sequences, lane off vs on ------------------------------------------------------

class Raw:
    """The test initiator's socket taken over: PDUs sent raw, the target's
    read as they come (every one kept, in order)."""

    def __init__(self, i: Initiator) -> None:
        self.i = i
        self.w = Wire(i)
        self.got: list[bytes] = []
        self._buf = b""
        self._r2ts: list[bytes] = []     # R2Ts read and not yet asked for

    def send(self, b: bytes) -> None:
        self.i.writer.write(b)

    async def _pdu(self, timeout: float) -> bytes | None:
        while True:
            if len(self._buf) >= 48:
                dlen = int.from_bytes(self._buf[5:8], "big")
                n = 48 + self._buf[4] * 4 + dlen + (-dlen % 4)
                if len(self._buf) >= n:
                    pdu, self._buf = self._buf[:n], self._buf[n:]
                    self.got.append(pdu)
                    return pdu
            try:
                chunk = await asyncio.wait_for(self.i.reader.read(1 << 20), timeout)
            except asyncio.TimeoutError:
                return None
            if not chunk:
                return None
            self._buf += chunk

    async def r2t(self, itt: int) -> bytes:
        """The next R2T for ``itt`` (whatever else comes meanwhile is kept)."""
        while True:
            for p in self._r2ts:
                if int.from_bytes(p[16:20], "big") == itt:
                    self._r2ts.remove(p)
                    return p
            p = await self._pdu(10.0)
            assert p is not None, f"no R2T for ITT 0x{itt:x}"
            if p[0] & 0x3F == 0x31:
                self._r2ts.append(p)

    async def rest(self) -> None:
        """Everything until the ping's NOP-In and a quiet gap after it."""
        self.send(self.w.ping())
        pinged = False
        while True:
            p = await self._pdu(0.5 if pinged else 15.0)
            if p is None:
                return
            if p[0] & 0x3F == 0x20 and int.from_bytes(p[16:20], "big") == PING_ITT:
                pinged = True

    def write(self, lba: int, blocks: int, imm: int, itt: int) -> bytes:
        """A WRITE(10) of ``blocks`` with its first ``imm`` bytes immediate."""
        return self.w.cmd(write10(lba, blocks), blocks * 512, flags=0xA1, itt=itt,
                          data=fill(lba, blocks * 512)[:imm])

    def data_out(self, itt: int, ttt: int, off: int, data: bytes, datasn: int = 0,
                 final: bool = True) -> bytes:
        bhs = bytearray(48)
        bhs[0], bhs[1] = 0x05, 0x80 if final else 0
        bhs[5:8] = len(data).to_bytes(3, "big")
        struct.pack_into(">IIIIIII", bhs, 16, itt, ttt, 0, self.i.exp_statsn, 0, datasn, off)
        return bytes(bhs) + data + bytes(-len(data) % 4)

    async def burst(self, lba: int, itt: int, *, pieces: int = 1, **bad: Any) -> tuple[int, int]:
        """Answer the next R2T for ``itt`` with its burst in ``pieces``
        Data-Outs; ``bad`` changes the first one (datasn, off, extra bytes,
        final, ttt). Returns the R2T's (offset, length)."""
        r2t = await self.r2t(itt)
        ttt, off, length = struct.unpack_from(">I", r2t, 20)[0], *struct.unpack_from(">II", r2t, 40)
        data = fill(lba, off + length)[off:]
        step = length // pieces
        for k in range(pieces):
            o = off + k * step
            piece = data[k * step:(k + 1) * step]
            kw = dict(datasn=k, final=k == pieces - 1)
            t = ttt
            if k == 0 and bad:
                kw["datasn"] = bad.get("datasn", k)
                kw["final"] = bad.get("final", kw["final"])
                o += bad.get("off", 0)
                piece = piece[:bad.get("cut", len(piece))] + bytes(bad.get("extra", 0))
                t = bad.get("ttt", ttt)
            self.send(self.data_out(itt, t, o, piece, **kw))
        return off, length


def fill(lba: int, n: int) -> bytes:
    """The bytes a case writes from ``lba`` (distinct per block)."""
    return b"".join(struct.pack(">Q", lba * 512 + k) * 64 for k in range(0, n, 512))[:n]


Case = Callable[[Raw], Awaitable[None]]
A, B = 0x7100, 0x7200           # ITTs


async def _all_bursts(x: Raw, lba: int, itt: int, n: int, **kw: Any) -> None:
    for _ in range(n):
        await x.burst(lba, itt, **kw)


async def c_whole(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await _all_bursts(x, 0, A, 3)


async def c_pieces(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await _all_bursts(x, 0, A, 3, pieces=4)           # 16 KiB: placed in the request


async def c_small_pieces(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await _all_bursts(x, 0, A, 3, pieces=16)          # 4 KiB: copied from the receive buffer


async def c_no_immediate(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, 0, A))
    await _all_bursts(x, 0, A, 4)


async def c_immediate_split(x: Raw) -> None:
    """The command's immediate data arrives in parts: the lane takes the
    command and has the rest placed in its request."""
    pdu = x.write(0, BLOCKS_256K, FIRST_BURST, A)
    x.send(pdu[:48 + 20000])
    await asyncio.sleep(0.05)
    x.send(pdu[48 + 20000:])
    await _all_bursts(x, 0, A, 3)


async def c_two_interleaved(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A) + x.write(1024, BLOCKS_256K, FIRST_BURST, B))
    for _ in range(3):
        await x.burst(0, A)
        await x.burst(1024, B)


def _bad(**bad: Any) -> Case:
    async def case(x: Raw) -> None:
        x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
        await x.burst(0, A, pieces=2, **bad)
        # the write failed: the rest of its Data-Out is dropped; another goes on
        x.send(x.write(1024, BLOCKS_256K, FIRST_BURST, B))
        await _all_bursts(x, 1024, B, 3)
    return case


async def c_final_at_end_missing(x: Raw) -> None:
    """F=0 on the burst's last Data-Out: accepted (Python's rule)."""
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    r2t = await x.r2t(A)
    ttt = int.from_bytes(r2t[20:24], "big")
    x.send(x.data_out(A, ttt, FIRST_BURST, fill(0, 2 * FIRST_BURST)[FIRST_BURST:], final=False))
    await _all_bursts(x, 0, A, 2)


async def c_unsolicited(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await x.r2t(A)
    x.send(x.data_out(A, 0xFFFFFFFF, FIRST_BURST, bytes(4096)))


async def c_empty_data_out(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    r2t = await x.r2t(A)
    ttt = int.from_bytes(r2t[20:24], "big")
    x.send(x.data_out(A, ttt, FIRST_BURST, b"", final=False))
    x.send(x.data_out(A, ttt, FIRST_BURST, fill(0, 2 * FIRST_BURST)[FIRST_BURST:], datasn=1))
    await _all_bursts(x, 0, A, 2)


async def c_unknown_itt(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    r2t = await x.r2t(A)
    ttt = int.from_bytes(r2t[20:24], "big")
    x.send(x.data_out(0x7300, ttt, FIRST_BURST, bytes(FIRST_BURST)))
    x.send(x.data_out(A, ttt, FIRST_BURST, fill(0, 2 * FIRST_BURST)[FIRST_BURST:]))
    await _all_bursts(x, 0, A, 2)


async def c_itt_in_use(x: Raw) -> None:
    """A command reusing the ITT of a write collecting its data."""
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await x.r2t(A)
    x.send(x.w.read(0, 8, itt=A))
    x.send(x.write(1024, BLOCKS_256K, FIRST_BURST, A))


def _answer(x: Raw, r2t: bytes) -> bytes:
    """The Data-Out answering ``r2t`` of ITT A (a write at LBA 0) whole."""
    ttt, off, length = struct.unpack_from(">I", r2t, 20)[0], *struct.unpack_from(">II", r2t, 40)
    return x.data_out(A, ttt, off, fill(0, off + length)[off:])


def _tmf(func: int) -> Case:
    """The function while write A collects its data, which then comes
    (the aborted write must not be written, nor answered)."""
    async def case(x: Raw) -> None:
        c = x.i.cmdsn
        x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
        await x.burst(0, A)
        r2t = await x.r2t(A)
        x.send(x.w.tmf(func, A if func == 1 else 0xFFFFFFFF, c if func == 1 else 0))
        await asyncio.sleep(0.3)
        x.send(_answer(x, r2t))
        x.send(x.write(1024, BLOCKS_256K, FIRST_BURST, B))
        await _all_bursts(x, 1024, B, 3)
    return case


async def c_ordered(x: Raw) -> None:
    """An ORDERED command while write A collects its data: it runs after
    A (SAM), on either path."""
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await x.burst(0, A)
    x.send(x.w.cmd(bytes(6), 0, flags=0x82, itt=0x7400))     # TEST UNIT READY, ORDERED
    await _all_bursts(x, 0, A, 2)


async def c_logout(x: Raw) -> None:
    x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A))
    await x.burst(0, A)
    r2t = await x.r2t(A)
    x.send(x.w.logout() + _answer(x, r2t))


CASES: dict[str, Case] = {
    "bursts whole": c_whole,
    "bursts in 16 KiB pieces": c_pieces,
    "bursts in 4 KiB pieces": c_small_pieces,
    "no immediate data": c_no_immediate,
    "immediate data split": c_immediate_split,
    "two writes interleaved": c_two_interleaved,
    "DataSN wrong": _bad(datasn=1),
    "offset wrong": _bad(off=512),
    "past the burst": _bad(extra=4096 + FIRST_BURST // 2, final=True),
    "F early": _bad(final=True),
    "TTT unknown": _bad(ttt=0x12345),
    "short piece": _bad(cut=1000),
    "F=0 at the burst's end": c_final_at_end_missing,
    "unsolicited Data-Out": c_unsolicited,
    "empty Data-Out": c_empty_data_out,
    "Data-Out of no command": c_unknown_itt,
    "ITT in use": c_itt_in_use,
    "ABORT TASK while collecting": _tmf(1),
    "LUN RESET while collecting": _tmf(5),
    "logout while collecting": c_logout,
    "ORDERED command while collecting": c_ordered,
}


async def exchange(tmp_path, ceph, case: Case, on: bool) -> tuple[list[bytes], int, bytes]:
    """The target's PDUs for the case (on a fresh image), the R2Ts the
    lane sent, and the first MiB of the image afterwards."""
    d = tmp_path / ("on" if on else "off")
    d.mkdir()
    async with raw_session(d, ceph, on) as (svc, x, s, spec):
        await case(x)
        await x.rest()
        lane = s.lane
        for _ in range(500):                 # writes in flight end before the image is read
            if lane is None or not lane.native.inflight:
                break
            await asyncio.sleep(0.01)
        r2ts = lane.native.r2ts if lane is not None else 0
    img = await asyncio.to_thread(read_image, spec, 0, MiB)
    return x.got, r2ts, img


def _normal(pdu: bytes) -> bytes:
    """Without StatSN, ExpCmdSN and MaxCmdSN (completion order moves them),
    a Reject's copy of them, and an R2T's TTT (the lane's own range)."""
    b = bytearray(pdu)
    b[24:36] = bytes(12)
    if b[0] & 0x3F == 0x3F and len(b) >= 96:
        b[48 + 24:48 + 36] = bytes(12)
    if b[0] & 0x3F == 0x31:
        b[20:24] = bytes(4)
    return bytes(b)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_r2t_write_gets_pythons_answers(ceph, tmp_path, name):
    async def main():
        off, _, img_off = await exchange(tmp_path, ceph, CASES[name], False)
        on, r2ts, img_on = await exchange(tmp_path, ceph, CASES[name], True)
        assert r2ts, "the lane sent no R2T: the case compares Python with itself"
        a = collections.Counter((_key(p), _normal(p)) for p in off)
        b = collections.Counter((_key(p), _normal(p)) for p in on)
        assert a == b, f"{name}: off-only {a - b}\non-only {b - a}"
        wire_off, wire_on = b"".join(off), b"".join(on)
        assert _statsns(wire_on) == _statsns(wire_off)
        assert len(set(_statsns(wire_on))) == len(_statsns(wire_on)), "a StatSN given twice"
        assert img_on == img_off, "the image differs"
    asyncio.run(main())


# -- a write handed over mid-transfer ----------------------------------------------------

@contextlib.asynccontextmanager
async def raw_session(tmp_path, ceph, on: bool = True):
    """A session (the lane ``on`` or off) on a fresh image, its socket
    taken over: (service, Raw, session, the image's spec)."""
    set_lane(on)
    image = _image(ceph)
    async with served(tmp_path, ceph, image) as svc:
        srv = svc.frontend.server
        i = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:wire")
        await i.login(IQN, immediate_data=True, **R2T_LOGIN)
        await ready(i, 0)
        (s,) = srv.sessions.values()
        if on:
            await until(lambda: s.lane._leases.get(0), "the LUN published")
        i._reader_task.cancel()
        await asyncio.gather(i._reader_task, return_exceptions=True)
        try:
            yield svc, Raw(i), s, ceph.spec(image.split("/")[-1])
        finally:
            i.writer.close()


async def _status(x: Raw, itt: int) -> int:
    while True:
        p = await x._pdu(10.0)
        assert p is not None, f"no SCSI Response for ITT 0x{itt:x}"
        if p[0] & 0x3F == 0x21 and int.from_bytes(p[16:20], "big") == itt:
            return p[3]


@pytest.mark.parametrize("when", ["immediate data", "Data-Out"])
def test_a_write_handed_over_while_its_payload_is_placed_loses_nothing(ceph, tmp_path, when):
    """The route is taken back (here: every lane of the target held, as a
    command that may change routes does) while a payload of the write is
    being placed in the lane's request: the write goes on as Python's task
    (once the immediate data is in, or at once with the same memory for
    its buffer) and the image gets every byte."""
    async def go():
        async with raw_session(tmp_path, ceph) as (svc, x, s, spec):
            lane = s.lane
            data = fill(0, 256 * 1024)
            pdu = x.write(0, BLOCKS_256K, FIRST_BURST, A)
            if when == "immediate data":
                x.send(pdu[:48 + 20000])
                await until(lambda: lane.native.collecting == 1, "the lane took the command")
                assert s.conn._direct is not None and s.conn._direct.lane_itt == A
                lane.revoke_all()
                x.send(pdu[48 + 20000:])
            else:
                x.send(pdu)
                r2t = await x.r2t(A)
                ttt, off, length = (int.from_bytes(r2t[20:24], "big"),
                                    *struct.unpack_from(">II", r2t, 40))
                out = x.data_out(A, ttt, off, data[off:off + length])
                x.send(out[:48 + 30000])
                await until(lambda: s.conn._direct is not None
                            and s.conn._direct.have >= 30000 - 48, "the payload being placed")
                lane.revoke_all()
                assert lane.native.collecting == 0 and A in s.tasks    # Python's task now
                x.send(out[48 + 30000:])
            for _ in range(3 if when == "immediate data" else 2):
                await x.burst(0, A)
            assert await _status(x, A) == GOOD
            assert lane.native.written == 0
            assert await asyncio.to_thread(read_image, spec, 0, len(data)) == data
    asyncio.run(go())


def test_a_connection_lost_while_writes_collect_frees_them(ceph, tmp_path):
    """Writes collecting their data when the peer goes: dropped (nothing of
    them written), their budget given back, the session's memory freed."""
    async def go():
        async with raw_session(tmp_path, ceph) as (svc, x, s, spec):
            lane = s.lane
            x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A) + x.write(1024, BLOCKS_256K, 0, B))
            await x.r2t(A)
            await x.r2t(B)
            pdu = x.write(2048, BLOCKS_256K, FIRST_BURST, 0x7300)
            x.send(pdu[:48 + 20000])              # one with its immediate data being placed
            await until(lambda: lane.native.collecting == 3, "three writes collecting")
            assert s.budget.used > 3 * 256 * 1024
            x.i.writer.transport.abort()
            await until(lambda: s.closed, "the session closed")
            assert lane.native.collecting == 0
            assert s.budget.used == 0 and lane.native.credit == 0
            assert await asyncio.to_thread(read_image, spec, 0, 3 * 512 * 1024) == bytes(3 * 512 * 1024)
    asyncio.run(go())


def test_a_fence_while_writes_collect_never_answers_them_good(ceph, tmp_path):
    """The store is fenced (its lock lost) while two writes collect their
    data: their data still comes, and each is answered NOT READY, never
    GOOD; nothing of them reaches the image."""
    async def go():
        async with raw_session(tmp_path, ceph) as (svc, x, s, spec):
            lane = s.lane
            x.send(x.write(0, BLOCKS_256K, FIRST_BURST, A) + x.write(1024, BLOCKS_256K, 0, B))
            await x.burst(0, A)
            r2t = await x.r2t(B)
            svc.eng.volumes["r"].store._fence("the image's exclusive lock was lost to another client")
            assert lane.native.collecting == 0 and A in s.tasks and B in s.tasks
            x.send(_answer_r2t(x, B, 1024, r2t))
            await _all_bursts(x, 0, A, 2)
            await _all_bursts(x, 1024, B, 3)
            for itt in (A, B):
                p = await _response(x, itt)
                assert p[3] == 0x02 and p[48 + 2 + 2] & 0x0F == 0x02, p.hex()   # NOT READY
            assert lane.native.written == 0
            img = await asyncio.to_thread(read_image, spec, 0, 1024 * 512 + 256 * 1024)
            assert img == bytes(len(img))
    asyncio.run(go())


def _answer_r2t(x: Raw, itt: int, lba: int, r2t: bytes) -> bytes:
    ttt, off, length = struct.unpack_from(">I", r2t, 20)[0], *struct.unpack_from(">II", r2t, 40)
    return x.data_out(itt, ttt, off, fill(lba, off + length)[off:])


async def _response(x: Raw, itt: int) -> bytes:
    for p in x.got:
        if p[0] & 0x3F == 0x21 and int.from_bytes(p[16:20], "big") == itt:
            return p
    while True:
        p = await x._pdu(10.0)
        assert p is not None, f"no SCSI Response for ITT 0x{itt:x}"
        if p[0] & 0x3F == 0x21 and int.from_bytes(p[16:20], "big") == itt:
            return p
