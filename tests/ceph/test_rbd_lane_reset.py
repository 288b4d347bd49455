"""A reset from one session completes after the lane reads of the other
sessions it covers (SAM: a reset completes after the tasks it aborts). Lane
reads of an RBD LU are in flight in librbd across loop turns; the OSD is
stopped (SIGSTOP, well inside the op timeout) to hold them there."""
from __future__ import annotations

import asyncio
import os
import signal
import struct
import time

import pytest

from restore_core.plain_lunio import PlainLunIO
from restore_core.stores import open_store
from target.iscsi import IscsiServer, IscsiTargetConfig
from target.iscsi import datapath, session, tmf
from target.iscsi import lane as lane_mod
from target.iscsi import pdu as P
from target.scsi.device import ScsiDevice
from target.scsi.identity import DeviceIdentity
from target.scsi.lunset import LunSet
from tests.target.iscsi.initiator import Initiator

if lane_mod.Lane is None:
    pytest.skip("the native lane is not built", allow_module_level=True)

IQN = "iqn.2025-01.org.test:rbd-lane-reset"
MiB = 1 << 20
#: how long the reads are held in the stopped OSD (the op timeout is 5 s)
HELD_S = 1.5


@pytest.fixture(autouse=True)
def lane_on(monkeypatch):
    for m in (lane_mod, datapath, session, tmf):
        monkeypatch.setattr(m, "ENABLED" if m is lane_mod else "LANE_ENABLED", True)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


async def _ready(i: Initiator) -> None:
    for _ in range(5):
        if (await i.scsi(0, bytes(6))).status == 0:
            return
    raise AssertionError("TEST UNIT READY never succeeded")


async def _timed(coro):
    r = await coro
    return r, time.monotonic()


@pytest.mark.parametrize("func", [P.TMF_LUN_RESET, P.TMF_TARGET_WARM_RESET])
def test_reset_from_b_answers_after_a_lane_read_of_a_in_flight(ceph, func):
    spec = ceph.spec()
    store = open_store(spec, 16 * MiB, create=True)
    osd = int(open(os.path.join(ceph.dir, "pids", "osd")).read())
    data = os.urandom(4096)

    async def main():
        await store.write(0, data)
        ident = DeviceIdentity(product_id="liverestore", revision="0001", serial="rbdlanereset",
                               naa="5000000000000001", t10_vendor_id="rbdlanereset")
        srv = IscsiServer([IscsiTargetConfig(IQN, LunSet({0: ScsiDevice(PlainLunIO(store), ident)}))],
                          [("127.0.0.1", 0)])
        await srv.start()
        stopped = False
        try:
            a, b = (Initiator(*srv.addresses[0], name=f"iqn.2025-01.org.test:reset-{x}") for x in "ab")
            for i in (a, b):
                await i.login(IQN)
                await _ready(i)
            for s in srv.sessions.values():
                s.lane.check()
                assert 0 in s.lane._leases, "the RBD LU was not published to the lane"
            lane_a = next(s.lane for s in srv.sessions.values() if "reset-a" in s.nexus.initiator)
            os.kill(osd, signal.SIGSTOP)
            stopped = True
            read = asyncio.create_task(_timed(a.scsi(0, read10(0, 8), read_len=4096)))
            for _ in range(100):
                if lane_a.native.inflight:
                    break
                await asyncio.sleep(0.01)
            assert lane_a.native.inflight == 1, "the read did not go through the lane"
            reset = asyncio.create_task(_timed(b.tmf(func, 0)))
            await asyncio.sleep(HELD_S)
            assert not read.done()
            assert not reset.done(), "the reset was answered with a lane read of A in flight"
            os.kill(osd, signal.SIGCONT)
            stopped = False
            (r, t_read), (response, t_reset) = await asyncio.gather(read, reset)
            assert r.status == 0 and r.data == data
            assert response == P.TMF_RSP_COMPLETE
            assert t_read <= t_reset
            await a.close()
            await b.close()
        finally:
            if stopped:
                os.kill(osd, signal.SIGCONT)
            await srv.stop()
            store.close()
    asyncio.run(asyncio.wait_for(main(), 60))
