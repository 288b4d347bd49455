"""The OSD killed and restarted under host I/O: the daemon keeps serving
(a file-backed volume without a pause), the RBD volume's commands end in
errors within the bounded op timeout (never a hang), it is not fenced, and
it resumes once the OSD is back, with every acknowledged write in place."""
from __future__ import annotations

import asyncio

from tests.ceph.conftest import COMMAND_BOUND_S, TEST_OSD_OP_TIMEOUT_S
from tests.ceph.test_rbd_volumes import started
from tests.ceph.writers import writing


def test_osd_killed_and_restarted_under_io(ceph_bluestore, tmp_path):
    cl = ceph_bluestore

    async def go():
        s = await started(tmp_path)
        try:
            spec, w = await writing(s, cl, tmp_path)
            cmd = await asyncio.to_thread(cl.kill, "osd")
            await asyncio.sleep(TEST_OSD_OP_TIMEOUT_S * 2 + 1)
            assert w.failed, "no RBD command failed while the OSD was dead"
            assert max(w.failed) < COMMAND_BOUND_S, f"a command hung {max(w.failed):.1f}s"
            assert w.slowest_file < 1.0, f"the file volume stalled {w.slowest_file:.2f}s"
            failed_before = len(w.failed)
            await asyncio.to_thread(cl.restart, "osd", cmd)
            resumed = await w.going_on()
            await w.stop()
            assert resumed is not None, "the RBD volume did not resume after the OSD came back"
            assert s.volume_show("r")["offline"] is None      # a timeout is not fencing
            print(f"\nOSD down: {failed_before} RBD writes failed (slowest {max(w.failed):.1f}s), "
                  f"file volume slowest write {w.slowest_file * 1000:.0f} ms; resumed "
                  f"{resumed:.1f}s after the restart")
            await w.check_image(spec)
        finally:
            await s.stop()
    asyncio.run(go())
