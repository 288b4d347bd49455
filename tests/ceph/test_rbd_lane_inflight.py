"""Task management, a reused ITT, logout and a dropped connection while
lane reads of an RBD LU are in flight in librbd across loop turns: the OSD
is stopped (SIGSTOP, well inside the op timeout) to hold them there.

SAM: a reset completes after the tasks it aborts, so a reset from one
session answers after the lane reads of the other sessions it covers; a
lane read cannot be aborted (librbd owns its buffer), so what covers it is
answered after it."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest

from restore_core.plain_lunio import PlainLunIO
from restore_core.stores import open_store
from target.iscsi import IscsiServer, IscsiTargetConfig
from target.iscsi import lane as lane_mod
from target.iscsi import pdu as P
from target.scsi.device import ScsiDevice
from target.scsi.identity import DeviceIdentity
from target.scsi.lunset import LunSet
from tests.ceph.util import stop_process
from tests.target.iscsi.initiator import Initiator, InitiatorError
from tests.target.iscsi.test_nativelane_hostile import lane_on, read10  # noqa: F401 (autouse fixture)
from tests.target.iscsi.test_scsi_integration import ready

if lane_mod.Lane is None:
    pytest.skip("the native lane is not built", allow_module_level=True)

IQN = "iqn.2025-01.org.test:rbd-lane-inflight"
MiB = 1 << 20
#: how long reads are held in the stopped OSD (the op timeout is 5 s)
HELD_S = 1.5
DATA = os.urandom(4096)


async def _timed(coro):
    r = await coro
    return r, time.monotonic()


class Held:
    """Sessions logged in to an RBD LU published to their lanes, and the
    cluster's OSD to stop and continue."""

    def __init__(self, srv: IscsiServer, osd: int, initiators: list[Initiator]) -> None:
        self.srv, self.osd, self.initiators = srv, osd, initiators
        self.stopped = False

    def lane(self, name: str):
        return next(s.lane for s in self.srv.sessions.values() if name in s.nexus.initiator)

    def stop_osd(self) -> None:
        stop_process(self.osd)
        self.stopped = True

    def continue_osd(self) -> None:
        if self.stopped:
            os.kill(self.osd, signal.SIGCONT)
            self.stopped = False

    async def in_flight(self, name: str, n: int = 1) -> None:
        lane = self.lane(name)
        for _ in range(300):
            if lane.native.inflight >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{lane.native.inflight} reads in flight in the lane, not {n}; "
                             f"published {lane.native.published}, holds {lane_mod.HOLDS}, "
                             f"leases {lane._leases}, python tasks {len(lane.session.tasks)}, "
                             f"counts {lane.native.lun_counts(0)}")


@asynccontextmanager
async def held(ceph, *names: str) -> AsyncIterator[Held]:
    store = open_store(ceph.spec(), 16 * MiB, create=True)
    osd = int(open(os.path.join(ceph.dir, "pids", "osd")).read())
    await store.write(0, DATA)
    ident = DeviceIdentity(product_id="liverestore", revision="0001", serial="rbdlaneinflight",
                           naa="5000000000000001", t10_vendor_id="rbdlaneinflight")
    srv = IscsiServer([IscsiTargetConfig(IQN, LunSet({0: ScsiDevice(PlainLunIO(store), ident)}))],
                      [("127.0.0.1", 0)])
    await srv.start()
    h = Held(srv, osd, [])
    try:
        for x in names:
            i = Initiator(*srv.addresses[0], name=f"iqn.2025-01.org.test:{x}")
            await i.login(IQN)
            await ready(i, 0)
            h.initiators.append(i)
        for s in srv.sessions.values():
            s.lane.check()
            assert 0 in s.lane._leases, "the RBD LU was not published to the lane"
        yield h
        for i in h.initiators:
            await i.close()
    finally:
        h.continue_osd()
        await srv.stop()
        store.close()


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("func", [P.TMF_LUN_RESET, P.TMF_TARGET_WARM_RESET])
def test_reset_from_b_answers_after_a_lane_read_of_a_in_flight(ceph, func):
    async def main():
        async with held(ceph, "reset-a", "reset-b") as h:
            a, b = h.initiators
            h.stop_osd()
            read = asyncio.create_task(_timed(a.scsi(0, read10(0, 8), read_len=4096)))
            await h.in_flight("reset-a")
            reset = asyncio.create_task(_timed(b.tmf(func, 0)))
            await asyncio.sleep(HELD_S)
            assert not read.done()
            assert not reset.done(), "the reset was answered with a lane read of A in flight"
            h.continue_osd()
            (r, t_read), (response, t_reset) = await asyncio.gather(read, reset)
            assert r.status == 0 and r.data == DATA
            assert response == P.TMF_RSP_COMPLETE
            assert t_read <= t_reset
    run(main())


def test_itt_of_a_lane_read_in_flight_is_rejected_as_python_would(ceph):
    async def main():
        async with held(ceph, "itt-a") as h:
            (a,) = h.initiators
            h.stop_osd()
            read = asyncio.create_task(a.scsi(0, read10(0, 8), read_len=4096))
            await h.in_flight("itt-a")
            itt = a.itt
            # the same ITT again (a hostile initiator): a Reject, TASK IN
            # PROGRESS, and the read in flight is left alone
            a.route_rejects = False
            a.send(P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_READ | 1, lun=0, itt=itt,
                               fields={20: 4096, 24: a.cmdsn, 28: a.exp_statsn},
                               raw={32: read10(8, 8).ljust(16, b"\0")}))
            a.cmdsn += 1
            rej = await asyncio.wait_for(a.rejects.get(), 5)
            assert rej.bhs[2] == P.REJECT_TASK_IN_PROGRESS
            assert struct.unpack_from(">I", rej.data, 16)[0] == itt
            h.continue_osd()
            r = await read
            assert r.status == 0 and r.data == DATA
    run(main())


@pytest.mark.parametrize("request_", ["ABORT TASK", "logout"])
def test_a_request_covering_a_lane_read_in_flight_answers_after_it(ceph, request_):
    """ABORT TASK of the read, or a logout: the read completes (it cannot be
    aborted), then the request is answered (for the ABORT, the task no
    longer exists)."""
    async def main():
        async with held(ceph, "covering-a") as h:
            (a,) = h.initiators
            h.stop_osd()
            read = asyncio.create_task(_timed(a.scsi(0, read10(0, 8), read_len=4096)))
            await h.in_flight("covering-a")
            if request_ == "logout":
                req, answers = a.logout(), (0,)
            else:
                req = a.tmf(P.TMF_ABORT_TASK, 0, ref_itt=a.itt, ref_cmdsn=a.cmdsn - 1)
                answers = (P.TMF_RSP_COMPLETE, P.TMF_RSP_NO_TASK)
            answer = asyncio.create_task(_timed(req))
            await asyncio.sleep(HELD_S)
            assert not answer.done(), f"{request_} answered with the read in flight"
            h.continue_osd()
            (r, t_read), (response, t_answer) = await asyncio.gather(read, answer)
            assert r.status == 0 and r.data == DATA and t_read <= t_answer
            assert response in answers
    run(main())


def test_connection_dropped_with_lane_reads_in_flight(ceph):
    """The reads complete into a lane whose session is gone: nothing is
    answered, nothing leaks, and the LU serves a new session through its
    lane."""
    async def main():
        async with held(ceph, "drop-a") as h:
            (a,) = h.initiators
            lane = h.lane("drop-a")
            h.stop_osd()
            reads = [asyncio.create_task(a.scsi(0, read10(8 * k, 8), read_len=4096)) for k in range(4)]
            await h.in_flight("drop-a", 4)
            a.writer.transport.abort()
            for _ in range(100):
                if not h.srv.sessions:
                    break
                await asyncio.sleep(0.01)
            assert not h.srv.sessions
            h.continue_osd()
            for _ in range(500):
                if not lane.native.inflight and not lane._draining:
                    break
                await asyncio.sleep(0.01)
            assert not lane.native.inflight and not lane._draining
            for t in reads:
                t.cancel()
            b = Initiator(*h.srv.addresses[0], name="iqn.2025-01.org.test:drop-b")
            await b.login(IQN)
            await ready(b, 0)
            for s in h.srv.sessions.values():
                s.lane.check()
            assert (await b.scsi(0, read10(0, 8), read_len=4096)).data == DATA
            assert h.lane("drop-b").native.lun_counts(0)[0] == 1
            h.initiators[:] = [b]
    run(main())


class _OutOfMemory:
    """A lane's native object whose complete() runs out of memory mid-batch
    while answering, as PyList_Append failing would: the reads are taken
    off the lane and freed unanswered, then MemoryError. (For a connection
    already gone nothing is answered, so nothing is allocated.)"""

    def __init__(self, native) -> None:
        self._native = native

    def __getattr__(self, name: str):
        return getattr(self._native, name)

    def complete(self, out, *args):
        got = self._native.complete(None, *args)
        if out is None:
            return got
        raise MemoryError


def test_out_of_memory_answering_lane_reads_drops_that_connection_only(ceph, caplog):
    """Running out of memory while answering a batch of lane reads drops
    that connection (its host retries on a new one), with one error line
    and no traceback; the lane ends empty and other sessions keep reading."""
    async def main():
        async with held(ceph, "oom-a", "oom-b") as h:
            a, b = h.initiators
            lane = h.lane("oom-a")
            lane.native = _OutOfMemory(lane.native)
            h.stop_osd()
            reads = [asyncio.create_task(a.scsi(0, read10(8 * k, 8), read_len=4096))
                     for k in range(4)]
            await h.in_flight("oom-a", 4)
            h.continue_osd()
            for _ in range(500):
                if len(h.srv.sessions) == 1:
                    break
                await asyncio.sleep(0.01)
            assert ["oom-b" in s.nexus.initiator for s in h.srv.sessions.values()] == [True]
            assert not lane.native.inflight and not lane._draining
            got = await asyncio.gather(*reads, return_exceptions=True)
            assert all(isinstance(x, InitiatorError) for x in got), got   # the host saw it drop
            assert (await b.scsi(0, read10(0, 8), read_len=4096)).data == DATA
            h.initiators[:] = [b]
    with caplog.at_level(logging.INFO):
        run(main())
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert sum("out of memory answering lane reads; connection dropped" in r.getMessage()
               for r in caplog.records) == 1
