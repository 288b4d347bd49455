"""The monitor killed under host I/O, then restarted: the daemon stays alive
and answers, every RBD command ends (done or an error) within the bounded
op timeout, never a hang; a file-backed volume keeps serving without a
pause; an RBD volume create against the dead monitor fails within its
connect timeout with one line; the RBD volume is not fenced and goes on
once the monitor is back, with every acknowledged write in place."""
from __future__ import annotations

import asyncio
import time

import pytest

from restore_core.stores.rbd import CONNECT_TIMEOUT_S
from target.errors import ServiceError
from tests.ceph.conftest import COMMAND_BOUND_S, TEST_OSD_OP_TIMEOUT_S
from tests.ceph.test_rbd_volumes import started
from tests.ceph.writers import writing


def test_monitor_killed_and_restarted_under_io(ceph_bluestore, tmp_path):
    cl = ceph_bluestore

    async def go():
        s = await started(tmp_path)
        try:
            spec, w = await writing(s, cl, tmp_path)
            cmd = await asyncio.to_thread(cl.kill, "mon")
            t0 = time.monotonic()
            with pytest.raises(ServiceError, match="cannot connect"):
                await s.volume_create("r2", size="4M", rbd=cl.spec().image_name,
                                      ceph_conf=cl.conf)
            assert time.monotonic() - t0 < CONNECT_TIMEOUT_S + COMMAND_BOUND_S
            assert s.volume_show("r")["offline"] is None      # the daemon answers
            await asyncio.sleep(max(0.0, TEST_OSD_OP_TIMEOUT_S * 2 + 1 - (time.monotonic() - t0)))
            assert w.slowest_rbd < COMMAND_BOUND_S, f"an RBD command hung {w.slowest_rbd:.1f}s"
            assert w.slowest_file < 1.0, f"the file volume stalled {w.slowest_file:.2f}s"
            await asyncio.to_thread(cl.restart, "mon", cmd)
            resumed = await w.going_on()
            await w.stop()
            assert resumed is not None, "the RBD volume did not go on after the monitor came back"
            assert w.slowest_rbd < COMMAND_BOUND_S, f"an RBD command hung {w.slowest_rbd:.1f}s"
            assert s.volume_show("r")["offline"] is None      # a dead monitor is not fencing
            print(f"\nmonitor down: {len(w.failed)} RBD writes failed, slowest RBD command "
                  f"{w.slowest_rbd:.1f}s, file volume slowest write "
                  f"{w.slowest_file * 1000:.0f} ms; going on {resumed:.1f}s after the restart")
            await w.check_image(spec)
        finally:
            await s.stop()
    asyncio.run(go())
