"""The OSD killed and restarted under host I/O: the daemon keeps serving
(a file-backed volume without a pause), the RBD volume's commands end in
errors within the bounded op timeout (never a hang), it is not fenced, and
it resumes once the OSD is back, with every acknowledged write in place."""
from __future__ import annotations

import asyncio
import time

from restore_core.lunio import MediumError
from tests.ceph.conftest import TEST_OSD_OP_TIMEOUT_S
from tests.ceph.util import read_image
from tests.ceph.test_rbd_volumes import started
from restore_core.stores.spec import spec_of_record

MiB = 1 << 20
BLOCKS = 256                      # 4 KiB blocks written round-robin


def test_osd_killed_and_restarted_under_io(ceph_bluestore, tmp_path):
    cl = ceph_bluestore

    async def go():
        s = await started(tmp_path)
        try:
            v = await s.volume_create("r", size="4M", rbd=cl.spec().image_name, ceph_conf=cl.conf)
            await s.volume_create("f", path=str(tmp_path / "f.img"), size="4M")
            r, f = s.devices["r"].lunio, s.devices["f"].lunio
            acked: dict[int, int] = {}           # block -> last acknowledged generation
            errors: list[float] = []             # how long each failed command took
            slowest_file = [0.0]
            stop = asyncio.Event()

            async def rbd_writer() -> None:
                gen = 0
                while not stop.is_set():
                    gen += 1
                    blk = gen % BLOCKS
                    t = time.monotonic()
                    try:
                        await r.write(blk * 4096, gen.to_bytes(4, "big") * 1024, fua=True)
                        acked[blk] = gen
                    except MediumError:
                        errors.append(time.monotonic() - t)
                    await asyncio.sleep(0.005)

            async def file_writer() -> None:
                n = 0
                while not stop.is_set():
                    t = time.monotonic()
                    await f.write((n % BLOCKS) * 4096, b"f" * 4096, fua=True)
                    slowest_file[0] = max(slowest_file[0], time.monotonic() - t)
                    n += 1
                    await asyncio.sleep(0.005)

            tasks = [asyncio.ensure_future(rbd_writer()), asyncio.ensure_future(file_writer())]
            await asyncio.sleep(1.0)
            assert acked and not errors
            cmd = await asyncio.to_thread(cl.kill_osd)
            await asyncio.sleep(TEST_OSD_OP_TIMEOUT_S * 2 + 1)
            assert errors, "no RBD command failed while the OSD was dead"
            assert max(errors) < TEST_OSD_OP_TIMEOUT_S + 3, f"a command hung {max(errors):.1f}s"
            assert slowest_file[0] < 1.0, f"the file volume stalled {slowest_file[0]:.2f}s"
            failed_before = len(errors)
            await asyncio.to_thread(cl.start_osd, cmd)
            t0, resumed = time.monotonic(), None
            while time.monotonic() - t0 < 90:
                before = dict(acked)
                await asyncio.sleep(1.0)
                if any(acked.get(b) != g for b, g in before.items()) or len(acked) > len(before):
                    resumed = time.monotonic() - t0
                    break
            stop.set()
            await asyncio.gather(*tasks)
            assert resumed is not None, "the RBD volume did not resume after the OSD came back"
            assert s.volume_show("r")["offline"] is None      # a timeout is not fencing
            print(f"\nOSD down: {failed_before} RBD writes failed (slowest {max(errors):.1f}s), "
                  f"file volume slowest write {slowest_file[0]*1000:.0f} ms; resumed "
                  f"{resumed:.1f}s after the restart")
            spec = spec_of_record("rbd", v["path"])
            data = await asyncio.to_thread(read_image, spec, 0, BLOCKS * 4096)
            for blk, gen in acked.items():
                got = int.from_bytes(data[blk * 4096:blk * 4096 + 4], "big")
                # a later write of the same block may have landed unacknowledged
                assert got >= gen, f"block {blk}: acknowledged generation {gen} lost ({got})"
        finally:
            await s.stop()
    asyncio.run(go())
