"""The daemon's malloc policy: keep a warm heap for big, short-lived
buffers instead of giving them back to the kernel after every command.

Why: librbd copies each write into a fresh buffer (1 MiB for a 1 MiB
write) on our submitter thread and frees it on one of its own threads.
glibc's defaults hand such a buffer back to the kernel soon after it is
freed (its trim threshold follows its mmap threshold, about twice the
biggest freed block), so the next write's copy page-faults its way
through fresh, zeroed pages. Measured under 1 MiB writes at 32 in
flight to an RBD LU (tests.bench.rbd_profile WORKLOAD=1m, perf): page
faults and their memcg/clear-page work were about a quarter of the
submitter thread's samples; with this policy they are gone (0.6%) and
the thread's samples per write fell 25%, about 60 us of CPU per MiB,
some 3% of everything the machine spends on such a write.

The cost is bounded: a heap keeps at most TRIM_THRESHOLD bytes free at
its top, and only blocks up to MMAP_THRESHOLD come from the heaps at all
(bigger ones are mapped and unmapped as before)."""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1           # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20        # the largest block served from a heap
TRIM_THRESHOLD = 64 << 20       # the most free memory one heap keeps


def keep_warm_heap() -> bool:
    """Apply the policy (a no-op off glibc, or with
    LIVERESTORE_MALLOC_TUNING=0); True if applied."""
    if os.environ.get("LIVERESTORE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False            # not glibc: its own policy stands
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; setting either one also stops glibc's
    # dynamic adjustment of both, which is what we want
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
