"""Per-command cost of the TCMU handler path, without a kernel.

    python -m tests.bench.tcmu_path [--secs 3] [--depth 16] [--profile FILE]

A fake target_core_user (tests/target/tcmu/fake_kernel.py: the ring laid out
as the kernel does) feeds 4 KiB random READ(10)/WRITE(10) at a fixed queue
depth to the production stack -- TcmuDevice -> ScsiDevice ->
VolumeIO -> FileBlockStore on a real file -- and, side by side in the same
run, to a bare loop that moves the same bytes between the ring and the file
with preadv/pwritev and completes the entries (the floor: what any Python
handler pays for the ring and the syscalls).

The same load also goes to the native ring loop (target/tcmu/native_device.py: a C
thread answers the READ/WRITEs the LU's route sends straight to the store).

Prints IOPS of all three and, last, one JSON object:
  path_vs_floor_read / _write   our IOPS / the floor's (higher is better)
  us_per_cmd_read / _write      our CPU microseconds per command
  native_vs_floor_read / _write the native loop's IOPS / the floor's
  native_us_per_cmd_read / _write
                                CPU microseconds per command of the native
                                loop's thread (the fake kernel's Python, in
                                the main thread, is left out)
  bytecodes_per_cmd_read / _write, py_calls_per_cmd_read / _write
                                Python bytecodes and calls per command of our
                                stack (loop included), counted, not timed:
                                the figure a loaded machine cannot blur

The real-kernel comparison with tcmu-runner is the vm tier's fio step; this
one is the fast loop for working on the handler's per-command overhead.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time

if __package__ in (None, ""):   # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from restore_core.stores.file import FileBlockStore  # noqa: E402
from restore_core.engine import Engine  # noqa: E402
from restore_core.metadata import MemoryMetadataStore  # noqa: E402
from target.scsi import ScsiDevice  # noqa: E402
from target.scsi.api import GOOD  # noqa: E402
from target.tcmu.device import TcmuDevice  # noqa: E402
from target.tcmu.handler import identity_for  # noqa: E402
from target.tcmu.native_device import NativeTcmuDevice  # noqa: E402
from target.tcmu.ring import Ring  # noqa: E402
from tests.target.tcmu.fake_kernel import FakeKernel  # noqa: E402

BS = 4096
SIZE = 256 << 20


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


class Load:
    """Keeps ``depth`` commands on the fake ring for ``secs`` seconds."""

    def __init__(self, k: FakeKernel, write: bool, depth: int, secs: float) -> None:
        self.k, self.write, self.depth, self.secs = k, write, depth, secs
        self.rng = random.Random(7)
        self.payload = os.urandom(BS)
        self.done = 0

    def submit(self, notify: bool) -> None:
        lba = self.rng.randrange(SIZE // BS) * (BS // 512)
        if self.write:
            self.k.submit(rw10(0x2A, lba, BS // 512), data_out=self.payload, notify=notify)
        else:
            self.k.submit(rw10(0x28, lba, BS // 512), data_in=BS, notify=notify)

    async def run(self) -> tuple[float, float]:
        for i in range(self.depth):
            self.submit(i == self.depth - 1)
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        end = t0 + self.secs
        while True:
            await self.k.wait_doorbell(10)
            got = self.k.reap()
            for c in got:
                if c.status != GOOD and not (c.sense[2] & 0x0F) == 6:   # the power-on UA

                    raise SystemExit(f"command failed: status {c.status:#x} sense {c.sense[:18].hex()}")
            self.done += len(got)
            if time.perf_counter() >= end:
                break
            for i in range(len(got)):
                self.submit(i == len(got) - 1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        others = cpu - (time.thread_time() - m0)     # threads but this one (the native loop's)
        # let what is still in flight finish before the device goes away
        left = self.depth - 0
        for _ in range(100):
            if not self.k.pending:
                break
            await self.k.wait_doorbell(10)
            self.k.reap()
        del left
        return self.done / wall, cpu / max(self.done, 1) * 1e6, others / max(self.done, 1) * 1e6


class FloorDevice:
    """The least a Python handler can do: fetch, preadv/pwritev between the
    ring's iovecs and the file, complete, notify once per wake-up."""

    def __init__(self, k: FakeKernel, fd: int) -> None:
        self.k, self.fd = k, fd
        self.ring = Ring(k.map)
        self.loop = asyncio.get_running_loop()
        self.ufd = k.user_sock.fileno()
        os.set_blocking(self.ufd, False)
        self.loop.add_reader(self.ufd, self.wake)

    def wake(self) -> None:
        try:
            os.read(self.ufd, 4096)
        except BlockingIOError:
            pass
        mv = self.ring.mv
        for req in self.ring.fetch():
            cdb = req.cdb
            lba = int.from_bytes(cdb[2:6], "big")
            bufs = [mv[b:b + n] for b, n in req.iovs]
            if cdb[0] == 0x28:
                os.preadv(self.fd, bufs, lba * 512)
            else:
                os.pwritev(self.fd, bufs, lba * 512)
            self.ring.complete(req, GOOD)
        os.write(self.ufd, b"\0\0\0\0")

    def close(self) -> None:
        self.loop.remove_reader(self.ufd)
        self.ring.mv.release()


async def one(kind: str, write: bool, path: str, depth: int, secs: float,
              prof: cProfile.Profile | None) -> tuple[float, float, float]:
    k = FakeKernel(cmdr_size=1 << 20, data_size=16 << 20)
    try:
        if kind == "floor":
            fd = os.open(path, os.O_RDWR)
            dev = FloorDevice(k, fd)
            try:
                return await Load(k, write, depth, secs).run()
            finally:
                dev.close()
                os.close(fd)
        eng = Engine(MemoryMetadataStore())
        store = FileBlockStore(path)
        vio = eng.add_volume("bench", store)
        await eng.start()
        sdev = ScsiDevice(vio, identity_for("bench"), block_size=512)
        cls = NativeTcmuDevice if kind == "native" else TcmuDevice
        tdev = cls("bench", sdev, fd=k.user_sock.fileno(), buf=k.map)
        tdev.open()
        try:
            if prof is not None:
                prof.enable()
            return await Load(k, write, depth, secs).run()
        finally:
            if prof is not None:
                prof.disable()
            await tdev.close(drain=5)
            await eng.close()
            store.close()        # its lock, or the next round cannot open the file
    finally:
        k.close()


class BytecodeCount:
    """Python bytecodes and calls executed outside tests/ while tracing: a
    count of the handler's work that the machine's load cannot blur (timings
    on a shared 2-core host swing by half), and what TCG multiplies."""

    def __init__(self) -> None:
        self.ops = self.calls = 0

    def _trace(self, frame, event, arg):
        if "/tests/" in frame.f_code.co_filename:
            return None
        frame.f_trace_opcodes = True
        if event == "call":
            self.calls += 1
        elif event == "opcode":
            self.ops += 1
        return self._trace

    def __enter__(self) -> "BytecodeCount":
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)


async def count_per_command(path: str, write: bool, batch: int) -> tuple[float, float]:
    """Bytecodes and Python calls per 4 KiB command of our stack, for
    batches of ``batch`` commands fetched per doorbell (the loop's share
    included)."""
    k = FakeKernel(cmdr_size=1 << 20, data_size=16 << 20)
    eng = Engine(MemoryMetadataStore())
    store = FileBlockStore(path)
    vio = eng.add_volume("bench", store)
    await eng.start()
    tdev = TcmuDevice("bench", ScsiDevice(vio, identity_for("bench"), block_size=512),
                      fd=k.user_sock.fileno(), buf=k.map)
    tdev.open()
    load = Load(k, write, batch, 0)
    try:
        counted = BytecodeCount()
        for rnd in range(4):                   # the first rounds warm up (and take the power-on UA)
            for i in range(batch):
                load.submit(i == batch - 1)
            got: list = []
            with counted if rnd == 3 else contextlib.nullcontext():
                while len(got) < batch:
                    await k.wait_doorbell(10)
                    got += k.reap()
        return counted.ops / batch, counted.calls / batch
    finally:
        await tdev.close(drain=5)
        await eng.close()
        store.close()
        k.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", help="write a cProfile of our side here")
    a = ap.parse_args()
    prof = cProfile.Profile() if a.profile else None
    with tempfile.TemporaryDirectory(prefix="lr-tcmu-bench.") as tmp:
        path = os.path.join(tmp, "vol.img")
        with open(path, "wb") as f:          # allocated, so reads hit data
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        res: dict[str, list[tuple[float, float, float]]] = {}
        for r in range(a.rounds):
            for write in (False, True):
                kinds = ("ours", "floor", "native")
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    key = f"{kind}_{'write' if write else 'read'}"
                    v = asyncio.run(one(kind, write, path, a.depth, a.secs, prof))
                    res.setdefault(key, []).append(v)
                    print(f"round {r} {key:12s} {v[0]:9.0f} IOPS {v[1]:7.1f} us CPU/cmd", flush=True)
        counts = {rw: asyncio.run(count_per_command(path, rw == "write", a.depth)) for rw in ("read", "write")}
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in res.items()}
    if prof is not None:
        prof.dump_stats(a.profile)
    out = {}
    for rw in ("read", "write"):
        out[f"path_vs_floor_{rw}"] = round(med[f"ours_{rw}"][0] / med[f"floor_{rw}"][0], 3)
        out[f"us_per_cmd_{rw}"] = round(med[f"ours_{rw}"][1], 1)
        out[f"floor_us_per_cmd_{rw}"] = round(med[f"floor_{rw}"][1], 1)
        out[f"native_vs_floor_{rw}"] = round(med[f"native_{rw}"][0] / med[f"floor_{rw}"][0], 3)
        out[f"native_us_per_cmd_{rw}"] = round(med[f"native_{rw}"][2], 2)
        out[f"bytecodes_per_cmd_{rw}"] = round(counts[rw][0])
        out[f"py_calls_per_cmd_{rw}"] = round(counts[rw][1], 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
