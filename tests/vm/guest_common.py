"""What the guest-side scripts of the VM tier share: the run directory,
logging, RESULT lines, shell calls, checksums, and the __main__ wrapper that
turns a crash of the script into a FAIL line with the logs that explain it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Callable

RUN = sys.argv[1]
REPO = os.environ.get("PYTHONPATH", os.getcwd())
PY = sys.executable
failures: list[str] = []
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:.0f}s] {msg}", flush=True)


def result(name: str, ok: bool, detail: str = "") -> None:
    print(f"RESULT {name}: {'PASS' if ok else 'FAIL'} {detail}".rstrip(), flush=True)
    if not ok:
        failures.append(name)


def sh(cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Not subprocess.run: after a timeout it waits for the killed child, and
    a child stuck in the kernel (a configfs write waiting for a netlink
    answer nobody gives) never ends; the step must fail, not hang the guest."""
    child = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()                # and no wait: it may never end
        raise
    p = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    return p


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def drop_caches(disk: str | None = None) -> None:
    sh("sync")
    if disk:
        sh(f"blockdev --flushbufs {disk}", check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


#: how long disks_of waits for a session's disks, and how often it asks
#: open-iscsi to rescan meanwhile: on the TCG guest the kernel once showed
#: 1 of 2 LUNs after 30 s (the CI run at 89af990), and a rescan is how an
#: admin makes it look again
DISK_WAIT_S = 90.0
RESCAN_EVERY_S = 15.0


def disks_of(iqn: str | None, count: int) -> dict[int, str]:
    """LUN -> /dev/sdX of the sessions (to ``iqn`` only, if given), from the
    SCSI address h:c:t:l; waits up to DISK_WAIT_S for ``count`` disks,
    rescanning the sessions every RESCAN_EVERY_S."""
    disks: dict[int, str] = {}
    start = time.monotonic()
    rescan = start + RESCAN_EVERY_S
    while time.monotonic() - start < DISK_WAIT_S:
        if time.monotonic() >= rescan:
            sh("iscsiadm -m session --rescan", check=False)
            rescan = time.monotonic() + RESCAN_EVERY_S
        disks = {}
        out = sh("iscsiadm -m session -P3", check=False).stdout
        cur = None
        for line in out.splitlines():
            if line.strip().startswith("Target:"):
                cur = line.split("Target:")[1].split()[0]
            if (iqn is None or cur == iqn) and "Attached scsi disk" in line:
                name = line.split("Attached scsi disk")[1].split()[0]
                if os.path.exists(f"/dev/{name}"):
                    addr = os.path.basename(os.readlink(f"/sys/block/{name}/device"))
                    disks[int(addr.split(":")[3])] = f"/dev/{name}"
        if len(disks) >= count:
            return disks
        time.sleep(0.2)
    raise RuntimeError(f"expected {count} SCSI disks{f' of {iqn}' if iqn else ''}, got {disks}")


def run_main(main: Callable[[], int], name: str, logs: list[str], tail: int = 40) -> None:
    """Exit with main()'s status; an exception becomes "RESULT <name>: FAIL"
    followed by the tails of the given logs (in RUN) and of dmesg."""
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - reported as a FAIL line, then exit 1
        import traceback
        traceback.print_exc()
        print(f"RESULT {name}: FAIL {e}", flush=True)
        for n in logs:
            p = os.path.join(RUN, n)
            if os.path.exists(p):
                print(f"--- {n} tail ---\n" + "".join(open(p).readlines()[-tail:]), flush=True)
        print(sh("dmesg | tail -40", check=False).stdout, flush=True)
        sys.exit(1)


LR = [PY, "-m", "target.cli"]


def liverestore(sock: str, *args: str, timeout: float = 120) -> str:
    """`liverestore --socket SOCK ARGS...`'s output; a failure raises with its output."""
    p = subprocess.run([*LR, "--socket", sock, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"liverestore {' '.join(args)} failed ({p.returncode}): {p.stdout[-1500:]} "
                           f"{p.stderr[-1500:]}")
    return p.stdout


def liverestore_json(sock: str, *args: str, timeout: float = 120):
    return json.loads(liverestore(sock, *args, "--json", timeout=timeout))


def start_daemon(log_name: str, sock: str, state: str, portal: str, init: bool,
                 verbose: bool = True) -> subprocess.Popen:
    """`liverestore serve --backend lio`, logging to RUN/LOG_NAME; returns once
    its control socket answers `status` (180 s at most)."""
    logf = open(os.path.join(RUN, log_name), "w")
    cmd = [*LR, "--socket", sock, "serve", "--backend", "lio", "--state-dir", state, "--portal", portal]
    if verbose:
        cmd.append("-v")
    if init:
        cmd.append("--init")
    p = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.time() + 180          # TCG on a loaded host: one CLI call can take 30 s
    while time.time() < deadline:
        time.sleep(0.3)
        if p.poll() is not None:
            break
        if os.path.exists(sock):
            try:
                q = subprocess.run([*LR, "--socket", sock, "status"], capture_output=True, text=True,
                                   timeout=60, cwd=REPO)
            except subprocess.TimeoutExpired:
                continue
            if q.returncode == 0:
                log(f"daemon ({log_name}) pid {p.pid} up")
                return p
    raise RuntimeError(f"daemon ({log_name}) did not come up: {open(logf.name).read()[-3000:]}")


def login(iqn: str, portal: str) -> None:
    sh(f"iscsiadm -m discovery -t st -p {portal}")
    sh(f"iscsiadm -m node -T {iqn} -p {portal} --login")
