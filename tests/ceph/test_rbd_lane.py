"""The native iSCSI READ lane on RBD LUs (target/iscsi/_nativelane.c, lane.py)
against the real cluster: its reads ride the store's submitter thread, a
fenced store's reads are never answered GOOD by the lane (they go back to
Python, which answers NOT READY with the reason), and the reads it has in
flight are charged to the session's memory budget. The lane is turned on
here, whatever the default."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import Any, AsyncIterator

import pytest

from target.iscsi import lane as lane_mod

if lane_mod.Lane is None or lane_mod.NATIVE_API is None:
    pytest.fail("the native lane and the C RBD submitter must be built (bash .ci/install --test)")

from target.service import Service  # noqa: E402
from tests.ceph.conftest import TEST_OSD_OP_TIMEOUT_S  # noqa: E402
from tests.ceph.util import stop_process, take_over  # noqa: E402
from tests.support import free_port  # noqa: E402
from tests.target.iscsi.initiator import Initiator  # noqa: E402
from tests.target.iscsi.test_nativelane import lane_on, read10  # noqa: E402,F401 (autouse fixture)
from tests.target.iscsi.test_scsi_integration import ready  # noqa: E402

MiB = 1 << 20
SIZE = 8 * MiB
IQN = "iqn.2025-01.org.test:rbd-lane"
GOOD, CHECK_CONDITION, BUSY, TASK_SET_FULL = 0x00, 0x02, 0x08, 0x28
NOT_READY = 0x02


class Rig:
    def __init__(self, svc: Service, initiator: Initiator, spec: Any) -> None:
        self.svc = svc
        self.i = initiator
        self.spec = spec
        self.store = svc.eng.volumes["r"].store

    @property
    def session(self) -> Any:
        (s,) = self.svc.frontend.server.sessions.values()
        return s

    async def published(self) -> None:
        """Until the session's lane serves LUN 0 (the route poll)."""
        for _ in range(200):
            if self.session.lane._leases.get(0):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the lane never published the RBD LUN")

    def lane_reads(self) -> int:
        return self.session.lane.native.lun_counts(0)[0]


@contextlib.asynccontextmanager
async def rig(tmp_path, ceph, **login: Any) -> AsyncIterator[Rig]:
    port = free_port()
    svc = Service(str(tmp_path / "state"), init=True, portals=[("127.0.0.1", port)],
                  backend="embedded")
    await svc.start()
    try:
        spec = ceph.spec()
        await svc.volume_create("r", size=SIZE, rbd=spec.image_name, ceph_conf=ceph.conf)
        await svc.export_create(IQN, luns={"0": "r"})
        i = Initiator("127.0.0.1", port)
        await i.login(IQN, **login)
        await ready(i, 0)
        r = Rig(svc, i, spec)
        await r.published()
        try:
            yield r
        finally:
            await i.close()
    finally:
        await svc.stop()


@contextlib.contextmanager
def osd_stopped(ceph):
    """The OSD stopped (SIGSTOP) meanwhile: reads stay in flight."""
    pid = int(open(os.path.join(ceph.dir, "pids", "osd")).read())
    stop_process(pid)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def until(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def not_ready(r) -> bool:
    return r.status == CHECK_CONDITION and (r.sense[2] & 0x0F) == NOT_READY \
        and r.sense[12:14] == b"\x04\x03"


def test_lane_reads_ride_the_stores_submitter_and_return_its_bytes(ceph, tmp_path):
    async def go():
        async with rig(tmp_path, ceph) as r:
            data = os.urandom(1 * MiB)
            await r.svc.devices["r"].lunio.write(0, data, fua=True)
            sub = r.store._submitter
            started, before, refs = sub.started, r.lane_reads(), sys.getrefcount(sub)
            out = r.session.bytes_out
            got = await asyncio.gather(*(r.i.read(0, 8 * k, 8) for k in range(256)))
            assert b"".join(got) == data
            assert r.lane_reads() - before == 256          # all of them the lane's
            assert r.session.bytes_out - out == len(data)  # the session's traffic counts them
            # ... queued on the store's own thread (librbd never called on the loop's)
            assert sub.started - started >= 256
            assert r.session.lane.native.inflight == 0
            assert sys.getrefcount(sub) == refs             # each read's reference let go
            # what the reads held goes back, but for the lane's idle credit
            assert r.session.lane.native.credit <= 2 * lane_mod.CREDIT_BLOCK
            assert r.session.budget.used <= 2 * lane_mod.CREDIT_BLOCK
    asyncio.run(go())


def test_a_fence_with_lane_reads_in_flight_answers_them_not_ready(ceph, tmp_path):
    """The store fences (its lock lost) while lane reads are in flight: the
    lane is revoked before the fence returns, and reads librbd completes
    after it are not answered GOOD: Python answers them NOT READY."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            await r.svc.devices["r"].lunio.write(0, b"x" * 65536, fua=True)
            lane = r.session.lane
            before = r.lane_reads()
            with osd_stopped(ceph):
                reads = [asyncio.ensure_future(r.i.scsi(0, read10(8 * k, 8), read_len=4096))
                         for k in range(16)]
                await until(lambda: lane.native.inflight == 16, "16 lane reads in flight")
                r.store._fence("the image's exclusive lock was lost to another client")
                # revoked synchronously: no new lane read from here on
                assert 0 not in lane._leases and not lane.native.published
            got = await asyncio.wait_for(asyncio.gather(*reads), 30)
            assert r.lane_reads() == before
            assert all(not_ready(x) for x in got), [(x.status, x.sense.hex()) for x in got]
            # and Python keeps answering it so, with the lane out of the way
            x = await r.i.scsi(0, read10(0, 8), read_len=4096)
            assert not_ready(x) and r.lane_reads() == before
            assert "exclusive lock" in r.svc.volume_show("r")["offline"]
    asyncio.run(go())


def test_takeover_during_lane_reads_no_good_status_after_it(ceph, tmp_path):
    """Another client breaks the image's lock (blocklisting the daemon's
    client) while hosts read through the lane: every read sent after the
    takeover gets NOT READY, none GOOD, and the lane's failed reads are
    answered by Python (which fences the store), never MEDIUM ERROR."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            await r.svc.devices["r"].lunio.write(0, os.urandom(MiB), fua=True)
            results: list[tuple[float, float, Any]] = []
            stop = time.monotonic() + 60
            taken: list[float] = []

            async def reader(k: int) -> None:
                n = 0
                while time.monotonic() < stop:
                    sent = time.monotonic()
                    x = await r.i.scsi(0, read10(8 * ((k * 31 + n) % 256), 8), read_len=4096)
                    results.append((sent, time.monotonic(), x))
                    n += 1
                    if taken and sent > taken[0] + 1.0:
                        return
            readers = [asyncio.ensure_future(reader(k)) for k in range(16)]
            await until(lambda: r.lane_reads() > 200, "lane reads before the takeover", 20)
            img, close = await asyncio.to_thread(take_over, r.spec)
            taken.append(time.monotonic())
            try:
                await asyncio.wait_for(asyncio.gather(*readers), 60)
            finally:
                close()
            after = [x for sent, _, x in results if sent > taken[0]]
            assert after, "no read was sent after the takeover"
            assert not [x for x in after if x.status == GOOD]
            assert all(not_ready(x) for x in after), {(x.status, x.sense.hex()) for x in after}
            # nothing but GOOD or NOT READY, ever (no MEDIUM ERROR from the lane)
            assert all(x.status == GOOD or not_ready(x) for _, _, x in results)
            assert "blocklisted" in r.svc.volume_show("r")["offline"]
    asyncio.run(go())


def test_lane_reads_in_flight_are_charged_to_the_session_budget(ceph, tmp_path):
    """With room in the session's budget for three 64 KiB reads, the lane
    takes three and leaves the rest to Python (BUSY / TASK SET FULL, or
    waiting for budget), and the budget never goes over its limit."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            data = os.urandom(MiB)
            await r.svc.devices["r"].lunio.write(0, data, fua=True)
            s = r.session
            lane, budget = s.lane, s.budget
            limit = budget.server.session_limit
            lane._give_credit(0)
            cost = 65536 + 48 + 256                    # a read's Data-In and request, roughly
            filler = limit - budget.used - 3 * cost - 2048
            assert budget.try_take(filler)
            before = r.lane_reads()
            with osd_stopped(ceph):
                reads = [asyncio.ensure_future(r.i.scsi(0, read10(128 * k, 128), read_len=65536))
                         for k in range(16)]
                await until(lambda: lane.native.inflight == 3, "three lane reads in flight")
                await asyncio.sleep(0.2)               # every command has arrived
                assert lane.native.inflight == 3
                assert budget.used <= limit
                assert lane.native.credit_calls <= 4         # then no call per command
            got = await asyncio.wait_for(asyncio.gather(*reads), 30)
            budget.give(filler)
            assert r.lane_reads() - before >= 3
            for k, x in enumerate(got):
                assert x.status in (GOOD, BUSY, TASK_SET_FULL), (x.status, x.sense.hex())
                if x.status == GOOD:
                    assert x.data == data[k * 65536:(k + 1) * 65536]
            assert lane.native.inflight == 0
            await until(lambda: budget.used <= 2 * lane_mod.CREDIT_BLOCK, "the budget back")
    asyncio.run(go())


def test_stop_with_lane_reads_in_flight_waits_for_them_not_the_drain_timeout(ceph, tmp_path,
                                                                              caplog):
    """The store's close counts the lane's reads (C API calls) as in flight
    and is woken when they end: a stop with some in flight ends once the
    cluster answers, with nothing left over, not after DRAIN_TIMEOUT_S."""
    async def go():
        ctx = rig(tmp_path, ceph)
        r = await ctx.__aenter__()
        lane = r.session.lane
        sub = r.store._submitter
        # (written: librbd answers a read of an object that does not exist itself)
        await r.svc.devices["r"].lunio.write(0, b"w" * 65536, fua=True)
        with osd_stopped(ceph):
            for k in range(8):
                asyncio.ensure_future(r.i.scsi(0, read10(8 * k, 8), read_len=4096))
            await until(lambda: lane.native.inflight == 8, "8 lane reads in flight")
            asyncio.get_running_loop().call_later(0.5, os.kill, int(open(os.path.join(
                ceph.dir, "pids", "osd")).read()), signal.SIGCONT)
            t0 = time.monotonic()
            await ctx.__aexit__(None, None, None)
            took = time.monotonic() - t0
        assert took < 10, took
        assert sub.taken == sub.started
    with caplog.at_level("WARNING"):
        asyncio.run(go())
    assert not [m for m in caplog.messages if "still in flight" in m]


def test_a_lane_read_that_times_out_is_retried_by_python(ceph, tmp_path):
    """Lane reads that fail without a fence (the OSD silent past the op
    timeout) are not answered by C: Python runs them again, and once the
    OSD is back they return the image's bytes; nothing is fenced."""
    async def go():
        async with rig(tmp_path, ceph) as r:
            data = os.urandom(65536)
            await r.svc.devices["r"].lunio.write(0, data, fua=True)
            lane, before = r.session.lane, r.lane_reads()
            with osd_stopped(ceph):
                reads = [asyncio.ensure_future(r.i.scsi(0, read10(8 * k, 8), read_len=4096))
                         for k in range(4)]
                await until(lambda: lane.native.inflight == 4, "4 lane reads in flight")
                # they time out (rados_osd_op_timeout): back to Python, not answered
                await until(lambda: lane.native.inflight == 0, "the lane reads' timeout",
                            TEST_OSD_OP_TIMEOUT_S + 10)
                assert not any(f.done() for f in reads)
                assert len(r.session.tasks) == 4
            got = await asyncio.wait_for(asyncio.gather(*reads), 30)
            assert [x.status for x in got] == [GOOD] * 4
            assert b"".join(x.data for x in got) == data[:4 * 4096]
            assert r.lane_reads() == before
            assert r.store.lost() is None and r.svc.volume_show("r")["offline"] is None
    asyncio.run(go())
