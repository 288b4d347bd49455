"""Restore-path benchmarks on real SQLite and real sparse image files.

    python -m tests.bench.restore            (or: python tests/bench/restore.py)
    python -m tests.bench.restore --only first_io,tracked --profile /tmp/x.prof

Prints a table of raw numbers and, as its last line, one JSON object:

  first_io_ms                    restore() on a 1 TiB pair (10% scattered delta)
                                 -> first host READ of an unrestored extent
                                 returning the clone's bytes (goal < 50)
  delta_copy_ratio               Pair.bytes_copied / bytes of the delta extents,
                                 1 GiB LU, 10% scattered, host reads running
                                 (goal 1.00)
  restore_vs_copy                background restore throughput / a plain 1 MiB
                                 preadv+pwritev loop + fdatasync of the same
                                 bytes (goal >= 0.9)
  tracked_write_ratio            4 KiB random FUA write IOPS, QD32, on a
                                 fractured pair (delta tracking, durable acks)
                                 / a volume in no pair (goal >= 0.8)
  p99_read_during_restore_ratio  p99 of QD1 4 KiB random reads during a
                                 default-throttled restore / idle (goal <= 2.0)
  keep_undo_ratio                --keep-undo restore throughput / plain restore
                                 throughput, full 256 MiB restore of a written
                                 source (expected near 0.5: each extent is read
                                 and written twice; goal >= 0.45)

Every side of a ratio is measured in the same run, alternating sides, and the
median of the repetitions is used. The benchmark reports; it never asserts a
goal. It exits non-zero only on a real error (wrong data, lost delta bits).
Everything lives in a temporary directory under /tmp, removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):   # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bitarray.util import random_k  # noqa: E402

from persistence.db import Database  # noqa: E402
from persistence.sqlite_store import SqliteMetadataStore  # noqa: E402
from restore_core.stores.file import FileBlockStore  # noqa: E402
from restore_core.stores.undo_images import StoreUndoImages  # noqa: E402
from restore_core.committer import load_map  # noqa: E402
from restore_core.restoremaps import INTENT_EXTENTS  # noqa: E402
from restore_core.engine import Engine  # noqa: E402
from restore_core.extentmap import ExtentMap  # noqa: E402
from restore_core.pair import Pair, PairState  # noqa: E402
from restore_core.volume_io import VolumeIO  # noqa: E402

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BLK = 4 * KiB
ES = 64 * KiB
CHUNK = 1 * MiB          # = Throttle.batch_extents (16) * ES: the copier's I/O size

TAG_SRC, TAG_CLN, TAG_CLN_OTHER, TAG_HOST = 0x5352, 0xC10E, 0xC1FF, 0x4057
_HDR = struct.Struct("<QQ")


class BenchError(Exception):
    """A real failure (wrong data, lost tracking): the run exits non-zero."""


# -- data patterns ------------------------------------------------------------
def block(tag: int, idx: int) -> bytes:
    """The 4 KiB block number ``idx`` of a pattern: recognisable and unique."""
    return _HDR.pack(tag, idx) * (BLK // _HDR.size)


def pattern(tag: int, off: int, length: int) -> bytes:
    first = off // BLK
    return b"".join([block(tag, i) for i in range(first, first + length // BLK)])


def fill(store: FileBlockStore, off: int, length: int, tag: int) -> None:
    pos, end = off, off + length
    while pos < end:
        n = min(CHUNK, end - pos)
        store.write_sync(pos, pattern(tag, pos, n))
        pos += n


def drop_cache(store: FileBlockStore) -> None:
    store.flush_sync()
    os.posix_fadvise(store.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def check(data: bytes | bytearray, off: int, tag: int | None, what: str) -> None:
    want = bytes(len(data)) if tag is None else pattern(tag, off, len(data))
    if data != want:
        got = _HDR.unpack_from(data) if len(data) >= 16 else data
        raise BenchError(f"{what}: wrong data at offset {off}: got header {got}, "
                         f"want tag {tag if tag is None else hex(tag)}")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- an engine on SQLite and image files ----------------------------------------
class Rig:
    def __init__(self, root: str, name: str) -> None:
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.db = Database(os.path.join(self.dir, "meta.db"), create=True)
        self.meta = SqliteMetadataStore(self.db)
        self.engine = Engine(self.meta, StoreUndoImages(os.path.join(self.dir, "undo")))
        self.stores: dict[str, FileBlockStore] = {}
        self.ios: dict[str, VolumeIO] = {}

    def volume(self, name: str, size: int, path: str | None = None) -> VolumeIO:
        path = path or os.path.join(self.dir, name + ".img")
        store = FileBlockStore(path, size, create=True)
        self.stores[name] = store
        self.ios[name] = self.engine.add_volume(name, store)
        return self.ios[name]

    async def start(self) -> Engine:
        await self.engine.start()
        return self.engine

    async def pair_with_delta(self, src: str, cln: str, bits: Any | None) -> Pair:
        """A fractured pair whose delta is ``bits`` (None: every extent), made
        durable without copying anything (benchmark set-up only)."""
        eng = self.engine
        pair = await eng.create_pair(src, cln, extent_size=ES, sync=False)
        if bits is not None:
            pair.maps.delta.assign(ExtentMap(pair.nextents, bits))
            await eng.committer.commit()
        return pair

    async def close(self) -> None:
        await self.engine.close()
        for s in self.stores.values():
            s.close()
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- 1. first I/O after restore on a 1 TiB pair --------------------------------------
async def bench_first_io(root: str, rep: int) -> dict[str, float]:
    size = 1 * TiB
    rig = Rig(root, f"first_io{rep}")
    try:
        sio = rig.volume("src", size)
        rig.volume("cln", size)
        eng = await rig.start()
        n = size // ES
        random.seed(1000 + rep)
        bits = random_k(n, n // 10, endian="little")
        target = bits.find(1, n // 2 + rep * 7919)       # far from the copier's start
        off = target * ES
        fill(rig.stores["cln"], off, ES, TAG_CLN)
        fill(rig.stores["src"], off, ES, TAG_SRC)
        pair = await rig.pair_with_delta("src", "cln", bits)
        for s in rig.stores.values():                      # the clone extent is on disk,
            drop_cache(s)                                  # not in the page cache
        read_off = off + 5 * BLK
        t0 = time.perf_counter()
        await eng.restore(pair.id)
        t1 = time.perf_counter()
        data = await sio.read(read_off, BLK)
        t2 = time.perf_counter()
        check(data, read_off, TAG_CLN, "first read after restore")
        return {"total_ms": (t2 - t0) * 1e3, "restore_call_ms": (t1 - t0) * 1e3,
                "read_ms": (t2 - t1) * 1e3, "delta_extents": bits.count()}
    finally:
        await rig.close()


# -- 2. bytes copied vs delta ------------------------------------------------------------
async def bench_delta_copy(root: str) -> dict[str, float]:
    size = 1 * GiB
    rig = Rig(root, "delta")
    try:
        sio = rig.volume("src", size)
        rig.volume("cln", size)
        eng = await rig.start()
        n = size // ES
        random.seed(7)
        bits = random_k(n, n // 10, endian="little")
        cln = rig.stores["cln"]
        for a, b in ExtentMap(n, bits).runs():
            fill(cln, a * ES, (b - a) * ES, TAG_CLN)
        # Clone data outside the delta must NOT reach the source.
        others = random.sample([e for e in range(n) if not bits[e]], 256)
        for e in others:
            fill(cln, e * ES, ES, TAG_CLN_OTHER)
        pair = await rig.pair_with_delta("src", "cln", bits)
        delta_bytes = pair.maps.delta.count() * ES
        reads = 0
        stop = False

        async def reader() -> None:
            nonlocal reads
            rnd = random.Random(8)
            while not stop:
                o = rnd.randrange(size // BLK) * BLK
                d = await sio.read(o, BLK)
                check(d, o, TAG_CLN if bits[o // ES] else None, "host read during delta restore")
                reads += 1
                await asyncio.sleep(0)   # a host's next command arrives through the loop

        t0 = time.perf_counter()
        await eng.restore(pair.id)
        rt = asyncio.get_running_loop().create_task(reader())
        await eng.wait_job(pair.id, 120)
        secs = time.perf_counter() - t0
        stop = True
        await rt
        if pair.state is not PairState.FRACTURED or (pair.job and pair.job.error):
            raise BenchError(f"delta restore ended {pair.state.value}: {pair.job and pair.job.error}")
        src = rig.stores["src"]
        buf = memoryview(bytearray(ES))
        for e in bits.search(1):
            src.readinto_sync(e * ES, buf)
            check(buf, e * ES, TAG_CLN, "restored delta extent")
        for e in others:
            src.readinto_sync(e * ES, buf)
            check(buf, e * ES, None, "extent outside the delta")
        return {"ratio": pair.bytes_copied / delta_bytes, "bytes_copied": pair.bytes_copied,
                "delta_bytes": delta_bytes, "secs": secs, "host_reads": reads}
    finally:
        await rig.close()


# -- 3. restore throughput vs a plain copy --------------------------------------------------
def plain_copy(src_path: str, dst_path: str, size: int, chunk: int = CHUNK) -> float:
    """Seconds for the yardstick of restore_vs_copy: a plain ``chunk``-sized
    preadv+pwritev loop over ``size`` bytes, then fdatasync. The source is
    read through a bare descriptor, not a FileBlockStore, because
    tests/bench/restore_latency.py copies a clone image that its running
    daemon holds locked."""
    fd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    dst = FileBlockStore(dst_path, size, create=True)
    try:
        buf = memoryview(bytearray(chunk))
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if os.preadv(fd, [buf[:n]], off) != n:
                raise BenchError(f"{src_path}: short read at {off}")
            dst.write_sync(off, buf[:n])
        dst.flush_sync()
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        dst.close()


async def restore_full(root: str, clone_path: str, size: int, rep: int,
                       keep_undo: bool = False, written: bool = False) -> tuple[float, int]:
    """Seconds of a full restore onto a new source (``written``: one holding
    TAG_SRC data, which with ``keep_undo`` the undo image must end up with)."""
    rig = Rig(root, f"rvc{rep}")
    try:
        rig.volume("src", size)
        if written or keep_undo:
            fill(rig.stores["src"], 0, size, TAG_SRC)
            rig.stores["src"].flush_sync()
        rig.volume("cln", size, clone_path)
        eng = await rig.start()
        pair = await rig.pair_with_delta("src", "cln", None)
        t0 = time.perf_counter()
        await eng.restore(pair.id, keep_undo=keep_undo)
        await eng.wait_job(pair.id, 300)
        secs = time.perf_counter() - t0
        if keep_undo:
            undo = pair.undo_store
            assert undo is not None
            buf = memoryview(bytearray(BLK))
            for o in random.Random(rep).sample(range(size // BLK), 64):
                await undo.readinto(o * BLK, buf)
                check(buf, o * BLK, TAG_SRC, "undo image")
            await eng.commit_undo(pair.id)
        if pair.state is not PairState.FRACTURED or pair.bytes_copied != size:
            raise BenchError(f"full restore: {pair.state.value}, copied {pair.bytes_copied}")
        rnd = random.Random(rep)
        buf = memoryview(bytearray(BLK))
        for _ in range(256):
            o = rnd.randrange(size // BLK) * BLK
            rig.stores["src"].readinto_sync(o, buf)
            check(buf, o, TAG_CLN, "fully restored source")
        return secs, pair.bytes_copied
    finally:
        await rig.close()


def clone_image(root: str, name: str, size: int) -> tuple[str, str]:
    """A directory ``name`` holding clone.img of ``size`` bytes of TAG_CLN,
    durable: the clone full restores copy from."""
    d = os.path.join(root, name)
    os.makedirs(d)
    clone_path = os.path.join(d, "clone.img")
    c = FileBlockStore(clone_path, size, create=True)
    fill(c, 0, size, TAG_CLN)
    c.flush_sync()
    c.close()
    return d, clone_path


async def bench_restore_vs_copy(root: str, reps: int = 5) -> dict[str, float]:
    size = 512 * MiB
    d, clone_path = clone_image(root, "rvc", size)
    # Warm-up of both sides, untimed: the clone is in the page cache for all
    # runs, and neither side pays first-run costs the other does not.
    plain_copy(clone_path, os.path.join(d, "warm.img"), size)
    os.unlink(os.path.join(d, "warm.img"))
    await restore_full(root, clone_path, size, 99)
    copy_s: list[float] = []
    rest_s: list[float] = []
    order = "CRRC" * reps
    for i, side in enumerate(order[: 2 * reps]):
        if side == "C":
            dst = os.path.join(d, f"copy{i}.img")
            copy_s.append(plain_copy(clone_path, dst, size))
            os.unlink(dst)
        else:
            secs, _ = await restore_full(root, clone_path, size, i)
            rest_s.append(secs)
    shutil.rmtree(d, ignore_errors=True)
    copy_bps = size / med(copy_s)
    rest_bps = size / med(rest_s)
    return {"ratio": rest_bps / copy_bps, "restore_MBps": rest_bps / 1e6, "copy_MBps": copy_bps / 1e6,
            "restore_s": rest_s, "copy_s": copy_s}


async def bench_keep_undo(root: str, reps: int = 5) -> dict[str, Any]:
    """Full restores with and without --keep-undo, alternating (P U U P)."""
    size = 256 * MiB
    d, clone_path = clone_image(root, "undo", size)
    await restore_full(root, clone_path, size, 98, keep_undo=True)      # warm-up, untimed
    plain_s: list[float] = []
    undo_s: list[float] = []
    for i, side in enumerate(("PUUP" * reps)[: 2 * reps]):
        secs, _ = await restore_full(root, clone_path, size, 200 + i, keep_undo=side == "U",
                                     written=True)
        (undo_s if side == "U" else plain_s).append(secs)
    shutil.rmtree(d, ignore_errors=True)
    plain_bps, undo_bps = size / med(plain_s), size / med(undo_s)
    return {"ratio": undo_bps / plain_bps, "keep_undo_MBps": undo_bps / 1e6,
            "plain_MBps": plain_bps / 1e6, "keep_undo_s": undo_s, "plain_s": plain_s}


# -- 4. tracked vs untracked FUA writes -------------------------------------------------------
async def write_load(io: VolumeIO, size: int, secs: float, qd: int, seed: int,
                     written: set[int]) -> tuple[int, list[float], float]:
    nblk = size // BLK
    deadline = time.perf_counter() + secs
    lat: list[float] = []
    count = 0

    async def worker(t: int) -> None:
        nonlocal count
        rnd = random.Random(seed * 1000 + t)
        while time.perf_counter() < deadline:
            idx = rnd.randrange(nblk // qd) * qd + t       # workers own disjoint blocks
            s = time.perf_counter()
            await io.write(idx * BLK, block(TAG_HOST, idx), fua=True)
            lat.append(time.perf_counter() - s)
            written.add(idx)
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(qd)))
    return count, lat, time.perf_counter() - t0


async def bench_tracked(root: str, reps: int = 3, secs: float = 2.5, qd: int = 32) -> dict[str, Any]:
    size = 16 * GiB
    rig = Rig(root, "tracked")
    try:
        sio = rig.volume("src", size)
        rig.volume("cln", size)
        pio = rig.volume("plain", size)
        eng = await rig.start()
        pair = await rig.pair_with_delta("src", "cln", ExtentMap(size // ES).bits)
        iops = {"T": [], "U": []}
        lats = {"T": [], "U": []}
        written = {"T": set(), "U": set()}
        batches0 = eng.committer.batches
        for i, side in enumerate(("TUUT" * reps)[: 2 * reps]):
            io = sio if side == "T" else pio
            n, lat, el = await write_load(io, size, secs, qd, i, written[side])
            iops[side].append(n / el)
            lats[side].extend(lat)
        batches = eng.committer.batches - batches0
        # Every tracked write's extent is in the delta map in memory, and on
        # disk either in the delta map or in a durable write-intent region
        # (what recovery widens the delta by after a crash).
        snap = await asyncio.get_running_loop().run_in_executor(None, rig.meta.load)
        durable = load_map(pair.nextents, snap.maps.get(pair.map_key("delta"), {}))
        intent = load_map(pair.maps.intent.nbits, snap.maps.get(pair.map_key("intent"), {}))
        for idx in written["T"]:
            e = idx * BLK // ES
            on_disk = durable.test(e) or intent.test(e // INTENT_EXTENTS)
            if not (pair.maps.delta.test(e) and on_disk):
                raise BenchError(
                    f"tracked write to extent {e} is not in the delta map (in memory: "
                    f"{pair.maps.delta.test(e)}, durable: {on_disk}; {pair.maps.delta.count()} "
                    f"bits in memory, {durable.count()} durable, "
                    f"{len({i * BLK // ES for i in written['T']})} extents written)")
        for side, io in (("T", sio), ("U", pio)):
            for idx in random.Random(3).sample(sorted(written[side]), min(200, len(written[side]))):
                check(await io.read(idx * BLK, BLK), idx * BLK, TAG_HOST, f"written block ({side})")
        return {"ratio": med(iops["T"]) / med(iops["U"]),
                "tracked_iops": med(iops["T"]), "plain_iops": med(iops["U"]),
                "tracked_runs": iops["T"], "plain_runs": iops["U"],
                "tracked_p50_ms": pct(lats["T"], 50) * 1e3, "tracked_p99_ms": pct(lats["T"], 99) * 1e3,
                "plain_p50_ms": pct(lats["U"], 50) * 1e3, "plain_p99_ms": pct(lats["U"], 99) * 1e3,
                "delta_bits": pair.maps.delta.count(), "meta_batches": batches,
                "tracked_writes": sum(1 for _ in written["T"])}
    finally:
        await rig.close()


# -- 5. host read latency during a restore ------------------------------------------------------
async def read_load(io: VolumeIO, size: int, until: Callable[[], bool], tag: int, seed: int,
                    max_secs: float, pair: Pair | None = None,
                    kinds: dict[str, list[float]] | None = None) -> list[float]:
    """QD1 random reads; with ``pair``/``kinds`` also sorts each latency by
    what the extent was when the read was issued: unrestored (read from
    the clone), claimed (being copied by someone else) or restored."""
    rnd = random.Random(seed)
    nblk = size // BLK
    lat: list[float] = []
    t_end = time.perf_counter() + max_secs
    while not until() and time.perf_counter() < t_end:
        o = rnd.randrange(nblk) * BLK
        kind = ""
        if pair is not None and kinds is not None:
            e = o // pair.extent_size
            kind = "claimed" if e in pair.inflight else \
                "unrestored" if pair.maps.todo.test(e) else "restored"
        s = time.perf_counter()
        d = await io.read(o, BLK)
        lat.append(time.perf_counter() - s)
        if kind:
            kinds.setdefault(kind, []).append(lat[-1])
        check(d, o, tag, "host read (latency run)")
        await asyncio.sleep(0)   # a host's next command arrives through the loop
    return lat


async def bench_read_latency(root: str, cold: bool, reps: int = 2,
                             idle_secs: float = 1.5) -> dict[str, Any]:
    """QD1 4 KiB random reads over the whole LU, idle vs during a full restore.

    warm: both images sit in the page cache (an idle read is a ~5 us
    preadv); cold: the page cache of both images is dropped before every
    phase, so reads reach the device as they do on a LU larger than RAM.
    """
    size = 1 * GiB
    rig = Rig(root, "latency_cold" if cold else "latency_warm")

    def chill() -> None:
        if cold:
            for s in rig.stores.values():
                drop_cache(s)

    try:
        sio = rig.volume("src", size)
        rig.volume("cln", size)
        fill(rig.stores["src"], 0, size, TAG_SRC)
        fill(rig.stores["cln"], 0, size, TAG_CLN)
        for s in rig.stores.values():
            s.flush_sync()
        eng = await rig.start()
        pair = await rig.pair_with_delta("src", "cln", None)
        src_tag = TAG_SRC
        kinds: dict[str, list[float]] = {}
        idle: list[list[float]] = []
        busy: list[list[float]] = []
        restore_s: list[float] = []
        for r in range(reps):
            chill()
            idle.append(await read_load(sio, size, lambda: False, src_tag, 10 + r, idle_secs))
            if r:
                pair.maps.delta.set_all()
                await eng.committer.commit()
            chill()
            t0 = time.perf_counter()
            await eng.restore(pair.id)
            src_tag = TAG_CLN          # every extent is in the delta
            busy.append(await read_load(sio, size, lambda: pair.job is None, src_tag, 20 + r, 30,
                                        pair, kinds))
            await eng.wait_job(pair.id, 300)
            restore_s.append(time.perf_counter() - t0)
            if pair.state is not PairState.FRACTURED or (pair.job and pair.job.error):
                raise BenchError(f"restore under reads ended {pair.state.value}")
        chill()
        idle.append(await read_load(sio, size, lambda: False, src_tag, 99, idle_secs))
        p99_idle = med([pct(x, 99) for x in idle])
        p99_busy = med([pct(x, 99) for x in busy])
        return {"ratio": p99_busy / p99_idle,
                "idle_p50_ms": med([pct(x, 50) for x in idle]) * 1e3, "idle_p99_ms": p99_idle * 1e3,
                "busy_p50_ms": med([pct(x, 50) for x in busy]) * 1e3, "busy_p99_ms": p99_busy * 1e3,
                "busy_max_ms": max(max(x) for x in busy) * 1e3,
                "idle_reads": sum(map(len, idle)), "busy_reads": sum(map(len, busy)),
                **{f"busy_{k}_reads": len(v) for k, v in sorted(kinds.items())},
                **{f"busy_{k}_p99_ms": pct(v, 99) * 1e3 for k, v in sorted(kinds.items())},
                "restore_s": restore_s, "restore_MBps": size / med(restore_s) / 1e6}
    finally:
        await rig.close()


# -- driver ---------------------------------------------------------------------------------------
BENCHES = ("first_io", "delta", "restore_vs_copy", "tracked", "latency", "keep_undo")


async def run_all(root: str, only: set[str]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if "first_io" in only:
        runs = [await bench_first_io(root, r) for r in range(3)]
        res["first_io"] = {"runs_ms": [x["total_ms"] for x in runs],
                           "total_ms": med([x["total_ms"] for x in runs]),
                           "restore_call_ms": med([x["restore_call_ms"] for x in runs]),
                           "read_ms": med([x["read_ms"] for x in runs]),
                           "delta_extents": runs[0]["delta_extents"]}
    if "delta" in only:
        res["delta"] = await bench_delta_copy(root)
    if "restore_vs_copy" in only:
        res["restore_vs_copy"] = await bench_restore_vs_copy(root)
    if "tracked" in only:
        res["tracked"] = await bench_tracked(root)
    if "latency" in only:
        res["latency_warm"] = await bench_read_latency(root, cold=False)
        res["latency_cold"] = await bench_read_latency(root, cold=True)
    if "keep_undo" in only:
        res["keep_undo"] = await bench_keep_undo(root)
    return res


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--profile", metavar="FILE", help="write a cProfile of the run to FILE")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(BENCHES):
        ap.error(f"unknown benchmark(s): {', '.join(sorted(only - set(BENCHES)))}")
    root = tempfile.mkdtemp(prefix="lr-bench-", dir="/tmp")
    t0 = time.perf_counter()
    prof = cProfile.Profile() if args.profile else None
    try:
        if prof:
            prof.enable()
        res = asyncio.run(run_all(root, only))
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
    except BenchError as e:
        print(f"BENCHMARK ERROR: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    print(f"{'benchmark':<18} {'measure':<22} value")
    print("-" * 72)
    for name, d in res.items():
        for k, v in d.items():
            print(f"{name:<18} {k:<22} {fmt(v)}")
    print("-" * 72)
    print(f"total run time {elapsed:.1f} s")

    def get(b: str, k: str) -> float | None:
        v = res.get(b, {}).get(k)
        return None if v is None else round(float(v), 3)

    out = {
        "first_io_ms": get("first_io", "total_ms"),
        "delta_copy_ratio": get("delta", "ratio"),
        "restore_vs_copy": get("restore_vs_copy", "ratio"),
        "tracked_write_ratio": get("tracked", "ratio"),
        # the page-cache-cold run (reads reach the device, as on a LU larger
        # than RAM); the warm run's ratio is in the table above
        "p99_read_during_restore_ratio": get("latency_cold", "ratio"),
        "keep_undo_ratio": get("keep_undo", "ratio"),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
