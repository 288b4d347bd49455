"""Host latency and IOPS during a restore, end to end through the embedded
iSCSI target, with real initiators.

    .venv/bin/python -m tests.bench.restore_latency              (2 GiB LU, < 5 min)
    .venv/bin/python -m tests.bench.restore_latency --size 256   (MiB: a quick run)

A real `liverestore serve` (tests.support.Daemon) exports a source LU of
random data (non-sparse), paired with two clones c1 and c2 of other random
data: every 4 KiB block of each of the three images differs from the same
block of the others, so every extent is in each delta and a read of an
unrestored extent is served from the clone. The pairs are made with ``--no-sync``
(fractured, every extent marked different) from images written here.
Restores alternate c1, c2, c1, ...: each one changes every block of the
source again, and a restore from one clone marks the other's delta for all
it changes (checked before each restore). After each busy restore the
source must equal its clone byte for byte.

Host load, through QEMU's libiscsi initiator on 127.0.0.1, one session
per window:
  QD1   qemu-io, N ``read OFF 4k`` commands at random 4 KiB-aligned offsets;
        each command's time is qemu-io's own (1 / its ops/sec)
  QD32  qemu-img bench -d 32, 4 KiB reads a prime number of blocks apart
        from a random start, for about S seconds -> IOPS

Phases (one daemon, one run):
  idle       QD1 and QD32 windows, alternating, with no restore
  busy       an unthrottled protected restore (the pair's default throttle,
             rate 0) is started and the same windows alternate while it
             runs; a window counts only if the restore was still running
             when it ended (progress read before and after each window)
  ...        idle, busy, idle, ... (--cycles busy phases), so both sides
             see the same spells of other processes' load
  copy/idle restore
             C R R C: plain copies of a clone image (the engine bench's
             plain_copy, at the copier's I/O size) around restores with no
             host load

CPU is accounted per window by consumer (tests/bench/cpuacct.py): the
daemon's threads, the initiator, the kernel's worker threads and interrupt
time; printed per host command (idle/busy) and, for the busy QD32 windows,
per MB restored beyond what the same commands cost idle.

Prints raw numbers and, as its last line, one JSON object:
  p50_ratio                  QD1 p50 busy / idle (goal <= 1.2)
  p99_ratio                  QD1 p99 busy / idle (goal <= 1.5)
  qd32_iops_ratio            QD32 IOPS busy / idle (goal >= 0.8)
  restore_rate_busy_vs_idle  restore throughput during the QD32 windows /
                             throughput of a restore with no host load
                             (goal: >= the configured minimum progress rate)
  restore_vs_copy            throughput of a restore with no host load / the
                             plain copy (goal >= 0.9; tests/bench/restore.py)
and the raw numbers behind them. A percentile is the median over windows of
each window's percentile (so one window hit by another process's burst on
this shared machine moves it little; the pooled p99 is printed too), IOPS the
median over windows. Ratios whose busy side has no valid window are null
(the restore ended too early: use a bigger --size). A table of every window
comes first.

The benchmark reports; it never asserts a goal. It exits non-zero only on a
real error (wrong data after the restore, an initiator failing, a restore
ending in error). The daemon is stopped and the scratch directory (under
/tmp, or --tmp) removed at the end, also on errors and Ctrl-C.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):   # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from target.control import Client  # noqa: E402
from tests.bench.cpuacct import CpuSample  # noqa: E402
from tests.bench.restore import CHUNK, BenchError, fmt, med, pct, plain_copy  # noqa: E402
from tests.support import IQN, Daemon  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
BLK = 4 * KiB                  # the host I/O size, and the grain "every extent differs" is proved at
GEN_CHUNK = 1 * MiB
POOL = 16 * MiB                # random bytes the images' blocks are cut from
HDR = struct.Struct("<QQ")     # (image number, block number) heading every image block
SRC, CLONES = "src", ("c1", "c2")   # volume names; a pair's id is its clone's name
TOOLS = ("qemu-io", "qemu-img")
OPS_RE = re.compile(rb"and ([0-9.]+) ops/sec")
RUN_RE = re.compile(rb"Run completed in ([0-9.]+) seconds")
ESTIMATE_RE = re.compile(rb"copier's idle rate estimate ([0-9.]+) MB/s")
STRIDE = 104729 * BLK          # QD32 reads this far apart: a prime number of blocks


# -- images -------------------------------------------------------------------------------
def image_chunk(tag: int, off: int, n: int, pool: bytes) -> bytes:
    """``n`` bytes at ``off`` of image ``tag``: each 4 KiB block is a header
    (tag, block number) and 4080 bytes of the random pool from a place that
    moves with the block number: every block is unique and no two images
    share a block at the same offset. Cutting from a pool runs at memory
    speed; os.urandom for every byte (~150 MB/s here) was half the run."""
    room = len(pool) - (BLK - HDR.size)
    parts = []
    for i in range(off // BLK, (off + n) // BLK):
        at = (i * 7919 * 16 + tag * 4093) % room
        parts += (HDR.pack(tag, i), pool[at:at + BLK - HDR.size])
    return b"".join(parts)


def make_images(paths: list[str], size: int) -> None:
    """Images of random data, durable before any timing (no writeback of
    them during a measurement), every 4 KiB block of each different from
    the same block of every other (checked, not assumed)."""
    pool = os.urandom(POOL)
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600) for p in paths]
    try:
        for off in range(0, size, GEN_CHUNK):
            n = min(GEN_CHUNK, size - off)
            data = [memoryview(image_chunk(tag, off, n, pool)) for tag in range(1, len(paths) + 1)]
            for i in range(0, n, BLK):
                for a, b in itertools.combinations(data, 2):
                    if a[i:i + BLK] == b[i:i + BLK]:
                        raise BenchError(f"two images share the block at offset {off + i}")
            for fd, d in zip(fds, data):
                os.pwrite(fd, d, off)
        for fd in fds:
            os.fdatasync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def first_difference(a_path: str, b_path: str, size: int) -> int | None:
    """The first offset where the two images differ, or None."""
    with open(a_path, "rb", buffering=0) as a, open(b_path, "rb", buffering=0) as b:
        for off in range(0, size, GEN_CHUNK):
            x, y = a.read(GEN_CHUNK), b.read(GEN_CHUNK)
            if x != y:
                return off
    return None


# -- initiators ---------------------------------------------------------------------------
def tool(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(args, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{args[0]} did not finish within {timeout:.0f} s") from None


def qd1_reads(url: str, offsets: list[int]) -> list[float]:
    """Seconds of each 4 KiB read, QD1, in one qemu-io session (login not timed)."""
    args = ["qemu-io", "-r", "-f", "raw"]
    for off in offsets:
        args += ["-c", f"read {off} {BLK}"]
    r = tool([*args, url])
    rates = [float(x) for x in OPS_RE.findall(r.stdout)]
    if r.returncode or len(rates) != len(offsets) or b"failed" in r.stdout + r.stderr:
        raise BenchError(f"qemu-io: exit {r.returncode}, {len(rates)}/{len(offsets)} reads: "
                         f"{(r.stdout + r.stderr)[-300:]!r}")
    return [1.0 / x for x in rates]


def qd32_reads(url: str, count: int, offset: int, step: int) -> float:
    """IOPS of ``count`` 4 KiB reads, 32 in flight, by qemu-img bench: from
    ``offset`` on, ``step`` bytes apart (modulo the LU), so successive reads
    land far apart, as random ones would. Not iscsi-perf -r: libiscsi 1.19's
    iscsi-perf retries a READ that got a UNIT ATTENTION with broken
    in-flight bookkeeping, and here it never finished once one arrived
    mid-run (a restore starting or ending raises one); QEMU retries right."""
    r = tool(["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", "32", "-s", str(BLK),
              "-c", str(count), "-o", str(offset), "-S", str(step), url])
    found = RUN_RE.findall(r.stdout)
    if r.returncode or not found or b"failed" in r.stdout + r.stderr:
        raise BenchError(f"qemu-img bench: exit {r.returncode}: {(r.stdout + r.stderr)[-300:]!r}")
    return count / max(float(found[-1]), 1e-3)


# -- the daemon and its pair ----------------------------------------------------------------
class Rig:
    """A `liverestore serve` exporting SRC as LUN 0, SRC paired with each of
    CLONES. Restores alternate between the clones, so each one changes every
    block of the source: the source starts as image 1, c1 is image 2, c2
    image 3, and a restore from one clone marks the other's delta for all it
    changes."""

    def __init__(self, root: str, size: int) -> None:
        self.root = root
        self.size = size
        self.path = {v: os.path.join(root, f"{v}.img") for v in (SRC, *CLONES)}
        self.daemon: Daemon | None = None
        self.ctl: Client | None = None
        self.url = ""
        self.restores = 0

    def start(self) -> None:
        self.daemon = Daemon(Path(self.root)).start()
        self.ctl = Client(self.daemon.sock)
        for vol, path in self.path.items():
            self.ctl.call("volume.create", name=vol, path=path)
        for clone in CLONES:      # fractured, every extent marked different
            show = self.ctl.call("pair.create", source=SRC, clone=clone, sync=False)
            if show["throttle"].get("rate"):     # unthrottled, whatever the default
                self.ctl.call("pair.throttle", pair=clone, rate=0)
        self.ctl.call("export.create", iqn=IQN, luns={"0": SRC})
        self.url = self.daemon.url + "/0"

    @property
    def clone(self) -> str:
        """The clone the current (or next) restore copies from."""
        return CLONES[self.restores % len(CLONES)]

    def show(self) -> dict[str, Any]:
        assert self.ctl
        return self.ctl.call("pair.show", pair=self.clone)

    def progress(self) -> dict[str, Any]:
        return self.show()["progress"]

    def restore(self) -> None:
        assert self.ctl
        pr = self.progress()
        if pr["delta_extents"] * self.show()["extent_size"] < self.size:
            raise BenchError(f"pair {self.clone}: only {pr['delta_extents']} extents differ")
        self.ctl.call("pair.restore", pair=self.clone)

    def wait(self, timeout: float) -> None:
        """Wait for the restore to end; the next restore uses the other clone."""
        assert self.ctl
        show = self.ctl.call("pair.wait", pair=self.clone, timeout=timeout)
        pr = show["progress"]
        if pr["job"] is not None or pr["error"] or show["state"] != "fractured":
            raise BenchError(f"restore did not end fractured: state {show['state']}, "
                             f"job {pr['job']}, error {pr['error']}")
        self.restores += 1

    def check_restored(self) -> None:
        """The source now holds the last restore's clone, byte for byte."""
        clone = CLONES[(self.restores - 1) % len(CLONES)]
        bad = first_difference(self.path[SRC], self.path[clone], self.size)
        if bad is not None:
            raise BenchError(f"after the restore from {clone} the source differs at offset {bad}")

    def close(self) -> None:
        if self.ctl:
            self.ctl.close()
        d = self.daemon
        if d and d.proc and d.proc.poll() is None:
            try:
                d.stop(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                d.stop(signal.SIGKILL)

    def idle_estimates(self) -> list[float]:
        """The copier's idle-rate estimate (MB/s) at the end of each restore,
        from the daemon's log: the floor is a share of it, and the bench's
        idle restores say what it should have been."""
        try:
            with open(os.path.join(self.root, "daemon.log"), "rb") as f:
                return [float(x) for x in ESTIMATE_RE.findall(f.read())]
        except OSError:
            return []

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "daemon.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""


# -- measurement windows --------------------------------------------------------------------
@dataclass
class Window:
    kind: str                    # "qd1" or "qd32"
    phase: str = "idle"          # "idle" or "busy"
    secs: float = 0.0            # wall time, progress read to progress read
    lat: list[float] = field(default_factory=list)   # qd1: seconds per read
    iops: float = 0.0            # qd32
    restored: int = 0            # bytes the restore finished during the window
    valid: bool = True           # busy: the restore still ran when the window ended
    ops: int = 0                 # host commands
    cpu: dict[str, float] = field(default_factory=dict)   # CPU seconds by consumer (cpuacct)


class Load:
    """The host: QD1 windows of a fixed number of reads, QD32 windows of
    about ``qd32_secs`` (the count follows the last window's IOPS)."""

    def __init__(self, url: str, size: int, qd1_reads: int, qd32_secs: float, seed: int,
                 daemon_pid: int) -> None:
        self.url = url
        self.daemon_pid = daemon_pid
        self.nblk = size // BLK
        self.qd1_count = qd1_reads
        self.qd32_secs = qd32_secs
        self.rnd = random.Random(seed)
        self.qd32_rate = 10000.0      # IOPS guess until the first window

    def run(self, kind: str) -> Window:
        w = Window(kind)
        cpu0 = CpuSample.take(self.daemon_pid)
        if kind == "qd1":
            w.ops = self.qd1_count
            w.lat = qd1_reads(self.url, [self.rnd.randrange(self.nblk) * BLK
                                         for _ in range(self.qd1_count)])
        else:
            w.ops = max(1000, int(self.qd32_rate * self.qd32_secs))
            w.iops = self.qd32_rate = qd32_reads(self.url, w.ops,
                                                 self.rnd.randrange(self.nblk) * BLK, STRIDE)
        w.cpu = CpuSample.take(self.daemon_pid).since(cpu0)
        return w


def running(pr: dict[str, Any]) -> bool:
    return pr["job"] == "restore"


def idle_windows(load: Load, n: int) -> list[Window]:
    out = []
    for _ in range(n):
        for kind in ("qd1", "qd32"):
            t0 = time.perf_counter()
            w = load.run(kind)
            w.secs = time.perf_counter() - t0
            out.append(w)
    return out


def busy_windows(rig: Rig, load: Load, max_secs: float) -> tuple[list[Window], float]:
    """Start the restore and alternate windows until it ends; returns the
    windows and the restore's wall time."""
    es = rig.show()["extent_size"]
    out: list[Window] = []
    load.qd32_rate /= 2           # the first busy window need not last twice as long
    t_start = time.perf_counter()
    rig.restore()
    kinds = ("qd1", "qd32")
    i = 0
    while time.perf_counter() - t_start < max_secs:
        t0, before = time.perf_counter(), rig.progress()
        if not running(before):
            break
        w = load.run(kinds[i % 2])
        w.phase = "busy"
        after = rig.progress()
        w.secs = time.perf_counter() - t0
        w.valid = running(after)
        w.restored = (after["extents_done"] - before["extents_done"]) * es if w.valid else 0
        out.append(w)
        i += 1
    rig.wait(max_secs + 600)
    return out, time.perf_counter() - t_start


def idle_restore(rig: Rig) -> float:
    """Seconds of a full restore with no host load."""
    t0 = time.perf_counter()
    rig.restore()
    rig.wait(600)
    return time.perf_counter() - t0


# -- driver ------------------------------------------------------------------------------------
def run(root: str, args: argparse.Namespace) -> dict[str, Any]:
    size = args.size * MiB
    rig = Rig(root, size)
    try:
        t0 = time.perf_counter()
        make_images(list(rig.path.values()), size)
        gen_s = time.perf_counter() - t0
        rig.start()
        show = rig.show()
        io_size = show["throttle"].get("batch_extents", CHUNK // show["extent_size"]) * show["extent_size"]
        assert rig.daemon is not None and rig.daemon.proc is not None
        load = Load(rig.url, size, args.qd1_reads, args.qd32_secs, args.seed, rig.daemon.proc.pid)

        # idle, busy, idle, busy, ..., idle: both sides see the same spells
        # of other processes' load on this shared machine
        idle_windows(load, 1)     # untimed warm-up: first sessions and reads are slower
        idle = idle_windows(load, args.idle_windows)
        busy: list[Window] = []
        busy_restore_s: list[float] = []
        for _ in range(args.cycles):
            ws, secs = busy_windows(rig, load, args.max_busy_secs)
            rig.check_restored()
            busy += ws
            busy_restore_s.append(secs)
            idle += idle_windows(load, args.idle_windows)

        # C R R C (as tests/bench/restore.py), an untimed warm-up copy first:
        # the copy's target is then an allocated file, as the restore's is.
        dst = os.path.join(root, "copy.img")
        clone_path = rig.path[CLONES[0]]
        plain_copy(clone_path, dst, size, io_size)
        copy_s = [plain_copy(clone_path, dst, size, io_size)]
        rest_s = [idle_restore(rig) for _ in range(args.idle_restores)]
        copy_s.append(plain_copy(clone_path, dst, size, io_size))
        os.unlink(dst)
        rig.check_restored()
        throttle = rig.show()["throttle"]
        estimates = rig.idle_estimates()
    except BenchError:
        tail = rig.log_tail()
        if tail:
            print(f"daemon log (tail):\n{tail}", file=sys.stderr)
        raise
    finally:
        rig.close()

    print_windows(idle + busy)
    print_cpu(idle, [w for w in busy if w.valid])
    print("qd32 CPU ms per MB restored, beyond idle: " + "  ".join(
        f"{k} {v:.2f}" for k, v in cpu_per_mb(idle, [w for w in busy if w.valid]).items()))
    return {**summarise(size, idle, busy, busy_restore_s, rest_s, copy_s, io_size, gen_s, throttle),
            "idle_estimate_MBps": estimates}


def print_windows(ws: list[Window]) -> None:
    """One line per window: where the noise is (a p99 from one bad window)."""
    print(f"{'phase':<6}{'kind':<6}{'valid':<7}{'secs':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'IOPS':>9}{'restored MB':>13}")
    for w in ws:
        lat = (f"{pct(w.lat, 50) * 1e3:>9.3f}{pct(w.lat, 99) * 1e3:>9.3f}{max(w.lat) * 1e3:>9.3f}"
               if w.lat else " " * 27)
        iops = f"{w.iops:>9.0f}" if w.kind == "qd32" else " " * 9
        print(f"{w.phase:<6}{w.kind:<6}{'yes' if w.valid else 'no':<7}{w.secs:>7.2f}{lat}{iops}"
              f"{w.restored / 1e6:>13.1f}")


def cpu_per_command(ws: list[Window]) -> dict[str, float]:
    """Microseconds of CPU per host command, by consumer (cpuacct), over
    the windows ``ws``."""
    ops = sum(w.ops for w in ws)
    out: dict[str, float] = {}
    for w in ws:
        for k, v in w.cpu.items():
            out[k] = out.get(k, 0.0) + v
    return {k: round(v / ops * 1e6, 1) for k, v in sorted(out.items())} if ops else {}


def print_cpu(idle: list[Window], busy: list[Window]) -> None:
    """CPU per host command, idle vs busy: what a restore costs the host
    beside its copies (the daemon's loop, its copy threads, the kernel)."""
    for kind in ("qd1", "qd32"):
        sides = {ph: cpu_per_command([w for w in ws if w.kind == kind])
                 for ph, ws in (("idle", idle), ("busy", busy))}
        names = sorted(set(sides["idle"]) | set(sides["busy"]))
        print(f"{kind} CPU us/command " + "  ".join(
            f"{n} {sides['idle'].get(n, 0.0):.1f}/{sides['busy'].get(n, 0.0):.1f}" for n in names)
            + "  (idle/busy)")


def cpu_per_mb(idle: list[Window], busy: list[Window]) -> dict[str, float]:
    """Milliseconds of CPU per MB restored during the busy QD32 windows, by
    consumer, beyond what the same host commands cost idle: what copying
    the floor costs the machine (the copy threads, the kernel's writeback
    and I/O completion, the loop), whoever pays it. Consumers under 0.01
    ms/MB are left out."""
    ws = [w for w in busy if w.kind == "qd32"]
    mb = sum(w.restored for w in ws) / 1e6
    if not mb:
        return {}
    base = cpu_per_command([w for w in idle if w.kind == "qd32"])
    ops = sum(w.ops for w in ws)
    out = {}
    for k in sorted({k for w in ws for k in w.cpu}):
        extra = sum(w.cpu.get(k, 0.0) for w in ws) - base.get(k, 0.0) * 1e-6 * ops
        if abs(extra) / mb * 1e3 >= 0.01:
            out[k] = round(extra / mb * 1e3, 2)
    return out


def summarise(size: int, idle: list[Window], busy: list[Window], busy_restore_s: list[float],
              rest_s: list[float], copy_s: list[float], io_size: int, gen_s: float,
              throttle: dict[str, Any]) -> dict[str, Any]:
    def lat(ws: list[Window]) -> list[float]:
        return [x for w in ws if w.kind == "qd1" for x in w.lat]

    def wpct(ws: list[Window], p: float) -> float:
        """The median over QD1 windows of each window's percentile, as the
        engine bench does over its repetitions: one window hit by another
        process's burst (this machine is shared) moves it little."""
        return med([pct(w.lat, p) for w in ws if w.kind == "qd1"])

    def iops(ws: list[Window]) -> list[float]:
        return [w.iops for w in ws if w.kind == "qd32"]

    valid = [w for w in busy if w.valid]
    qd32_busy = [w for w in valid if w.kind == "qd32"]
    idle_lat, busy_lat = lat(idle), lat(valid)
    idle_rate = size / med(rest_s)
    busy_rate = (sum(w.restored for w in qd32_busy) / sum(w.secs for w in qd32_busy)
                 if qd32_busy else float("nan"))
    copy_rate = size / med(copy_s)
    return {
        "size_MiB": size // MiB,
        "idle_p50_ms": wpct(idle, 50) * 1e3, "idle_p99_ms": wpct(idle, 99) * 1e3,
        "busy_p50_ms": wpct(valid, 50) * 1e3, "busy_p99_ms": wpct(valid, 99) * 1e3,
        "idle_pooled_p99_ms": pct(idle_lat, 99) * 1e3, "busy_pooled_p99_ms": pct(busy_lat, 99) * 1e3,
        "idle_qd32_iops": med(iops(idle)), "busy_qd32_iops": med(iops(valid)),
        "idle_qd1_reads": len(idle_lat), "busy_qd1_reads": len(busy_lat),
        "busy_windows_valid": len(valid), "busy_windows_invalid": len(busy) - len(valid),
        "busy_qd1_windows": sum(1 for w in valid if w.kind == "qd1"),
        "busy_qd32_windows": len(qd32_busy),
        "busy_restore_s": busy_restore_s, "busy_restore_MBps": size / med(busy_restore_s) / 1e6,
        "restore_busy_MBps": busy_rate / 1e6, "restore_idle_MBps": idle_rate / 1e6,
        "copy_MBps": copy_rate / 1e6, "copy_io_KiB": io_size // KiB,
        "restore_idle_s": rest_s, "copy_s": copy_s, "generate_s": gen_s,
        "throttle": throttle,
        "qd32_cpu_us_idle": cpu_per_command([w for w in idle if w.kind == "qd32"]),
        "qd32_cpu_us_busy": cpu_per_command([w for w in valid if w.kind == "qd32"]),
        "qd32_cpu_ms_per_MB_restored": cpu_per_mb(idle, valid),
    }


def ratio(a: float, b: float) -> float | None:
    r = a / b if b else float("nan")
    return None if r != r else round(r, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048, metavar="MIB", help="LU size in MiB (2048)")
    ap.add_argument("--qd1-reads", type=int, default=2000, metavar="N",
                    help="QD1 reads per window (2000)")
    ap.add_argument("--qd32-secs", type=float, default=1.0, metavar="S",
                    help="about how long a QD32 window lasts (1.0)")
    ap.add_argument("--cycles", type=int, default=2, metavar="N",
                    help="busy restores, each between two idle phases (2)")
    ap.add_argument("--idle-windows", type=int, default=2, metavar="N",
                    help="QD1+QD32 window pairs per idle phase (2)")
    ap.add_argument("--idle-restores", type=int, default=2, metavar="N",
                    help="restores with no host load (2)")
    ap.add_argument("--max-busy-secs", type=float, default=240, metavar="S",
                    help="stop starting busy windows after this long (240)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tmp", default="/tmp", metavar="DIR",
                    help="where the run's scratch directory (images, state) goes (/tmp)")
    args = ap.parse_args(argv)
    if args.size < 1 or args.qd1_reads < 1 or args.qd32_secs <= 0 or args.idle_windows < 1 or args.cycles < 1 \
            or args.idle_restores < 1:
        ap.error("sizes and counts must be >= 1")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"restore_latency: {', '.join(missing)} not found (bash .ci/install --test)",
              file=sys.stderr)
        return 2

    root = tempfile.mkdtemp(prefix="lr-latbench-", dir=args.tmp)
    t0 = time.perf_counter()
    try:
        res = run(root, args)
    except BenchError as e:
        print(f"BENCHMARK ERROR: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    print(f"{'measure':<26} value")
    print("-" * 72)
    for k, v in res.items():
        print(f"{k:<26} {fmt(v)}")
    print("-" * 72)
    print(f"total run time {elapsed:.1f} s")
    if not res["busy_windows_valid"]:
        print("no busy window ended before the restore did: the busy numbers are invalid "
              "(use a bigger --size)", file=sys.stderr)

    out = {
        "p50_ratio": ratio(res["busy_p50_ms"], res["idle_p50_ms"]),
        "p99_ratio": ratio(res["busy_p99_ms"], res["idle_p99_ms"]),
        "qd32_iops_ratio": ratio(res["busy_qd32_iops"], res["idle_qd32_iops"]),
        "restore_rate_busy_vs_idle": ratio(res["restore_busy_MBps"], res["restore_idle_MBps"]),
        "restore_vs_copy": ratio(res["restore_idle_MBps"], res["copy_MBps"]),
        **{k: (round(v, 4) if isinstance(v, float) and v == v else None if isinstance(v, float) else v)
           for k, v in res.items() if not isinstance(v, list)},
        "restore_idle_s": [round(x, 3) for x in res["restore_idle_s"]],
        "busy_restore_s": [round(x, 3) for x in res["busy_restore_s"]],
        "copy_s": [round(x, 3) for x in res["copy_s"]],
        "idle_estimate_MBps": res["idle_estimate_MBps"],     # busy restores first, then idle ones
        "run_s": round(elapsed, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
