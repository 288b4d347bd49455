"""target/heap.py: big buffers freed in a burst are kept warm, up to a
bound, instead of coming back as fresh pages (a page fault per 4 KiB).
Run in child processes: the policy is process-wide."""
from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

# the pattern of librbd's write copies under a queue of 1 MiB writes that
# drains: N MiB allocated and written, then all of it freed; the page
# faults per MiB of one more such burst, and the RSS (MiB) left after it
CHILD = r"""
import ctypes, resource, sys
from target.heap import keep_warm_heap
applied = keep_warm_heap() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
n = int(sys.argv[2])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def burst():
    ps = [libc.malloc(1 << 20) for _ in range(n)]
    for p in ps:
        libc.memset(p, 0x5a, 1 << 20)
    for p in ps:
        libc.free(p)
burst()
base = rss()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (20 * n)
print(applied, faults, base)
"""


def burst(policy: bool, mib: int) -> tuple[bool, float, int]:
    r = subprocess.run([sys.executable, "-c", CHILD, "1" if policy else "0", str(mib)],
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


def test_what_the_heap_keeps_warm_is_bounded():
    from target.heap import TRIM_THRESHOLD
    bound = TRIM_THRESHOLD >> 20
    # within the bound: kept (the RSS holds the freed burst)...
    assert burst(True, bound // 2)[2] >= bound // 2
    # ...beyond it: given back, down to little more than the interpreter
    _, _, small = burst(True, 1)
    _, _, rss = burst(True, 2 * bound)
    assert rss < small + 16, f"{rss} MiB resident after freeing {2 * bound} MiB"


def test_the_policy_can_be_turned_off_from_the_environment():
    r = subprocess.run([sys.executable, "-c",
                        "from target.heap import keep_warm_heap; print(keep_warm_heap())"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LIVERESTORE_MALLOC_TUNING": "0"})
    assert r.stdout.strip() == "False", r.stderr
