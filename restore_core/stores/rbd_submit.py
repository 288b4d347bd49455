"""The thread that starts an RBD image's aio calls, in the order queued.

librbd does its dispatch work (and, with ``rbd_non_blocking_aio=false``,
the send to the OSD) in the calling thread: tens of microseconds of
locking and wake-ups per call on a loaded machine, which on the event
loop's thread serialised with all protocol work. The loop only appends a
request and, when this thread is idle, wakes it once; this thread starts
everything queued by then (ctypes releases the GIL around each call).
Completions do not come back through this thread: they are queued for
the loop, which watches the image's eventfd.

Still cheaper than the loop starting each call itself with librbd's own
queue doing the dispatch (``rbd_non_blocking_aio=true``, as fio does): 4
KiB random reads through iSCSI at QD32, 12.0-12.5k IOPS with this thread
vs 8.4k without it, same run, load ~5. Measured again with the loop's
librbd calls made holding the GIL (ctypes.PyDLL: no GIL hand-off per
call): 8.8k vs 12.8-15.9k with this thread (2 alternating runs each, load
2-3); librbd's io_context_pool thread then spent 30-37 us per command
instead of 6 and the OSD's messenger woke 0.7 times per command instead
of 0.25: this thread's batches are what keep librbd and the OSD batching.

Waking this thread at the end of the loop's turn (call_soon) instead of
at the first put, so it would not contend for the GIL while the loop
parses a burst of commands: 62.4-76.6k vs 64.1-76.4k commands in 5 s, 3
alternating runs each (load 2.0-2.5): no difference, not taken.

Two implementations of the same thing: the C extension
restore_core.stores._rbdaio (the thread never takes the GIL, and the
loop's poll makes no ctypes call per completion) when it is built, and
PySubmitter (ctypes) otherwise; ``submitter()`` picks one. The C one
takes completions through a librbd callback that queues them and bumps
the eventfd only for the first since the loop last polled; PySubmitter
has librbd queue them for ``rbd_poll_io_events`` and bump the eventfd for
each (Image.notify_completions). Through iSCSI, 4 KiB random reads QD32
(tests.bench.rbd_profile): the loop's CPU per command 22.9-23.9 us with
the callback vs 24.3-25.9 polled, 23.8-25.5k vs 18.4-24.1k IOPS (3 and 2
runs, load 2-3.7, the machine noisy); librbd's own thread about the same
(5.0-6.9 vs 6.0-6.2 us). Both report a call librbd refused at once
through the image's eventfd, with the completions: ``poll()`` returns
both as (token, return value).
"""
from __future__ import annotations

import collections
import errno
import os
import select
import threading
import time
from typing import Protocol

from .librbd import Image, RbdError, native_addresses

try:
    from ._rbdaio import API as NATIVE_API
    from ._rbdaio import Aio as NativeSubmitter
except ImportError:      # not built (no compiler): the ctypes thread does the same
    NativeSubmitter = None
    #: the C API of the native submitter (a capsule): other extensions queue
    #: reads on an image's submitter thread through it (target/iscsi/_nativelane.c)
    NATIVE_API = None

READ, WRITE, DISCARD, FLUSH = range(4)
#: (op, offset, length, buffer address, token)
Request = tuple[int, int, int, int, int]


class Submitter(Protocol):
    """What the RBD store needs from its submitter (both implementations)."""

    @property
    def started(self) -> int:
        """aio calls librbd accepted (final once stopped)"""

    @property
    def taken(self) -> int:
        """completions polled and released"""

    def put(self, op: int, offset: int, length: int, addr: int, token: int) -> None:
        """On the loop: queue one call; wakes the thread only when it sleeps."""

    def stop(self) -> None:
        """Start what is queued, then end the thread."""

    def fence(self) -> None:
        """The image is lost: nothing queued starts any more (each fails
        with ESHUTDOWN) and nothing more is queued."""

    def poll(self) -> list[tuple[int, int]]:
        """On the loop: (token, return value) of every completion and every
        refused start so far; clears the eventfd first."""


def submitter(image: Image, name: str) -> Submitter:
    """The image's submitter: the C one if it is built."""
    if NativeSubmitter is not None:
        return NativeSubmitter(image.handle, image.eventfd, native_addresses())
    image.notify_completions()
    return PySubmitter(image, name)


def drain(sub: Submitter, eventfd: int, timeout: float) -> list[tuple[int, int]]:
    """Wait (blocking, at most ``timeout`` s) until every aio started has
    completed and poll them all: a completion nobody polls is never
    released, and once the image is closed nobody can. Call once the
    submitter is stopped; returns what poll would."""
    out = sub.poll()
    waiter = select.poll()
    waiter.register(eventfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while sub.taken < sub.started:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        waiter.poll(left * 1000)
        out += sub.poll()
    return out


class PySubmitter:
    def __init__(self, image: Image, name: str) -> None:
        self._image = image
        self._queue: collections.deque[Request | None] = collections.deque()
        self._failed: collections.deque[tuple[int, int]] = collections.deque()
        self._idle = False
        self._fenced = False
        # a binary semaphore: a C lock is much cheaper to signal than
        # threading.Semaphore (a Condition); a second signal collapses
        self._wake = threading.Lock()
        self._wake.acquire()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name[:15])
        self._thread.start()

    @property
    def started(self) -> int:
        return self._image.started

    @property
    def taken(self) -> int:
        return self._image.taken

    def put(self, op: int, offset: int, length: int, addr: int, token: int) -> None:
        if self._fenced:
            raise RuntimeError("submitter fenced")      # as the C one refuses it
        self._put((op, offset, length, addr, token))

    def _put(self, req: Request | None) -> None:
        self._queue.append(req)
        if self._idle:
            self._idle = False
            try:
                self._wake.release()
            except RuntimeError:        # signalled already
                pass

    def stop(self) -> None:
        self._put(None)
        self._thread.join()

    def fence(self) -> None:
        self._fenced = True

    def poll(self) -> list[tuple[int, int]]:
        out = self._image.poll()
        failed = self._failed
        while failed:
            out.append(failed.popleft())
        return out

    def _run(self) -> None:
        img, queue = self._image, self._queue
        starts = (img.aio_read, img.aio_write)
        while True:
            while queue:
                req = queue.popleft()
                if req is None:
                    return
                op, offset, length, addr, token = req
                try:
                    if self._fenced:
                        raise RbdError(errno.ESHUTDOWN, "fenced")
                    if op <= WRITE:
                        starts[op](offset, length, addr, token)
                    elif op == DISCARD:
                        img.aio_discard(offset, length, token)
                    else:
                        img.aio_flush(token)
                except RbdError as e:
                    self._failed.append((token, -e.errno))
                    os.eventfd_write(img.eventfd, 1)
            self._idle = True
            if queue:               # raced with a put that saw us busy
                self._idle = False
                continue
            self._wake.acquire()
