"""Plain WRITEs the native iSCSI lane takes on RBD LUs (all the data
immediate: target/iscsi/_nativelane.c, lane.py) against the real cluster:
they ride the store's submitter thread and land on the image, a fenced
store's writes are never answered GOOD (Python answers NOT READY), a write
librbd fails goes back to Python with its data, an ORDERED command or a
COMPARE AND WRITE runs only after the lane writes in flight, and whatever
the lane does not take is Python's, answered as before."""
from __future__ import annotations

import asyncio
import os
import struct
import time
from typing import Any

from target.iscsi import lane as lane_mod
from target.scsi.lustats import WRITE
from tests.ceph.conftest import TEST_OSD_OP_TIMEOUT_S
from tests.ceph.test_rbd_lane import (GOOD, MiB, not_ready, osd_stopped, rig,  # noqa: F401
                                      until)
from tests.ceph.test_rbd_lane import lane_on  # noqa: F401 (autouse fixture)
from tests.ceph.util import read_image, take_over
from tests.target.iscsi import initiator

ORDERED = 2
CHECK_CONDITION = 0x02


def write10(lba: int, blocks: int, byte1: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, byte1, lba, 0, blocks, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def lane_writes(r: Any) -> int:
    return r.session.lane.native.written


def test_lane_writes_ride_the_submitter_and_land_on_the_image(ceph, tmp_path):
    async def go():
        async with rig(tmp_path, ceph) as r:
            s, lane = r.session, r.session.lane
            sub = r.store._submitter
            dev = r.svc.devices["r"]
            data = os.urandom(MiB)
            started, before, bytes_in = sub.started, lane_writes(r), s.bytes_in
            stats_before = dev.stats.commands[WRITE]
            got = await asyncio.gather(*(
                r.i.scsi(0, (write10 if k % 2 else write16)(8 * k, 8),
                         data_out=data[4096 * k:4096 * (k + 1)]) for k in range(256)))
            assert [x.status for x in got] == [GOOD] * 256
            assert lane_writes(r) - before == 256            # all of them the lane's
            assert sub.started - started >= 256               # on the store's own thread
            assert s.bytes_in - bytes_in == MiB               # the session's traffic counts them
            assert lane.native.inflight == lane.native.writes_inflight == 0
            # an independent client reads what the host wrote
            assert await asyncio.to_thread(read_image, r.spec, 0, MiB) == data
            # the LU's metrics count them as writes (folded every FOLD_S)
            await until(lambda: dev.stats.commands[WRITE] - stats_before == 256,
                        "the lane's writes in the LU's metrics")
            assert lane.native.credit <= 2 * lane_mod.CREDIT_BLOCK
    asyncio.run(go())


def test_writes_the_lane_does_not_take_are_pythons(ceph, tmp_path):
    """FUA, WRPROTECT, a write whose data needs R2Ts, one with a residual:
    not the lane's (its count stays), answered by Python's path as ever."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            before = lane_writes(r)
            x = await r.i.scsi(0, write10(0, 8, 0x08), data_out=b"f" * 4096)      # FUA
            assert x.status == GOOD
            x = await r.i.scsi(0, write10(8, 8, 0x20), data_out=b"p" * 4096)      # WRPROTECT
            assert x.status == CHECK_CONDITION and x.sense[12] == 0x24, x.sense.hex()
            big = os.urandom(r.i.first_burst + 65536)
            x = await r.i.scsi(0, write10(64, len(big) // 512), data_out=big)     # R2Ts
            assert x.status == GOOD and x.r2ts
            x = await r.i.scsi(0, write10(16, 8), data_out=b"q" * 8192)    # EDTL > transfer
            assert x.status == GOOD and x.flags & 0x02 and x.residual == 4096  # underflow
            assert lane_writes(r) == before
            img = await asyncio.to_thread(read_image, r.spec, 0, 64 * 512 + len(big))
            assert img[:4096] == b"f" * 4096 and img[8 * 512:12 * 512] != b"p" * 4096
            assert img[16 * 512:24 * 512] == b"q" * 4096 and img[64 * 512:] == big
    asyncio.run(go())


def test_a_fence_with_lane_writes_in_flight_answers_them_not_ready(ceph, tmp_path):
    async def go():
        async with rig(tmp_path, ceph) as r:
            lane = r.session.lane
            before = lane_writes(r)
            with osd_stopped(ceph):
                writes = [asyncio.ensure_future(r.i.scsi(0, write10(8 * k, 8),
                                                         data_out=bytes([k]) * 4096))
                          for k in range(16)]
                await until(lambda: lane.native.writes_inflight == 16, "16 lane writes in flight")
                r.store._fence("the image's exclusive lock was lost to another client")
                assert 0 not in lane._leases and not lane.native.published
            got = await asyncio.wait_for(asyncio.gather(*writes), 30)
            assert lane_writes(r) == before
            assert all(not_ready(x) for x in got), [(x.status, x.sense.hex()) for x in got]
    asyncio.run(go())


def test_takeover_during_lane_writes_no_good_status_after_it(ceph, tmp_path):
    """Another client breaks the image's lock while hosts write through the
    lane: no write sent after the takeover is answered GOOD, and reading
    the image afterwards finds in each writer's block the last write
    answered GOOD or a later one it sent (none acknowledged is lost)."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            stop = time.monotonic() + 60
            taken: list[float] = []
            sent_after: list[Any] = []
            # per writer: the values answered GOOD, and every value sent
            good: dict[int, list[int]] = {k: [] for k in range(16)}
            sent: dict[int, list[int]] = {k: [] for k in range(16)}

            async def writer(k: int) -> None:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    block = struct.pack(">II", k, n) * 512
                    sent[k].append(n)
                    t = time.monotonic()
                    x = await r.i.scsi(0, write10(8 * k, 8), data_out=block)
                    if taken and t > taken[0]:
                        sent_after.append(x)
                    if x.status == GOOD:
                        good[k].append(n)
                    elif not not_ready(x):
                        raise AssertionError((x.status, x.sense.hex()))
                    if taken and t > taken[0] + 1.0:
                        return
            writers = [asyncio.ensure_future(writer(k)) for k in range(16)]
            await until(lambda: lane_writes(r) > 200, "lane writes before the takeover", 20)
            img, close = await asyncio.to_thread(take_over, r.spec)
            taken.append(time.monotonic())
            try:
                await asyncio.wait_for(asyncio.gather(*writers), 60)
                data = await asyncio.to_thread(img.read, 0, 16 * 4096)
            finally:
                close()
            assert sent_after, "no write was sent after the takeover"
            assert not [x for x in sent_after if x.status == GOOD]
            for k in range(16):
                got = struct.unpack(">II", data[4096 * k:4096 * k + 8])
                assert got[0] == k and all(got == struct.unpack(">II", data[4096 * k + i:4096 * k + i + 8])
                                           for i in range(0, 4096, 512))
                last_good = good[k][-1]
                assert got[1] >= last_good and got[1] in sent[k], (k, got, last_good)
            assert "blocklisted" in r.svc.volume_show("r")["offline"]
    asyncio.run(go())


def test_a_lane_write_librbd_fails_is_pythons_with_its_data(ceph, tmp_path, monkeypatch):
    """Lane writes that fail without a fence (the OSD silent past the op
    timeout) are not answered by C: Python runs them again with their data,
    and once the OSD is back they are GOOD and on the image. (librbd fails
    such a write after about three op timeouts, the image's object map
    update among them: longer than the test initiator's default patience.)"""
    monkeypatch.setattr(initiator, "TIMEOUT", 60.0)

    async def go():
        async with rig(tmp_path, ceph) as r:
            lane, before = r.session.lane, lane_writes(r)
            data = os.urandom(4096)
            with osd_stopped(ceph):
                w = asyncio.ensure_future(r.i.scsi(0, write10(8, 8), data_out=data))
                await until(lambda: lane.native.writes_inflight == 1, "a lane write in flight")
                await until(lambda: lane.native.inflight == 0, "the lane write's timeout",
                            4 * TEST_OSD_OP_TIMEOUT_S + 10)
                # back to Python, which writes it again (the OSD resumes now)
                assert not w.done() and len(r.session.tasks) == 1
            x = await asyncio.wait_for(w, 60)
            assert x.status == GOOD, x.sense.hex()
            assert not x.r2ts               # its data went back with it: none asked again
            assert lane_writes(r) == before
            assert await asyncio.to_thread(read_image, r.spec, 4096, 4096) == data
            assert r.store.lost() is None and r.svc.volume_show("r")["offline"] is None
    asyncio.run(go())


def test_an_ordered_command_runs_after_the_lane_writes_in_flight(ceph, tmp_path):
    """SAM: an ORDERED command runs after every command before it. The
    lane's writes are not Python's tasks, so the wait for them is the
    lane's: an ORDERED TEST UNIT READY (which never reaches librbd) is
    answered only after the lane writes sent before it."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            lane = r.session.lane
            order: list[str] = []

            async def note(name: str, aw) -> Any:
                x = await aw
                order.append(name)
                return x
            with osd_stopped(ceph):
                writes = [asyncio.ensure_future(note("w", r.i.scsi(0, write10(8 * k, 8),
                                                                   data_out=b"o" * 4096)))
                          for k in range(4)]
                await until(lambda: lane.native.writes_inflight == 4, "4 lane writes in flight")
                tur = asyncio.ensure_future(note("tur", r.i.scsi(0, bytes(6), attr=ORDERED)))
                await asyncio.sleep(0.5)
                assert not tur.done()
            got = await asyncio.wait_for(asyncio.gather(*writes, tur), 30)
            assert [x.status for x in got] == [GOOD] * 5
            assert order[-1] == "tur", order
    asyncio.run(go())
