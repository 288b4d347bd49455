"""Where an RBD LU's per-command time goes: CPU microseconds and context
switches per command, by process and thread, for the same workload three
ways in one run against a throw-away single-node Ceph cluster:

  fio-rbd   fio's rbd engine straight against the image (librbd + OSD only)
  lu-rbd    iscsi-perf / qemu-img bench through iSCSI on an RBD-backed LU
  lu-file   the same tool on a file-backed LU of the same daemon

    python -m tests.bench.rbd_profile   (SECS, SIZE_MB, WORKLOAD=4k|4kw|1m env knobs:
                                         4 KiB random reads, 4 KiB or 1 MiB
                                         sequential writes, 32 in flight;
                                         PERF=FILE: perf record the daemon on lu-rbd,
                                         PERF_CG=dwarf for stacks through libpython;
                                         ATTACH="CMD ... {pid}": run CMD on the
                                         daemon instead, e.g. py-spy record or
                                         perf stat -e 'syscalls:sys_enter_*')

Per side it prints the commands per second, then for each consumer (the
daemon's threads by kernel name, the OSD, the mon/mgr, the tool, the rest
of the machine) the CPU microseconds per command and the voluntary /
involuntary context switches per command; the last line is one JSON
object of the same. What the RBD LU costs beyond its parts is
lu-rbd - (fio-rbd + lu-file - the tool's own share of each).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import rbd  # noqa: E402

from restore_core.stores.rbd import FEATURES  # noqa: E402
from restore_core.stores.spec import RbdSpec  # noqa: E402
from tests.bench.cpuacct import machine_busy, threads  # noqa: E402
from tests.bench.rbd import SCRIPT, BenchError, _Tmp, fill_image, log, start_cluster  # noqa: E402
from tests.ceph.util import other_client  # noqa: E402
from tests.support import IQN, Daemon  # noqa: E402

MiB = 1 << 20
SECS = int(os.environ.get("SECS", "5"))
SIZE = int(os.environ.get("SIZE_MB", "256")) * MiB
WORKLOAD = os.environ.get("WORKLOAD", "4k")
#: the tool's I/O size of each write workload
WRITE_SIZE = {"4kw": 4096, "1m": MiB}
#: voluntary, then involuntary (their order in /proc/PID/task/TID/status)
_SWITCHES = re.compile(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", re.M)


def _threads(pid: int, group: str) -> dict[str, list[float]]:
    """{group:thread-name: [cpu s, voluntary cs, involuntary cs]} of a process."""
    out: dict[str, list[float]] = {}
    for tid, comm, cpu in threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue
        switches = [int(m.group(1)) for m in _SWITCHES.finditer(status)]
        name = "main" if tid == pid else re.sub(r"\d+$", "#", comm)
        acc = out.setdefault(f"{group}:{name}", [0.0, 0, 0])
        acc[0] += cpu
        acc[1] += switches[0]
        acc[2] += switches[1]
    return out


def _sample(pids: dict[str, int]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for group, pid in pids.items():
        out.update(_threads(pid, group))
    out["machine"] = [machine_busy(), 0, 0]
    return out


def _run_tool(args: list[str], env: dict[str, str] | None, pids: dict[str, int]
              ) -> tuple[str, dict[str, list[float]]]:
    """Run a tool, sampling its threads just before it exits (it is polled)."""
    before = _sample(pids)
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    last: dict[str, list[float]] = {}
    while p.poll() is None:
        last = _threads(p.pid, "tool") or last
        time.sleep(0.1)
    out = p.stdout.read() if p.stdout else ""
    after = _sample(pids)
    delta = {k: [v[i] - before.get(k, [0, 0, 0])[i] for i in range(3)] for k, v in after.items()}
    delta.update(last)
    if p.returncode != 0:
        raise BenchError(f"{args[0]}: {out[-800:]}")
    return out, delta


def _report(side: str, cmds: float, delta: dict[str, list[float]]) -> dict[str, Any]:
    """Per command: CPU us and context switches, by consumer."""
    per: dict[str, Any] = {}
    counted = 0.0
    for k, (cpu, vol, inv) in sorted(delta.items()):
        if k == "machine":
            continue
        counted += cpu
        if cpu < 0.005 and vol + inv < cmds * 0.01:
            continue
        per[k] = [round(cpu / cmds * 1e6, 1), round(vol / cmds, 2), round(inv / cmds, 2)]
    per["other"] = [round(max(0.0, delta["machine"][0] - counted) / cmds * 1e6, 1), 0, 0]
    per["total_us"] = round(delta["machine"][0] / cmds * 1e6, 1)
    log(f"{side}: {cmds:.0f} commands")
    for k, v in per.items():
        log(f"  {k:28s} {v}")
    return per


def main() -> int:
    base = tempfile.mkdtemp(prefix="lr-rbd-prof-")
    cdir = os.path.join(base, "ceph")
    d = None
    result: dict[str, Any] = {"workload": WORKLOAD, "load_1min": [round(os.getloadavg()[0], 2)]}
    try:
        conf = start_cluster(cdir)
        lu = RbdSpec("rbd", "prof-lu", conf)
        with other_client(lu) as io:
            rbd.RBD().create(io, lu.image, SIZE, old_format=False, features=FEATURES)
        fill_image(lu)
        ceph = {n: int(open(os.path.join(cdir, "pids", n)).read())
                for n in os.listdir(os.path.join(cdir, "pids"))}
        fio_args = [f"--runtime={SECS}", "--time_based", f"--size={SIZE}"]
        fio_args += (["--rw=randread", "--bs=4k"] if WORKLOAD == "4k"
                     else ["--rw=write", f"--bs={WRITE_SIZE[WORKLOAD]}"])      # bytes
        out, delta = _run_tool(
            ["fio", "--name=rbd", "--ioengine=rbd", f"--clientname={lu.client_id}",
             f"--pool={lu.pool}", f"--rbdname={lu.image}", "--iodepth=32",
             "--output-format=json", *fio_args], {**os.environ, "CEPH_CONF": conf}, ceph)
        job = json.loads(out[out.index("{"):])["jobs"][0]
        side = job["read" if WORKLOAD == "4k" else "write"]
        result["fio-rbd"] = _report("fio-rbd", side["total_ios"], delta)
        result["fio-rbd"]["per_s"] = round(side["iops"])

        # LANE=1: then the same two sides again on a daemon with the native
        # iSCSI READ lane on (the spike of docs/native-lane.md)
        for lane in ("", "1") if os.environ.get("LANE") == "1" else ("",):
            d = _lu_sides(base, lane, conf, lu, ceph, result)
            d.stop()
            d = None
    finally:
        if d is not None and d.proc and d.proc.poll() is None:
            d.stop()
        subprocess.run([SCRIPT, "stop", cdir], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
    result["load_1min"].append(round(os.getloadavg()[0], 2))
    print(json.dumps(result))
    return 0


def _lu_sides(base: str, lane: str, conf: str, lu: RbdSpec, ceph: dict[str, int],
              result: dict[str, Any]) -> Daemon:
    """lu-rbd and lu-file (``lane``: with the native lane on, named so)
    on a daemon of their own; returns it, still running."""
    home = os.path.join(base, "lane" if lane else "plain")
    os.makedirs(home)
    os.environ["LIVERESTORE_ISCSI_LANE"] = lane or "0"      # the lane is on by default
    try:
        d = Daemon(_Tmp(home)).start()
    finally:
        os.environ.pop("LIVERESTORE_ISCSI_LANE")
    try:
        d.cli("volume", "create", "flu", "--path", os.path.join(home, "flu.img"), "--size",
              str(SIZE))
        d.cli("volume", "create", "lu", "--rbd", lu.image_name, "--ceph-conf", conf)
        d.cli("export", "create", IQN, "--lun", "0=lu", "--lun", "1=flu")
        assert d.proc is not None
        pids = {**ceph, "daemon": d.proc.pid}
        for name, lun in (("lu-rbd", 0), ("lu-file", 1)):
            name += "+lane" if lane else ""
            url = f"{d.url}/{lun}"
            prof = None
            if os.environ.get("PERF") and lun == 0:     # perf record the daemon's RBD side
                prof = subprocess.Popen(["perf", "record", "-q", "-F", "2000", "--call-graph",
                                         os.environ.get("PERF_CG", "fp"), "-p", str(d.proc.pid),
                                         "-o", os.environ["PERF"]],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            elif os.environ.get("ATTACH") and lun == 0:  # any other profiler, stopped by SIGINT
                prof = subprocess.Popen(shlex.split(os.environ["ATTACH"].format(pid=d.proc.pid)),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            if WORKLOAD == "4k":
                out, delta = _run_tool(["iscsi-perf", "-m", "32", "-b", "8", "-t", str(SECS),
                                        "-r", url], None, pids)
                text = out.replace("\r", "\n")
                iops = float(re.findall(r"average\s+(\d+)", text)[-1])
                cmds = iops * SECS
            else:
                bs = WRITE_SIZE[WORKLOAD]
                n = max(SIZE // bs, result["fio-rbd"]["per_s"] * SECS)    # as long as fio ran
                out, delta = _run_tool(["qemu-img", "bench", "-f", "raw", "-t", "none", "-w",
                                        "-c", str(n), "-d", "32", "-s", str(bs), "-S", str(bs),
                                        "--pattern=0x5a", url], None, pids)
                secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
                cmds, iops = n, n / secs
            if prof is not None:
                prof.send_signal(2)
                prof.wait(timeout=60)
            result[name] = _report(name, cmds, delta)
            result[name]["per_s"] = round(iops)
    except BaseException:
        d.stop()
        raise
    return d


if __name__ == "__main__":
    sys.exit(main())
