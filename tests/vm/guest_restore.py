"""Guest side of the VM tier, part 2: `liverestore serve --backend lio` for real.

Runs as root inside the LIO guest, after guest_e2e.py (which has torn its own
LIO configuration down). The daemon exports src (LUN 0) and clone (LUN 1) of
a pair through LIO + our TCMU handler; open-iscsi logs in; ext4 on the
source, files and checksums; sync + fracture; the source changes; a slow
protected restore runs while the filesystem is re-read (clone-time contents)
and written; the daemon is SIGKILLed mid-restore with a direct-I/O write in
flight, restarted, the restore resumes where it was and completes; fsck, the
files and the clone's bytes are checked. Then libiscsi's iscsi-test-cu runs
against a spare LU of ours and against a LIO fileio LU, and fio compares our
handler with tcmu-runner's qcow handler and with LIO fileio.

Prints "RESULT <name>: PASS|FAIL ..." lines, "LIBISCSI ..." and "BENCH ..."
lines, and as its last line one JSON object (the benchmark summary).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guest_common import (PY, REPO, RUN, disks_of, drop_caches, failures, liverestore,  # noqa: E402,F401
                          liverestore_json, log, result, run_main, sh, sha)
from guest_common import login as login_portal  # noqa: E402
from guest_common import start_daemon as start_lr_daemon  # noqa: E402
STATE = "/tmp/lr-state"
SOCK = "/tmp/lr-control.sock"
PORTAL = "127.0.0.1:3260"
IQN = "iqn.2026-11.org.liverestore:pair"
IQN_SPARE = "iqn.2026-11.org.liverestore:spare"
IQN_FILEIO = "iqn.2026-11.org.liverestore:fileio"
IQN_QCOW = "iqn.2026-11.org.liverestore:qcow"
SIZE = 256 << 20
SPARE = 128 << 20
MNT = "/tmp/lr-restore-mnt"
# libiscsi subset: the whole suite (750 tests) does not fit the tier's budget in TCG
LIBISCSI_TESTS = os.environ.get("LR_LIBISCSI_TESTS", ",".join(
    f"ALL.{s}" for s in ("TestUnitReady", "Inquiry", "ReadCapacity10", "ReadCapacity16", "Read6", "Read10",
                         "Read16", "Write10", "Write16", "WriteVerify10", "Verify10", "SynchronizeCache10",
                         "SynchronizeCache16", "ModeSense6", "ReportSupportedOpcodes", "Mandatory",
                         "Unmap", "WriteSame10", "WriteSame16", "CompareAndWrite", "StartStopUnit")))
# ~224 s measured for our handler under TCG; headroom for a loaded host while
# the whole guest run stays inside the tier's 1020 s guest timeout.
LIBISCSI_TIMEOUT = 450


def lr(*args: str, timeout: float = 120) -> str:
    return liverestore(SOCK, *args, timeout=timeout)


def lrj(*args: str, timeout: float = 120):
    return liverestore_json(SOCK, *args, timeout=timeout)


def start_daemon(n: int, init: bool, verbose: bool = True) -> subprocess.Popen:
    return start_lr_daemon(f"daemon{n}.log", SOCK, STATE, PORTAL, init, verbose)


def login(iqn: str) -> None:
    login_portal(iqn, PORTAL)


def write_file(path: str, size: int) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def pair_progress() -> dict:
    return lrj("pair", "show", "clone")


def kernel_errors() -> list[str]:
    return [l for l in sh("dmesg", check=False).stdout.splitlines() if "I/O error" in l]


# ---------------------------------------------------------------------------------------------
def restore_scenario() -> None:
    os.makedirs(MNT, exist_ok=True)
    d1 = start_daemon(1, init=True)
    for name, size in (("src", SIZE), ("clone", SIZE), ("spare", SPARE)):
        lr("volume", "create", name, "--size", str(size))
    t = time.time()
    lr("pair", "create", "src", "clone", "--wait", timeout=600)
    log(f"pair created (initial sync {time.time() - t:.1f}s)")
    lr("export", "create", IQN, "--lun", "0=src", "--lun", "1=clone")
    lr("export", "create", IQN_SPARE, "--lun", "0=spare")
    uio = [open(n).read().strip() for n in glob.glob("/sys/class/uio/uio*/name")]
    result("daemon_lio_export", sum("/liverestore/" in u for u in uio) == 3, f"uio={uio}")
    login(IQN)
    disks = disks_of(IQN, 2)
    src, clone = disks[0], disks[1]
    sz = int(open(f"/sys/block/{os.path.basename(src)}/size").read()) * 512
    result("iscsi_login_pair", sz == SIZE, f"src={src} clone={clone} size={sz}")

    # -- 1. filesystem, files, sync + fracture ----------------------------------------------
    t = time.time()
    sh(f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {src}", timeout=400)
    sh(f"mount {src} {MNT}")
    sums: dict[str, str] = {}
    for i in range(24):
        sums[f"f{i:02d}"] = write_file(f"{MNT}/f{i:02d}", (1 << 20) if i % 2 else (192 << 10))
    os.makedirs(f"{MNT}/dir", exist_ok=True)
    for i in range(8):
        sums[f"dir/g{i}"] = write_file(f"{MNT}/dir/g{i}", 64 << 10)
    sh("sync")
    sh(f"umount {MNT}")
    log(f"mkfs + {len(sums)} files in {time.time() - t:.1f}s")
    t = time.time()
    lr("pair", "sync", "clone", "--wait", timeout=600)
    lr("pair", "fracture", "clone")
    clone_img = lrj("volume", "show", "clone")["path"]
    clone_sha = sha(clone_img)
    lu_sha = sh(f"dd if={clone} bs=1M iflag=direct status=none | sha256sum", timeout=300).stdout.split()[0]
    result("sync_fracture", lu_sha == clone_sha, f"sync+fracture {time.time() - t:.1f}s; clone sha {clone_sha[:16]} "
           f"(through LUN 1: {'same' if lu_sha == clone_sha else lu_sha[:16]})")

    # the source moves on: files changed, deleted, added
    sh(f"mount {src} {MNT}")
    for i in range(1, 24, 2)[:8]:                          # 8 x 1 MiB rewritten
        write_file(f"{MNT}/f{i:02d}", 1 << 20)
    for name in ("f00", "f02", "dir/g0", "dir/g1"):
        os.unlink(f"{MNT}/{name}")
    # a big file the restore must take back out: extents the host never reads during the restore,
    # so the (throttled) background copier, not copy-on-read, has them to do
    sh(f"dd if=/dev/urandom of={MNT}/later.bin bs=1M count=48 status=none", timeout=300)
    sh("sync")
    sh(f"umount {MNT}")

    # -- 2. a slow protected restore; the host reads and writes meanwhile --------------------
    lr("pair", "throttle", "clone", "--rate", "256K")
    lr("pair", "restore", "clone")
    pr0 = pair_progress()
    log(f"restore started: {pr0['state']} {pr0['progress']['extents_done']}/{pr0['progress']['extents_total']}")
    drop_caches(src)
    sh(f"mount {src} {MNT}")
    have = sorted(os.path.relpath(os.path.join(dp, f), MNT) for dp, _, fs in os.walk(MNT) for f in fs)
    bad = [n for n, s in sums.items() if not os.path.exists(f"{MNT}/{n}") or sha(f"{MNT}/{n}") != s]
    extra = [n for n in have if n not in sums and not n.startswith("lost+found")]
    pr1 = pair_progress()["progress"]
    result("restore_reads_clone_state", not bad and not extra,
           f"{len(sums)} files, mismatched={bad} extra={extra}; restore at {pr1['extents_done']}/"
           f"{pr1['extents_total']}")
    new: dict[str, str] = {}
    for i in range(4):
        new[f"new{i}"] = write_file(f"{MNT}/new{i}", 512 << 10)
    sh("sync")
    drop_caches()
    bad = [n for n, s in new.items() if sha(f"{MNT}/{n}") != s]
    pr2 = pair_progress()["progress"]
    result("restore_writes", not bad, f"{len(new)} new files, mismatched={bad}; restore at "
           f"{pr2['extents_done']}/{pr2['extents_total']}")

    # -- 3. SIGKILL the daemon mid-restore, with a direct-I/O write stream in flight ---------
    deadline = time.time() + 60
    while pair_progress()["progress"]["extents_done"] == 0 and time.time() < deadline:
        time.sleep(0.5)
    stream_src = "/tmp/lr-stream.src"
    new["stream.bin"] = write_file(stream_src, 48 << 20)
    before = pair_progress()                   # (the CLI takes a second or two in TCG: ask first)
    dd = subprocess.Popen(["dd", f"if={stream_src}", f"of={MNT}/stream.bin", "bs=128k", "oflag=direct",
                           "conv=fsync"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        time.sleep(0.02)
        if os.path.exists(f"{MNT}/stream.bin") and os.path.getsize(f"{MNT}/stream.bin") >= (1 << 20):
            break
    # freeze the daemon so the stream's commands certainly wait on the ring, then kill it
    d1.send_signal(signal.SIGSTOP)
    time.sleep(1.0)
    dd_running = dd.poll() is None
    d1.send_signal(signal.SIGKILL)
    d1.wait()
    done_b, total = before["progress"]["extents_done"], before["progress"]["extents_total"]
    at_kill = os.path.getsize(f"{MNT}/stream.bin")
    log(f"daemon #1 SIGKILLed: restore {before['state']} {done_b}/{total}; stream at {at_kill} bytes, "
        f"dd running={dd_running}")
    result("killed_mid_restore", before["state"] == "restoring" and 0 < done_b < total and dd_running,
           f"state={before['state']} extents {done_b}/{total}; direct-I/O stream in flight={dd_running} "
           f"at {at_kill} bytes")
    time.sleep(3)
    os.unlink(SOCK) if os.path.exists(SOCK) else None
    d2 = start_daemon(2, init=False)
    after = pair_progress()
    done_a = after["progress"]["extents_done"]
    time.sleep(3)
    later = pair_progress()["progress"]["extents_done"]
    log(f"after restart: {after['state']} {done_a}/{after['progress']['extents_total']}, 3 s later {later}")
    result("restore_resumes", after["state"] == "restoring" and done_a > 0 and later >= done_a
           and done_a >= done_b // 2,
           f"before kill {done_b}, after restart {done_a}, 3 s later {later}, total {total}")
    out, _ = dd.communicate(timeout=300)
    log("dd: " + " | ".join(out.strip().splitlines()[-1:]))
    result("io_survives_daemon_kill", dd.returncode == 0 and at_kill < (48 << 20),
           f"dd rc={dd.returncode}, killed at {at_kill}/{48 << 20} bytes")
    d2log = open(os.path.join(RUN, "daemon2.log")).read()
    result("daemon_reset_ring", "ring reset" in d2log,
           "; ".join(l.split(" INFO ", 1)[-1] for l in d2log.splitlines() if "reset" in l)[:300])
    t = time.time()
    lr("pair", "throttle", "clone", "--rate", "0")
    fin = lrj("pair", "wait", "clone", timeout=600)
    result("restore_completes", fin["progress"]["error"] is None and fin["state"] != "restoring",
           f"state={fin['state']} error={fin['progress']['error']} in {time.time() - t:.1f}s after unthrottle; "
           f"extents {fin['progress']['extents_done']}/{fin['progress']['extents_total']}")

    # -- 4. fsck, files, clone untouched ---------------------------------------------------
    sh("sync")
    sh(f"umount {MNT}")
    drop_caches(src)
    fsck = sh(f"fsck.ext4 -n -f {src}", check=False, timeout=400)
    result("restored_fsck_clean", fsck.returncode == 0, (fsck.stdout.strip().splitlines() or [""])[-1])
    sh(f"mount -o ro {src} {MNT}")
    want = {**sums, **new}
    have = sorted(os.path.relpath(os.path.join(dp, f), MNT) for dp, _, fs in os.walk(MNT) for f in fs)
    have = [n for n in have if not n.startswith("lost+found")]
    bad = [n for n, s in want.items() if not os.path.exists(f"{MNT}/{n}") or sha(f"{MNT}/{n}") != s]
    result("restored_files", not bad and sorted(want) == have,
           f"{len(sums)} clone-time + {len(new)} new files; mismatched={bad} "
           f"unexpected={sorted(set(have) - set(want))}")
    sh(f"umount {MNT}")
    now_sha = sha(clone_img)
    result("clone_unchanged", now_sha == clone_sha, f"clone sha {now_sha[:16]} fracture-time {clone_sha[:16]}")
    errs = kernel_errors()
    result("restore_no_block_io_errors", not errs, " | ".join(errs[:3]))
    sh(f"iscsiadm -m node -T {IQN} -p {PORTAL} --logout", check=False)
    return d2


# ---------------------------------------------------------------------------------------------
def lio_plain_targets(qcow_img: str) -> None:
    """A LIO fileio LU and a tcmu-runner user:qcow LU, each its own target, demo mode."""
    from rtslib_fb import FileIOStorageObject, LUN, NetworkPortal, Target, TPG, UserBackedStorageObject
    from rtslib_fb.fabric import ISCSIFabricModule

    from target.lio.dbroot import settle
    settle()                # this rtslib-fb keeps the dbroot the daemon agreed on with the host's tools
    fab = ISCSIFabricModule()
    sh(f"truncate -s {SPARE} /tmp/fileio.img")
    objs = {IQN_FILEIO: FileIOStorageObject("lrfileio", "/tmp/fileio.img", SPARE, write_back=False),
            IQN_QCOW: UserBackedStorageObject("lrqcow", config=f"qcow/{qcow_img}", size=SPARE)}
    for iqn, so in objs.items():
        tpg = TPG(Target(fab, iqn), 1)
        NetworkPortal(tpg, "127.0.0.1", 3260)
        LUN(tpg, 0, so)
        for k, v in (("generate_node_acls", "1"), ("authentication", "0"), ("demo_mode_write_protect", "0"),
                     ("cache_dynamic_acls", "1")):
            tpg.set_attribute(k, v)
        tpg.enable = True


def parse_cunit(out: str) -> dict[str, bool]:
    """Suite.Test -> passed, from CUnit's verbose output: "Suite: S", "  Test: T ..." and the
    verdict ("passed"/"FAILED") right after the "..." or at the start of a later line."""
    suite, test, tests = "", None, {}
    for line in out.splitlines():
        m = re.match(r"Suite: (\S+)", line)
        if m:
            suite, test = m.group(1), None
            continue
        m = re.match(r"  Test: (\S+) \.\.\.(.*)$", line)
        if m:
            test = f"{suite}.{m.group(1)}"
            line = m.group(2).strip()
        if test is not None and line.startswith(("passed", "FAILED")):
            tests[test] = line.startswith("passed")
            test = None
    return tests


def libiscsi(iqn: str, tag: str) -> dict:
    t = time.time()
    path = os.path.join(RUN, f"libiscsi-{tag}.log")
    with open(path, "w") as f:
        try:
            rc = subprocess.run(["iscsi-test-cu", "--dataloss", "-v", "-t", LIBISCSI_TESTS,
                                 f"iscsi://127.0.0.1:3260/{iqn}/0"], stdout=f, stderr=subprocess.STDOUT,
                                timeout=LIBISCSI_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out = open(path, errors="replace").read()
    tests = parse_cunit(out)
    m = re.search(r"^\s*tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
    summary = tuple(int(x) for x in m.groups()) if m else None
    r = {"ran": len(tests), "passed": sum(tests.values()), "tests": tests, "summary": summary,
         "rc": rc, "secs": round(time.time() - t, 1)}
    print(f"LIBISCSI {tag}: {r['passed']}/{r['ran']} passed (CUnit tests row total/ran/passed/failed="
          f"{summary}) in {r['secs']}s rc={rc}", flush=True)
    return r


# fio_compare: rounds of turns and seconds per fio job (two rounds of three
# LUs cost about what one round of 12 s jobs did)
FIO_ROUNDS = 2
FIO_SECS = 8


def fio(dev: str, rw: str, bs: str, depth: int, secs: int) -> tuple[float, float]:
    """Bytes per second of the job and the I/Os per second it completed."""
    p = sh(f"fio --name=b --filename={dev} --direct=1 --ioengine=libaio --rw={rw} --bs={bs} --iodepth={depth} "
           f"--runtime={secs} --time_based --ramp_time=2 --size={SPARE} --output-format=json", timeout=secs + 120)
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    return (float(j["read"]["bw_bytes"]) + float(j["write"]["bw_bytes"]),
            float(j["read"]["iops"]) + float(j["write"]["iops"]))


def stat_times(path: str) -> tuple[str, float, float]:
    """The name and the user and system CPU seconds so far of the process
    or thread whose /proc stat file is ``path``."""
    with open(path) as f:
        raw = f.read()
    fields = raw.rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return raw[raw.index("(") + 1:raw.rindex(")")], int(fields[11]) / hz, int(fields[12]) / hz


def cpu_times(pid: int | None) -> tuple[float, float] | None:
    """User and system CPU seconds of process ``pid`` so far (None: no pid)."""
    if not pid:
        return None
    return stat_times(f"/proc/{pid}/stat")[1:]


def thread_times(pid: int | None) -> dict[int, tuple[str, float, float]]:
    """Name, user and system CPU seconds of each thread of process ``pid`` so
    far: which thread of a handler spends the CPU (our ring thread, the
    asyncio loop; tcmu-runner's cmdproc and I/O workers)."""
    out: dict[int, tuple[str, float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task") if pid else []
    except OSError:
        return out
    for tid in tids:
        try:
            out[int(tid)] = stat_times(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue                    # the thread ended meanwhile
    return out


def guest_busy() -> float:
    """CPU seconds all the guest's vCPUs spent not idle, so far."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")      # minus idle, iowait


class CpuPerIo:
    """Where one fio job's CPU went, per I/O: the whole guest (fio, the
    initiator, LIO, the handler; with the share of the vCPUs it kept busy:
    a guest short of 100% waited for something) and the handler process
    (ours or tcmu-runner; none for fileio, which is all kernel)."""

    def __init__(self, handler_pid: int | None) -> None:
        self.pid = handler_pid
        self.t0 = time.time()
        self.guest0 = guest_busy()
        self.proc0 = cpu_times(handler_pid)
        self.threads0 = thread_times(handler_pid)
        self.threads: list[tuple[str, float, float]] = []  # (name, user, system us per I/O), busiest first
        self.us: dict[str, float] = {}          # guest / handler_user / handler_system, per I/O
        self.busy = 0.0                         # of all vCPUs
        self.handler_share = 0.0                # of one CPU

    def stop(self, iops: float) -> "CpuPerIo":
        wall = time.time() - self.t0
        n = iops * wall                     # the ramp's I/Os counted at the measured rate
        guest = guest_busy() - self.guest0
        self.us["guest"] = guest / n * 1e6
        self.busy = guest / wall / os.cpu_count()
        if self.proc0 is not None:
            u1, s1 = cpu_times(self.pid)
            u, s = u1 - self.proc0[0], s1 - self.proc0[1]
            self.us["handler_user"], self.us["handler_system"] = u / n * 1e6, s / n * 1e6
            self.handler_share = (u + s) / wall
            busy = []
            for tid, (name, tu, ts) in thread_times(self.pid).items():
                _, tu0, ts0 = self.threads0.get(tid, (name, 0.0, 0.0))
                busy.append((name, (tu - tu0) / n * 1e6, (ts - ts0) / n * 1e6))
            self.threads = sorted((b for b in busy if b[1] + b[2] > 0), key=lambda b: -b[1] - b[2])[:4]
        return self

    def line(self) -> str:
        out = f"guest CPU {self.us['guest']:.0f} us/IO ({self.busy:.0%} of {os.cpu_count()} vCPUs)"
        if "handler_user" in self.us:
            out += (f", handler user {self.us['handler_user']:.0f} + system {self.us['handler_system']:.0f} "
                    f"us/IO ({self.handler_share:.0%} of a CPU)")
        if self.threads:
            out += "; threads (user+system us/IO) " + ", ".join(f"{name} {u:.0f}+{s:.0f}"
                                                               for name, u, s in self.threads)
        return out


PERF_EVENTS = ("raw_syscalls:sys_enter", "context-switches", "page-faults", "cpu-migrations")


def perf_stat(pid: int, out: str) -> subprocess.Popen | None:
    """Counts (no sampling: the handler runs at its usual speed, unlike
    under strace's ptrace stops) of what a handler process asks of the
    kernel, until SIGINT; the syscall tracepoint needs tracefs. None
    (and a note) without perf (Debian: linux-perf)."""
    if shutil.which("perf") is None:
        log("LR_PERF=1 but no perf here (Debian package linux-perf): no counts")
        return None
    sh("mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing", check=False)
    p = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "-p", str(pid), "-o", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(1)                   # attached before fio starts
    return p


def perf_per_io(path: str, iops: float) -> str:
    """perf stat's CSV counts as per-I/O figures (the I/Os of the fio run,
    its ramp included, at the measured rate)."""
    n = iops * (FIO_SECS + 2)
    per = []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        return f"perf stat: {e}"
    for line in lines:
        f = line.split(",")
        if len(f) > 2 and f[2] in PERF_EVENTS:
            per.append(f"{f[2]} {float(f[0]) / n:.2f}/IO" if f[0].replace(".", "").isdigit() else f"{f[2]} {f[0]}")
    return "perf: " + ", ".join(per) if per else "perf stat: no counts: " + " | ".join(lines[-3:])


def fio_compare(daemon_pid: int | None = None, runner_pid: int | None = None) -> dict:
    """fio 4K random read/write and 1M sequential through LIO: our spare LU
    vs tcmu-runner's qcow handler vs LIO fileio (all logged in here), the
    same job on each (128 MiB written in full first, direct=1, QD16 / QD4).
    TCG's speed follows the host's load, so the LUs take turns, in reversed
    order each round, and each figure is the mean over the rounds: a load
    change during the run weighs on all three alike. Each 4K run also says
    what CPU it cost per I/O (CpuPerIo; the handlers' share with
    ``daemon_pid`` / ``runner_pid``). With ``daemon_pid`` and LR_PYSPY=1,
    py-spy records our daemon during our first 4K run into
    RUN/pyspy-4k.txt (collapsed stacks)."""
    for iqn in (IQN_SPARE, IQN_FILEIO, IQN_QCOW):
        login(iqn)
    devs = {tag: disks_of(iqn, 1)[0] for tag, iqn in (("ours", IQN_SPARE), ("fileio", IQN_FILEIO),
                                                      ("qcow", IQN_QCOW))}
    handler_pid = {"ours": daemon_pid, "fileio": None, "qcow": runner_pid}
    log(f"bench devices {devs}")
    for dev in devs.values():
        sh(f"dd if=/dev/zero of={dev} bs=1M count={SPARE >> 20} oflag=direct status=none", timeout=300)   # allocate
    runs: dict[str, dict[str, list[float]]] = {tag: {"4k": [], "1m": []} for tag in devs}
    cpu_us: dict[str, dict[str, list[float]]] = {tag: {} for tag in devs}      # per 4K I/O, by round
    for rnd in range(FIO_ROUNDS):
        for tag in (list(devs) if rnd % 2 == 0 else list(reversed(devs))):
            spy = None
            if rnd == 0 and tag == "ours" and daemon_pid and os.environ.get("LR_PYSPY") == "1":
                spy = subprocess.Popen([os.path.join(os.path.dirname(PY), "py-spy"), "record", "-p",
                                        str(daemon_pid), "-r", "100", "-f", "raw", "-d", str(FIO_SECS + 2),
                                        "-o", os.path.join(RUN, "pyspy-4k.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            trace = None
            if rnd == 0 and handler_pid[tag] and os.environ.get("LR_PERF") == "1":
                trace = perf_stat(handler_pid[tag], os.path.join(RUN, f"perf-{tag}-4k.txt"))
            cpu = CpuPerIo(handler_pid[tag])
            bw, iops = fio(devs[tag], "randrw", "4k", 16, FIO_SECS)
            runs[tag]["4k"].append(bw)
            cpu.stop(iops)
            for k, v in cpu.us.items():
                cpu_us[tag].setdefault(k, []).append(v)
            print(f"BENCH round {rnd} {tag} 4K: {cpu.line()}", flush=True)
            if trace is not None:
                trace.send_signal(signal.SIGINT)
                trace.wait(timeout=60)
                print(f"BENCH round {rnd} {tag} 4K: {perf_per_io(os.path.join(RUN, f'perf-{tag}-4k.txt'), iops)}",
                      flush=True)
            if spy is not None:
                spy.wait(timeout=60)
            runs[tag]["1m"].append(fio(devs[tag], "rw", "1M", 4, FIO_SECS)[0])
            print(f"BENCH round {rnd} {tag} ({devs[tag]}): 4K randrw {runs[tag]['4k'][-1] / 4096:.0f} IOPS, "
                  f"1M seq rw {runs[tag]['1m'][-1] / 1e6:.1f} MB/s", flush=True)
    bench = {tag: {k: sum(v) / len(v) for k, v in r.items()} for tag, r in runs.items()}
    summary = {"vs_tcmu_runner_4k": round(bench["ours"]["4k"] / bench["qcow"]["4k"], 3),
               "vs_tcmu_runner_1m": round(bench["ours"]["1m"] / bench["qcow"]["1m"], 3),
               "vs_fileio_4k": round(bench["ours"]["4k"] / bench["fileio"]["4k"], 3),
               "vs_fileio_1m": round(bench["ours"]["1m"] / bench["fileio"]["1m"], 3),
               "iops_4k": {k: round(v["4k"] / 4096) for k, v in bench.items()},
               "mbps_1m": {k: round(v["1m"] / 1e6, 1) for k, v in bench.items()},
               # CPU microseconds per 4K I/O (mean over the rounds): what the
               # IOPS ratio follows when the guest is CPU-bound
               "cpu_us_per_io_4k": {tag: {k: round(sum(v) / len(v)) for k, v in c.items()}
                                    for tag, c in cpu_us.items()}}
    print(f"BENCH ratios: ours/tcmu-runner(qcow) 4K {summary['vs_tcmu_runner_4k']} (goal >= 1.0), "
          f"1M {summary['vs_tcmu_runner_1m']} (goal >= 0.8); ours/fileio 4K {summary['vs_fileio_4k']}, "
          f"1M {summary['vs_fileio_1m']}", flush=True)
    result("bench_numbers", all(v["4k"] > 0 and v["1m"] > 0 for v in bench.values()), json.dumps(summary["iops_4k"]))
    return summary


def start_peers() -> subprocess.Popen:
    """tcmu-runner, and the peer LUs: LIO fileio and tcmu-runner qcow."""
    qcow_img = "/tmp/bench.qcow2"
    sh(f"qemu-img create -q -f qcow2 -o preallocation=metadata {qcow_img} {SPARE}")
    runner_log = open(os.path.join(RUN, "tcmu-runner.log"), "w")
    runner = subprocess.Popen(["tcmu-runner"], stdout=runner_log, stderr=subprocess.STDOUT)
    time.sleep(3)
    log(f"tcmu-runner running={runner.poll() is None}")
    lio_plain_targets(qcow_img)
    return runner


def stop_peers(runner: subprocess.Popen) -> None:
    for iqn in (IQN_SPARE, IQN_FILEIO, IQN_QCOW):
        sh(f"iscsiadm -m node -T {iqn} -p {PORTAL} --logout", check=False)
    runner.send_signal(signal.SIGTERM)
    try:
        runner.wait(timeout=15)
    except subprocess.TimeoutExpired:
        runner.kill()


def benchmarks_and_libiscsi(daemon_pid: int) -> dict:
    # -- 5. libiscsi against our spare LU and a LIO fileio LU ---------------------------------
    runner = start_peers()
    print(f"LIBISCSI subset (the full 750-test suite does not fit the tier's budget in TCG): {LIBISCSI_TESTS}",
          flush=True)
    ours = libiscsi(IQN_SPARE, "ours")
    fileio = libiscsi(IQN_FILEIO, "fileio")
    only_fileio = sorted(n for n, ok in fileio["tests"].items() if ok and not ours["tests"].get(n, False))
    print(f"LIBISCSI fail for us, pass for fileio ({len(only_fileio)}): {' '.join(only_fileio) or '-'}",
          flush=True)
    result("libiscsi_ran", ours["ran"] > 0 and fileio["ran"] > 0 and ours["summary"] is not None
           and ours["rc"] != "timeout",
           f"ours {ours['passed']}/{ours['ran']}, fileio {fileio['passed']}/{fileio['ran']}")

    # -- 6. fio: ours vs tcmu-runner qcow vs LIO fileio -------------------------------------------
    summary = fio_compare(daemon_pid, runner.pid)
    summary["libiscsi"] = {"ours_passed": ours["passed"], "ours_ran": ours["ran"],
                           "fileio_passed": fileio["passed"], "fileio_ran": fileio["ran"], "subset": True}
    stop_peers(runner)
    return summary


def main() -> int:
    log(f"kernel {os.uname().release}; repo {REPO}")
    sh("iscsid || true", check=False)
    d = restore_scenario()
    summary = None
    try:
        summary = benchmarks_and_libiscsi(d.pid)
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.kill()
    print(f"SUMMARY2: {len(failures)} failed: {failures}" if failures else "SUMMARY2: all passed", flush=True)
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main, "guest_restore_script", ["daemon1.log", "daemon2.log"])
