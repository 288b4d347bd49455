"""The thread that starts an RBD image's aio calls, in the order queued.

librbd does its dispatch work (and, with ``rbd_non_blocking_aio=false``,
the send to the OSD) in the calling thread: tens of microseconds of
locking and wake-ups per call on a loaded machine, which on the event
loop's thread serialised with all protocol work. The loop only appends a
request and, when this thread is idle, wakes it once; this thread starts
everything queued by then (ctypes releases the GIL around each call).
Completions do not come back through here: librbd queues them for the
loop's eventfd (restore_core.stores.librbd.Image.poll).

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
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

from .librbd import Image, RbdError

READ, WRITE, DISCARD, FLUSH = range(4)
#: (op, offset, length, buffer address, token)
Request = tuple[int, int, int, int, int]


class Submitter:
    def __init__(self, image: Image, name: str, failed: Callable[[int, int], None]) -> None:
        """``failed(token, errno)``: a call librbd refused at once (on this
        thread; the callee hands it to the loop)."""
        self._image = image
        self._failed = failed
        self._queue: collections.deque[Request | None] = collections.deque()
        self._idle = False
        # a binary semaphore: a C lock is much cheaper to signal than
        # threading.Semaphore (a Condition); a second signal collapses
        self._wake = threading.Lock()
        self._wake.acquire()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name[:15])
        self._thread.start()

    def put(self, req: Request | None) -> None:
        """On the loop: queue one call (None: stop); wakes the thread only
        when it is idle."""
        self._queue.append(req)
        if self._idle:
            self._idle = False
            try:
                self._wake.release()
            except RuntimeError:        # signalled already
                pass

    def stop(self) -> None:
        """Start what is queued, then end the thread."""
        self.put(None)
        self._thread.join()

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
                    if op <= WRITE:
                        starts[op](offset, length, addr, token)
                    elif op == DISCARD:
                        img.aio_discard(offset, length, token)
                    else:
                        img.aio_flush(token)
                except RbdError as e:
                    self._failed(token, e.errno)
            self._idle = True
            if queue:               # raced with a put that saw us busy
                self._idle = False
                continue
            self._wake.acquire()
