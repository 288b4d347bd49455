"""What a fracture snapshot of an RBD clone (restore_core.instants) costs,
on a throw-away single-node Ceph cluster (memstore).

    python -m tests.bench.rbd_snapshot      (ROUNDS, WRITES, SIZE_MB env knobs)

Prints raw numbers and, as its last line, one JSON object:

  snapshot_create_ms        the snapshot as the fracture takes it (hosts are
                            held meanwhile): median of the rounds
  write_4k_after_snapshot_ratio
                            4 KiB random writes, 32 in flight, through the
                            store, on an image just snapshotted / on one
                            without a snapshot (each object's first write
                            after a snapshot is copy-on-write at the OSD)
  load_1min                 the 1-minute load average at start and end

Both sides of the ratio run in the same run, alternating, each round on a
fresh, fully written image (removed after it: memstore holds everything
in RAM). Reports, never asserts a goal.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):   # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from restore_core.stores.rbd import RbdStore  # noqa: E402
from restore_core.stores.spec import RbdSpec  # noqa: E402
from tests.bench.rbd import SCRIPT, log, start_cluster  # noqa: E402

MiB = 1 << 20
ROUNDS = int(os.environ.get("ROUNDS", "5"))
WRITES = int(os.environ.get("WRITES", "3000"))
SIZE = int(os.environ.get("SIZE_MB", "128")) * MiB
DEPTH = 32


async def one_round(conf: str, n: int, snapshot: bool) -> tuple[float, float | None]:
    """(write IOPS, snapshot create seconds or None) on a fresh image."""
    store = RbdStore(RbdSpec("rbd", f"snapbench-{n}", conf), SIZE, create=True)
    try:
        for off in range(0, SIZE, 4 * MiB):             # every object exists
            await store.write(off, os.urandom(4 * MiB))
        token, took = None, None
        if snapshot:
            t0 = time.perf_counter()
            token = await store.mark_instant(f"liverestore.{n}.bench")
            took = time.perf_counter() - t0
        rnd = random.Random(n)
        offsets = [rnd.randrange(0, SIZE // 4096) * 4096 for _ in range(WRITES)]
        data = os.urandom(4096)
        slots = asyncio.Semaphore(DEPTH)

        async def write(off: int) -> None:
            async with slots:
                await store.write(off, data)
        t0 = time.perf_counter()
        await asyncio.gather(*(write(off) for off in offsets))
        iops = WRITES / (time.perf_counter() - t0)
        if token is not None:
            await store.drop_instant(token)
        return iops, took
    finally:
        store.abandon()                                 # created here: removed


async def rounds(conf: str) -> dict[str, list[float]]:
    r: dict[str, list[float]] = {"plain_iops": [], "snap_iops": [], "create_s": []}
    for i in range(ROUNDS):
        iops, _ = await one_round(conf, 2 * i, False)
        r["plain_iops"].append(iops)
        iops, took = await one_round(conf, 2 * i + 1, True)
        r["snap_iops"].append(iops)
        r["create_s"].append(took or 0.0)
        log(f"round {i}: plain {r['plain_iops'][-1]:.0f} IOPS, after a snapshot {iops:.0f} "
            f"IOPS, snapshot {1000 * (took or 0):.1f} ms")
    return r


def main() -> int:
    load_start = os.getloadavg()[0]
    base = tempfile.mkdtemp(prefix="lr-rbdsnap-bench-")
    cdir = os.path.join(base, "ceph")
    try:
        conf = start_cluster(cdir)
        r = asyncio.run(rounds(conf))
    finally:
        subprocess.run([SCRIPT, "stop", cdir], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    for k, v in r.items():
        print(f"{k}: {[round(x, 4) for x in v]}")
    result = {
        "snapshot_create_ms": round(1000 * med(r["create_s"]), 1),
        "write_4k_after_snapshot_ratio": round(med(r["snap_iops"]) / med(r["plain_iops"]), 3),
        "load_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
