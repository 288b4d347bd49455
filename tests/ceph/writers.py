"""Host writes to an RBD volume and a file volume at once, for the tests
that take part of the cluster down: what was acknowledged, how long each
command took, and whether the RBD volume goes on afterwards."""
from __future__ import annotations

import asyncio
import time

from restore_core.lunio import LunIO, LunIOError
from restore_core.stores.spec import RbdSpec, spec_of_record
from target.service import Service
from tests.ceph.conftest import Cluster
from tests.ceph.util import read_image

BLOCKS = 256                      # 4 KiB blocks written round-robin


async def writing(s: Service, cl: Cluster, tmp_path) -> tuple[RbdSpec, "Writers"]:
    """Volumes r (RBD, on ``cl``) and f (a file) under way with writes for
    a second; returns r's image and the writers."""
    v = await s.volume_create("r", size="4M", rbd=cl.spec().image_name, ceph_conf=cl.conf)
    await s.volume_create("f", path=str(tmp_path / "f.img"), size="4M")
    w = Writers(s.devices["r"].lunio, s.devices["f"].lunio)
    w.start()
    await asyncio.sleep(1.0)
    assert w.acked and not w.failed
    return spec_of_record("rbd", v["path"]), w


class Writers:
    def __init__(self, rbd: LunIO, file: LunIO) -> None:
        self.rbd, self.file = rbd, file
        self.acked: dict[int, int] = {}      # block -> last acknowledged generation
        self.failed: list[float] = []        # how long each failed RBD command took
        self.slowest_rbd = 0.0
        self.slowest_file = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._rbd_writer()),
                       asyncio.ensure_future(self._file_writer())]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _rbd_writer(self) -> None:
        gen = 0
        while not self._stop.is_set():
            gen += 1
            blk = gen % BLOCKS
            t = time.monotonic()
            try:
                await self.rbd.write(blk * 4096, gen.to_bytes(4, "big") * 1024, fua=True)
                self.acked[blk] = gen
            except LunIOError:
                self.failed.append(time.monotonic() - t)
            self.slowest_rbd = max(self.slowest_rbd, time.monotonic() - t)
            await asyncio.sleep(0.005)

    async def _file_writer(self) -> None:
        n = 0
        while not self._stop.is_set():
            t = time.monotonic()
            await self.file.write((n % BLOCKS) * 4096, b"f" * 4096, fua=True)
            self.slowest_file = max(self.slowest_file, time.monotonic() - t)
            n += 1
            await asyncio.sleep(0.005)

    async def going_on(self, within: float = 90.0) -> float | None:
        """Seconds until an RBD write is acknowledged again, None if none
        within ``within``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < within:
            before = dict(self.acked)
            await asyncio.sleep(1.0)
            if any(self.acked.get(b) != g for b, g in before.items()) \
                    or len(self.acked) > len(before):
                return time.monotonic() - t0
        return None

    async def check_image(self, spec: RbdSpec) -> None:
        """Every acknowledged write is in the image, as another client reads it."""
        data = await asyncio.to_thread(read_image, spec, 0, BLOCKS * 4096)
        for blk, gen in self.acked.items():
            got = int.from_bytes(data[blk * 4096:blk * 4096 + 4], "big")
            # a later write of the same block may have landed unacknowledged
            assert got >= gen, f"block {blk}: acknowledged generation {gen} lost ({got})"
