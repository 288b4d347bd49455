"""RBD benchmarks against a throw-away single-node Ceph cluster (memstore).

    python -m tests.bench.rbd        (ROUNDS, RESTORE_ROUNDS, SECS, SIZE_MB env knobs)

Prints raw numbers and, as its last line, one JSON object:

  restore_from_rbd_vs_copy  background restore throughput, source file <-
                            clone on RBD (the engine, default throttle: the
                            copy depth RBD asks for, RbdStore.copy_depth)
                            / a plain sequential copy of the same bytes
                            from the same image with python3-rbd, same
                            1 MiB I/O size, into a file + fdatasync
                            (goal >= 0.9)
  rbd_lu_4k_read_ratio      4 KiB random read IOPS, 32 in flight, through
                            iSCSI (iscsi-perf) on an RBD-backed LU / fio's
                            rbd engine straight against the image (goal >= 0.7)
  rbd_lu_1m_write_ratio     1 MiB sequential write MB/s, 32 in flight,
                            through iSCSI (qemu-img bench) / fio's rbd
                            engine, each SECS s or so, round the image
                            (goal >= 0.8)
  load_1min                 the 1-minute load average at start and end
  *_bound                   for reference, what the two ratios could be
                            if the daemon's iSCSI path and librbd's own
                            work (fio) simply added up on these cores:
                            1/(1/fio + 1/file_lu) / fio, with file_lu the
                            same tool against a file-backed LU of the same
                            daemon in the same round

Every side of a ratio is measured in the same run, alternating sides; the
median of the rounds is used. Reports, never asserts a goal; exits non-zero
only on a real error (wrong data). Needs root-free loopback only, the ceph
packages, fio, libiscsi-bin, qemu-utils (bash .ci/install --test).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):   # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import rbd  # noqa: E402

from persistence.db import Database  # noqa: E402
from persistence.sqlite_store import SqliteMetadataStore  # noqa: E402
from restore_core.engine import Engine  # noqa: E402
from restore_core.pair import PairState  # noqa: E402
from restore_core.stores import open_store  # noqa: E402
from restore_core.stores.file import FileBlockStore  # noqa: E402
from restore_core.stores.rbd import FEATURES  # noqa: E402
from restore_core.stores.spec import RbdSpec  # noqa: E402
from tests.bench.restore import CHUNK, ES, TAG_CLN, BenchError, check, pattern  # noqa: E402
from tests.ceph.util import other_client  # noqa: E402
from tests.support import IQN, Daemon, free_port  # noqa: E402

MiB = 1 << 20
ROUNDS = int(os.environ.get("ROUNDS", "3"))
#: A restore of SIZE takes about half a second: more rounds than the LU
#: measures (a few seconds each) for a median that other load moves less.
RESTORE_ROUNDS = int(os.environ.get("RESTORE_ROUNDS", "7"))
SECS = int(os.environ.get("SECS", "5"))
SIZE = int(os.environ.get("SIZE_MB", "256")) * MiB
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ceph", "ceph-single-node.sh")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the cluster ---------------------------------------------------------------------
def start_cluster(d: str) -> str:
    env = {**os.environ, "CEPH_SN_MON_PORT": str(free_port()), "CEPH_SN_MON_PORT2": str(free_port()),
           "CEPH_SN_PORT_MIN": "26800", "CEPH_SN_PORT_MAX": "26899"}
    out = subprocess.run([SCRIPT, "start", d], env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise BenchError(f"cluster start failed: {out.stderr[-1500:]}")
    return out.stdout.strip().splitlines()[-1]


def fill_image(spec: RbdSpec) -> None:
    """The clone's pattern in every block (reads must hit real objects)."""
    with other_client(spec) as io, rbd.Image(io, spec.image) as img:
        for off in range(0, SIZE, CHUNK):
            img.write(pattern(TAG_CLN, off, CHUNK), off)
        img.flush()


# -- 1. restore from a clone on RBD vs a plain copy -------------------------------------
def plain_copy(spec: RbdSpec, dst_path: str) -> float:
    dst = FileBlockStore(dst_path, SIZE, create=True)
    try:
        with other_client(spec) as io, rbd.Image(io, spec.image, read_only=True) as img:
            t0 = time.perf_counter()
            for off in range(0, SIZE, CHUNK):
                dst.write_sync(off, img.read(off, CHUNK))
            dst.flush_sync()
            return time.perf_counter() - t0
    finally:
        dst.close()
        os.unlink(dst_path)


async def engine_restore(spec: RbdSpec, d: str) -> float:
    os.makedirs(d)
    db = Database(os.path.join(d, "meta.db"), create=True)
    eng = Engine(SqliteMetadataStore(db))
    src = FileBlockStore(os.path.join(d, "src.img"), SIZE, create=True)
    cln = open_store(spec, SIZE)
    eng.add_volume("src", src)
    eng.add_volume("cln", cln)
    try:
        await eng.start()
        pair = await eng.create_pair("src", "cln", extent_size=ES, sync=False)  # all in delta
        t0 = time.perf_counter()
        await eng.restore(pair.id)
        await eng.wait_job(pair.id, 600)
        secs = time.perf_counter() - t0
        if pair.state is not PairState.FRACTURED or pair.bytes_copied != SIZE:
            raise BenchError(f"restore: {pair.state.value}, copied {pair.bytes_copied}")
        for off in range(0, SIZE, 37 * MiB + 4096):
            check(await src.read(off, 4096), off, TAG_CLN, "restored source")
        await eng.close()
        return secs
    finally:
        src.close()
        cln.close()
        db.close()
        shutil.rmtree(d, ignore_errors=True)


# -- 2./3. an RBD-backed LU vs fio's rbd engine ---------------------------------------------
def fio_rbd(conf: str, spec: RbdSpec, rw: str, bs: str) -> dict[str, float]:
    args = ["fio", "--name=rbd", "--ioengine=rbd", f"--clientname={spec.client_id}",
            f"--pool={spec.pool}", f"--rbdname={spec.image}", f"--rw={rw}", f"--bs={bs}",
            "--iodepth=32", "--output-format=json"]
    # both workloads run SECS seconds (writes go round the image): a single
    # pass of 256 1 MiB writes took ~0.25 s, so the lock take-over and the
    # ramp of each run, and the machine's noise, moved that ratio by 0.1-0.3
    args += [f"--runtime={SECS}", "--time_based", f"--size={SIZE}"]
    out = subprocess.run(args, env={**os.environ, "CEPH_CONF": conf}, capture_output=True,
                         text=True, timeout=SECS + 300)
    if out.returncode != 0:
        raise BenchError(f"fio {rw}: {out.stderr[-800:]}")
    job = json.loads(out.stdout)["jobs"][0]
    side = job["read" if rw == "randread" else "write"]
    return {"iops": side["iops"], "mbs": side["bw_bytes"] / MiB}


def iscsi_perf_randread(url: str) -> float:
    out = subprocess.run(["iscsi-perf", "-m", "32", "-b", "8", "-t", str(SECS), "-r", url],
                         capture_output=True, text=True, timeout=SECS + 60)
    text = (out.stdout + out.stderr).replace("\r", "\n")
    m = re.findall(r"iops average\s+(\d+)", text) or re.findall(r"average\s+(\d+)", text)
    if not m:
        raise BenchError(f"iscsi-perf: no result: {text[-500:]}")
    return float(m[-1])


def qemu_bench_write(url: str, mib: float) -> float:
    """1 MiB sequential writes, 32 in flight, ``mib`` of them (going round
    the image): as many as fio wrote in its SECS seconds, so both sides run
    about as long."""
    n = max(SIZE // MiB, round(mib))
    out = subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-c", str(n),
                          "-d", "32", "-s", "1M", "-S", "1M", "--pattern=0x5a", url],
                         capture_output=True, text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if out.returncode != 0 or not m:
        raise BenchError(f"qemu-img bench: {out.stdout[-300:]}{out.stderr[-300:]}")
    return n / float(m.group(1))          # MiB/s


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(num: list[float], den: list[float]) -> list[float]:
    """Lowest and highest ratio of one round's pair of runs."""
    ratios = [a / b for a, b in zip(num, den)]
    return [round(min(ratios), 3), round(max(ratios), 3)]


def bound(fio: float, file_lu: float) -> float:
    """The ratio an RBD LU would reach if its two costs merely added up."""
    return 1 / (1 / fio + 1 / file_lu) / fio


def main() -> int:
    for tool in ("fio", "iscsi-perf", "qemu-img"):
        if shutil.which(tool) is None:
            log(f"rbd bench: {tool} not found (bash .ci/install --test)")
            return 2
    load_start = os.getloadavg()[0]     # the ratios follow the shared machine's load
    base = tempfile.mkdtemp(prefix="lr-rbd-bench-")
    cdir = os.path.join(base, "ceph")
    d = None
    r: dict[str, list[float]] = {k: [] for k in (
        "restore_s", "copy_s", "lu_4k_iops", "fio_4k_iops", "lu_1m_mbs", "fio_1m_mbs",
        "file_4k_iops", "file_1m_mbs")}
    try:
        conf = start_cluster(cdir)
        clone = RbdSpec("rbd", "bench-clone", conf)
        lu = RbdSpec("rbd", "bench-lu", conf)
        with other_client(clone) as io:
            for spec in (clone, lu):
                rbd.RBD().create(io, spec.image, SIZE, old_format=False, features=FEATURES)
        fill_image(clone)
        fill_image(lu)
        log(f"cluster up, two {SIZE >> 20} MiB images filled")

        # 1: alternate the engine's restore and the plain copy
        for i in range(RESTORE_ROUNDS):
            r["restore_s"].append(asyncio.run(engine_restore(clone, os.path.join(base, f"e{i}"))))
            r["copy_s"].append(plain_copy(clone, os.path.join(base, f"copy{i}.img")))
            log(f"  round {i}: restore {r['restore_s'][-1]:.2f}s, copy {r['copy_s'][-1]:.2f}s")

        # 2, 3: the daemon serves `lu` over iSCSI; fio uses it while the daemon
        # does not hold it (the volume is deleted and re-adopted each round)
        d = Daemon(_Tmp(base)).start()
        url = f"{d.url}/0"
        d.cli("volume", "create", "flu", "--path", os.path.join(base, "flu.img"), "--size",
              str(SIZE))
        for i in range(ROUNDS):
            r["fio_4k_iops"].append(fio_rbd(conf, lu, "randread", "4k")["iops"])
            r["fio_1m_mbs"].append(fio_rbd(conf, lu, "write", "1M")["mbs"])
            d.cli("volume", "create", "lu", "--rbd", lu.image_name, "--ceph-conf", conf)
            d.cli("export", "create", IQN, "--lun", "0=lu", "--lun", "1=flu")
            fio_mib = r["fio_1m_mbs"][-1] * SECS            # what fio wrote in its round
            r["lu_4k_iops"].append(iscsi_perf_randread(url))
            r["lu_1m_mbs"].append(qemu_bench_write(url, fio_mib))
            r["file_4k_iops"].append(iscsi_perf_randread(f"{d.url}/1"))
            r["file_1m_mbs"].append(qemu_bench_write(f"{d.url}/1", fio_mib))
            d.cli("export", "delete", IQN)
            d.cli("volume", "delete", "lu")
            log(f"  round {i}: 4k read LU {r['lu_4k_iops'][-1]:.0f} / fio {r['fio_4k_iops'][-1]:.0f}"
                f" IOPS (file LU {r['file_4k_iops'][-1]:.0f}); 1M write LU "
                f"{r['lu_1m_mbs'][-1]:.0f} / fio {r['fio_1m_mbs'][-1]:.0f} MiB/s (file LU "
                f"{r['file_1m_mbs'][-1]:.0f})")
    finally:
        if d is not None and d.proc and d.proc.poll() is None:
            d.stop()
        subprocess.run([SCRIPT, "stop", cdir], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
    restore_mbs = SIZE / MiB / med(r["restore_s"])
    copy_mbs = SIZE / MiB / med(r["copy_s"])
    result: dict[str, Any] = {
        "restore_from_rbd_vs_copy": round(restore_mbs / copy_mbs, 3),
        "restore_from_rbd_vs_copy_spread": spread(r["copy_s"], r["restore_s"]),
        "rbd_lu_4k_read_ratio": round(med(r["lu_4k_iops"]) / med(r["fio_4k_iops"]), 3),
        "rbd_lu_1m_write_ratio": round(med(r["lu_1m_mbs"]) / med(r["fio_1m_mbs"]), 3),
        "restore_mib_s": round(restore_mbs, 1), "copy_mib_s": round(copy_mbs, 1),
        "lu_4k_read_iops": round(med(r["lu_4k_iops"])), "fio_4k_read_iops": round(med(r["fio_4k_iops"])),
        "lu_1m_write_mib_s": round(med(r["lu_1m_mbs"]), 1),
        "fio_1m_write_mib_s": round(med(r["fio_1m_mbs"]), 1),
        "file_lu_4k_read_iops": round(med(r["file_4k_iops"])),
        "file_lu_1m_write_mib_s": round(med(r["file_1m_mbs"]), 1),
        "rbd_lu_4k_read_bound": round(bound(med(r["fio_4k_iops"]), med(r["file_4k_iops"])), 3),
        "rbd_lu_1m_write_bound": round(bound(med(r["fio_1m_mbs"]), med(r["file_1m_mbs"])), 3),
        "size_mib": SIZE >> 20, "rounds": ROUNDS, "restore_rounds": RESTORE_ROUNDS,
        "load_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))
    return 0


class _Tmp(str):
    """What tests.support.Daemon takes as its tmp dir (a path with '/')."""

    def __truediv__(self, other: str) -> str:
        return os.path.join(self, other)


if __name__ == "__main__":
    sys.exit(main())
