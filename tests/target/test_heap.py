"""target/heap.py: big buffers freed in a burst are kept warm, up to a
bound, instead of coming back as fresh pages (a page fault per 4 KiB).
Run in child processes: the policy is process-wide."""
from __future__ import annotations

import asyncio
import subprocess
import sys

from target import heap
from target.heap import TRIM_THRESHOLD
from tests.support import ROOT

# the pattern of librbd's write copies under a queue of 1 MiB writes that
# drains: N MiB allocated and written, then all of it freed; the page
# faults per MiB of one more such burst, and the RSS (MiB) left after it
CHILD = r"""
import ctypes, resource, sys
from target.heap import give_back, keep_warm_heap
applied = keep_warm_heap() if sys.argv[1] == "1" else False
trim = sys.argv[3] == "1"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
n = int(sys.argv[2])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
pins = []
def burst():
    ps = [libc.malloc(1 << 20) for _ in range(n)]
    for p in ps:
        libc.memset(p, 0x5a, 1 << 20)
    # a small block that outlives the burst, above it in the heap (as the
    # daemon's objects made while writes are in flight): the freed burst
    # is not at the heap's top, so no threshold alone gives it back
    pins.append(libc.malloc(64))
    for p in ps:
        libc.free(p)
burst()
if trim:
    give_back()
base = rss()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (20 * n)
print(applied, faults, base)
"""


def burst(policy: bool, mib: int, trim: bool = False) -> tuple[bool, float, int]:
    """(policy applied, page faults per MiB of a burst after the first,
    MiB resident after the first burst and, with trim, give_back())."""
    r = subprocess.run([sys.executable, "-c", CHILD, "1" if policy else "0", str(mib),
                        "1" if trim else "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    applied, faults, rss = r.stdout.split()
    return applied == "True", float(faults), int(rss)


def test_a_burst_of_1m_buffers_is_reused_warm_not_faulted_in_again():
    applied, faults, _ = burst(True, 16)
    assert applied
    assert faults < 1, f"{faults:.0f} page faults per MiB reused"
    # the scenario is one glibc's defaults get wrong: each burst comes
    # back as fresh pages (256 faults per MiB)
    assert burst(False, 16)[1] > 128


def test_what_the_heap_keeps_warm_goes_back_at_the_trim():
    big = 2 * (TRIM_THRESHOLD >> 20)
    # between trims the freed burst is kept (the RSS holds it), even one
    # bigger than the trim threshold, since it does not lie at the top...
    _, _, small = burst(True, 1, trim=True)
    assert burst(True, big)[2] >= big
    # ...and give_back(), the daemon's periodic trim, returns it all
    _, _, rss = burst(True, big, trim=True)
    assert rss < small + 16, f"{rss} MiB resident after freeing {big} MiB and trimming"


# a daemon started in a child: the names of its tasks once it is ready
SERVE = r"""
import asyncio, os, signal, sys
from target.daemon import serve
def ready(service):
    print(sorted(t.get_name() for t in asyncio.all_tasks()))
    os.kill(os.getpid(), signal.SIGTERM)
asyncio.run(serve(sys.argv[1], sys.argv[1] + "/ctl.sock", init=True,
                  portals=[("127.0.0.1", 0)], ready=ready))
"""


def daemon_tasks(tmp_path, tuning: str) -> str:
    r = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "LIVERESTORE_MALLOC_TUNING": tuning})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_daemon_trims_the_heap_periodically(tmp_path):
    # the bound holds only if serve() runs the trim, and only with the
    # policy: LIVERESTORE_MALLOC_TUNING=0 leaves glibc alone altogether
    assert "'heap-trim'" in daemon_tasks(tmp_path / "a", "1")
    assert "'heap-trim'" not in daemon_tasks(tmp_path / "b", "0")


def test_the_policy_can_be_turned_off_from_the_environment():
    r = subprocess.run([sys.executable, "-c",
                        "from target.heap import keep_warm_heap; print(keep_warm_heap())"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LIVERESTORE_MALLOC_TUNING": "0"})
    assert r.stdout.strip() == "False", r.stderr


def test_the_periodic_trim_gives_back_until_cancelled(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "give_back", lambda: calls.append(1))

    async def run() -> None:
        t = asyncio.create_task(heap.give_back_every(0.01))
        await asyncio.sleep(0.2)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        n = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) == n      # cancelled: no more trims
    asyncio.run(run())
    assert len(calls) >= 3
