"""Guest side of tests/bench/vm_fio.sh: only the fio comparison of the VM
tier (our daemon's LU through LIO + TCMU vs tcmu-runner's qcow handler vs
LIO fileio), on a fresh daemon; with LR_PYSPY=1 our daemon is profiled
during its 4K run (RUN/pyspy-4k.txt). Last line: the summary JSON."""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest_restore as g  # noqa: E402  (shares RUN = argv[1] and the helpers)


def clock_cost() -> str:
    """The guest's clocksource and what one clock read costs in Python: a
    TCG guest without a usable TSC reads HPET/ACPI PM through a syscall and
    an emulated device, and the daemon reads the clock per command."""
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            source = f.read().strip()
    except OSError:
        source = "?"
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        time.monotonic()
    per = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    per -= (time.perf_counter() - t0) / n
    return f"clocksource {source}, time.monotonic() {per * 1e6:.2f} us"


def idle_cpu(pid: int, secs: float = 3.0) -> str:
    """What the daemon's threads spend with no I/O at all (its timers: the
    native devices' route checks), in ms of CPU per second."""
    t0 = g.thread_times(pid)
    time.sleep(secs)
    busy = [(name, (u - t0.get(tid, (name, 0.0, 0.0))[1]) / secs * 1e3,
             (s - t0.get(tid, (name, 0.0, 0.0))[2]) / secs * 1e3)
            for tid, (name, u, s) in g.thread_times(pid).items()]
    return ", ".join(f"{name} {u:.1f}+{s:.1f} ms/s" for name, u, s in busy if u + s > 0) or "nothing"


def main() -> int:
    g.log(f"kernel {os.uname().release}; repo {g.REPO}; {clock_cost()}")
    os.makedirs("/etc/target", exist_ok=True)
    g.sh("iscsid || true", check=False)
    d = g.start_daemon(1, init=True, verbose=False)
    try:
        g.lr("volume", "create", "spare", "--size", str(g.SPARE))
        g.lr("export", "create", g.IQN_SPARE, "--lun", "0=spare")
        runner = g.start_peers()
        g.log(f"daemon idle: {idle_cpu(d.pid)}")
        try:
            summary = g.fio_compare(d.pid, runner.pid)
        finally:
            g.stop_peers(runner)
    finally:
        d.terminate()
        d.wait(timeout=30)
    print(json.dumps(summary), flush=True)
    return 1 if g.failures else 0


if __name__ == "__main__":
    sys.exit(main())
