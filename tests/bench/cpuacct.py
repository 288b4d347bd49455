"""Where a window's CPU went: the daemon's threads by name, the initiator,
the kernel's own work (its worker threads, interrupts), and everything else
on the machine (other users).

On a 2-core machine a host at queue depth 32 and the daemon's event loop
each keep a core busy, so any CPU the restore takes elsewhere (copy threads,
writeback, flushes) is taken from them: comparing these per host command,
idle vs busy, says which part of a restore costs the host what.

Linux only (/proc); threads are grouped by their kernel name (``comm``):
the daemon names its pools' threads (restore_core.stores.file), the event
loop is the main thread. The kernel's work a restore causes beside its copy
threads -- writeback and I/O completion -- runs in kernel worker threads
(``kworker``: writeback, the file system's end-of-I/O work; ``ksoftirqd``)
and in interrupt context on whatever CPU it lands (``irq``: the hard and
soft interrupt time of /proc/stat; without the kernel's IRQ time
accounting it may also count in the thread it interrupted), taken from the
hosts and the loop alike.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

_TICK = os.sysconf("SC_CLK_TCK")
_PF_KTHREAD = 0x00200000
# kernel threads counted by kind (the name up to its first "/" or ":");
# the rest of the kernel's threads count as "kernel"
KERNEL_KINDS = ("kworker", "ksoftirqd")


def _stat_fields(stat: bytes) -> tuple[str, list[bytes]]:
    """(comm, the fields after it) of a /proc/.../stat line: comm may hold
    spaces or parentheses."""
    comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
    return comm, stat[stat.rindex(b")") + 2:].split()


def thread_stats(pid: int) -> list[tuple[int, str, list[bytes]]]:
    """(tid, kernel name, the stat fields after it) of each live thread of
    ``pid``; fields[0] is the thread's state."""
    out: list[tuple[int, str, list[bytes]]] = []
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
        out.append((int(tid), *_stat_fields(stat)))
    return out


def threads(pid: int) -> list[tuple[int, str, float]]:
    """(tid, kernel name, CPU seconds) of each live thread of ``pid``."""
    return [(tid, comm, (int(fields[11]) + int(fields[12])) / _TICK)     # utime + stime
            for tid, comm, fields in thread_stats(pid)]


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread group of process ``pid``: "loop" for the main
    thread, else the thread's kernel name. Threads that ended are lost
    (the daemon's pools keep theirs)."""
    out: dict[str, float] = {}
    for tid, comm, secs in threads(pid):
        name = "loop" if tid == pid else comm
        out[name] = out.get(name, 0.0) + secs
    return out


def kernel_threads() -> dict[int, tuple[str, float]]:
    """Each live kernel thread: pid -> (kind, CPU seconds so far); the kind
    is one of KERNEL_KINDS, else "kernel"."""
    out: dict[int, tuple[str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                comm, fields = _stat_fields(f.read())
        except (OSError, ValueError):
            continue                            # ended meanwhile
        if not int(fields[6]) & _PF_KTHREAD:
            continue
        kind = comm.split("/")[0].split(":")[0]
        out[int(pid)] = (kind if kind in KERNEL_KINDS else "kernel",
                         (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def _cpu_ticks() -> list[int]:
    """All cores' time so far, in ticks: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat", "rb") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def machine_busy() -> float:
    """CPU seconds all cores spent busy (not idle, not waiting for I/O)."""
    ticks = _cpu_ticks()
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK          # minus idle, iowait


def irq_time() -> float:
    """CPU seconds all cores spent in interrupt context (hard and soft)."""
    ticks = _cpu_ticks()
    return (ticks[5] + ticks[6]) / _TICK


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class CpuSample:
    daemon: dict[str, float] = field(default_factory=dict)
    initiator: float = 0.0      # this process's waited-for children (qemu-io, qemu-img)
    kernel: dict[int, tuple[str, float]] = field(default_factory=dict)   # kernel_threads()
    machine: float = 0.0
    irq: float = 0.0

    @classmethod
    def take(cls, pid: int) -> "CpuSample":
        return cls(_thread_cpu(pid), _children_cpu(), kernel_threads(), machine_busy(), irq_time())

    def since(self, before: "CpuSample") -> dict[str, float]:
        """CPU seconds between ``before`` and this sample, by consumer:
        the daemon's thread groups (``daemon:<name>``), ``initiator``, the
        kernel's threads by kind (``kernel:<kind>``), ``irq`` (interrupt
        context, wherever it ran), and ``other`` (the machine's rest)."""
        out = {f"daemon:{k}": v - before.daemon.get(k, 0.0) for k, v in self.daemon.items()}
        out["initiator"] = self.initiator - before.initiator
        for pid, (kind, secs) in self.kernel.items():   # a thread that ended meanwhile is lost
            key = f"kernel:{kind}"
            out[key] = out.get(key, 0.0) + secs - before.kernel.get(pid, (kind, 0.0))[1]
        out["irq"] = self.irq - before.irq
        out["other"] = max(0.0, self.machine - before.machine
                           - sum(out.values()))
        return out
