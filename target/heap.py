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

The cost is bounded in time, not by where the free memory happens to
lie: glibc gives a heap's memory back only from its top (and a thread's
heap never, below 64 MiB free), so a burst freed under one small live
block stays resident whatever the thresholds say. give_back() is
malloc_trim(0), which also returns the free pages inside the heaps; the
daemon calls it every TRIM_EVERY seconds, off the event loop (it takes
some 4 ms), so a burst's memory is back with the kernel within that
time, and a busy daemon re-faults at most what it has in flight once per
period (32 MiB at 32 x 1 MiB in flight: some 25 ms of one core per 10 s,
measured, against the ~0.6 s of faults per 10 s the policy saves at
1 GiB/s). Only blocks up to MMAP_THRESHOLD come from the heaps at all
(bigger ones are mapped and unmapped as before)."""
from __future__ import annotations

import asyncio
import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1           # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20        # the largest block served from a heap
TRIM_THRESHOLD = 64 << 20       # free memory at the main heap's top kept between trims
TRIM_EVERY = 10.0               # seconds between give_back() calls in the daemon


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None             # not glibc: its own policy stands
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc


def keep_warm_heap() -> bool:
    """Apply the policy (a no-op off glibc, or with
    LIVERESTORE_MALLOC_TUNING=0); True if applied."""
    if os.environ.get("LIVERESTORE_MALLOC_TUNING", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; setting either one also stops glibc's
    # dynamic adjustment of both, which is what we want
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def give_back() -> None:
    """Return every whole free page of every heap to the kernel."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


async def give_back_every(seconds: float = TRIM_EVERY) -> None:
    """The daemon's bound on what keep_warm_heap() keeps: a task that
    runs until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        # the GIL is released in the call: the loop goes on serving
        await asyncio.to_thread(give_back)
