"""Where a window's CPU went: the daemon's threads by name, the initiator,
and everything else on the machine (kernel writeback workers, other users).

On a 2-core machine a host at queue depth 32 and the daemon's event loop
each keep a core busy, so any CPU the restore takes elsewhere (copy threads,
writeback, flushes) is taken from them: comparing these per host command,
idle vs busy, says which part of a restore costs the host what.

Linux only (/proc); threads are grouped by their kernel name (``comm``):
the daemon names its pools' threads (restore_core.stores.file), the event
loop is the main thread.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

_TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> list[tuple[int, str, float]]:
    """(tid, kernel name, CPU seconds) of each live thread of ``pid``."""
    out: list[tuple[int, str, float]] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue                            # ended meanwhile
        # "tid (comm) state ...": comm may hold spaces or parentheses
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2:].split()
        out.append((int(tid), comm, (int(fields[11]) + int(fields[12])) / _TICK))  # utime + stime
    return out


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread group of process ``pid``: "loop" for the main
    thread, else the thread's kernel name. Threads that ended are lost
    (the daemon's pools keep theirs)."""
    out: dict[str, float] = {}
    for tid, comm, secs in threads(pid):
        name = "loop" if tid == pid else comm
        out[name] = out.get(name, 0.0) + secs
    return out


def machine_busy() -> float:
    """CPU seconds all cores spent busy (not idle, not waiting for I/O)."""
    with open("/proc/stat", "rb") as f:
        cpu = f.readline().split()[1:]
    ticks = [int(x) for x in cpu[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK          # minus idle, iowait


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class CpuSample:
    daemon: dict[str, float] = field(default_factory=dict)
    initiator: float = 0.0      # this process's waited-for children (qemu-io, qemu-img)
    machine: float = 0.0

    @classmethod
    def take(cls, pid: int) -> "CpuSample":
        return cls(_thread_cpu(pid), _children_cpu(), machine_busy())

    def since(self, before: "CpuSample") -> dict[str, float]:
        """CPU seconds between ``before`` and this sample, by consumer:
        the daemon's thread groups (``daemon:<name>``), ``initiator``, and
        ``other`` (the machine's rest)."""
        out = {f"daemon:{k}": v - before.daemon.get(k, 0.0) for k, v in self.daemon.items()}
        out["initiator"] = self.initiator - before.initiator
        out["other"] = max(0.0, self.machine - before.machine
                           - sum(out.values()))
        return out
