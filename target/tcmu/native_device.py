"""A TCMU device whose ring a native thread runs (_nativering.c).

The thread fetches every entry, answers the READ/WRITEs the routing
decision sends straight to a file store by itself (preadv/pwritev, GIL
released), and hands every other command to this class, which runs it with
the SCSI layer exactly as :class:`TcmuDevice` does and completes it through
the native ring (one owner of the ring state: its lock).

The routing decision is published, not re-made: the LU is direct while this
device holds the LunIO's :class:`~restore_core.direct.DirectLease` and the
SCSI device says its READ/WRITEs need no check beyond their CDB
(``ScsiDevice.direct_refusal``). Both are re-checked after every batch Python runs,
when the LunIO says the lease may have ended (DirectLease.on_change) and
every ``ROUTE_CHECK_S``; when either turns False the native side is told
first (``set_direct(-1)`` returns once no direct command runs) and then the
lease is released, so a state change behind the gate never overlaps a
direct command. What stays Python's: the first command of the nexus (its
power-on unit attention), everything but plain READ/WRITE 10/16, FUA, a
range past the end, a pair's volume (its writes mark before they are
acknowledged), and a COMPARE AND WRITE (direct writes stop before it runs).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from restore_core.direct import DirectLease
from restore_core.stores.file import FileBlockStore
from target.scsi.constants import COMPARE_AND_WRITE
from target.scsi.device import ScsiDevice
from target.scsi.lustats import LATENCY_BUCKETS, READ, WRITE

from .device import TcmuDevice
from .ring import Request, RingError

try:
    from ._nativering import NativeRing
except ImportError:             # not built (a source tree without the install's build)
    NativeRing = None

log = logging.getLogger(__name__)

AVAILABLE = NativeRing is not None
#: How often the published route is re-checked when Python sees no command.
#: The LunIO tells the lease's holder of every change that can end it (the
#: gate closing, a routing change: DirectLease.on_change), so a state change
#: waits one turn of the loop, not for this poll; the SCSI device's own state
#: (a reservation, a unit attention, MODE SELECT) changes only by commands,
#: which reach it through this ring (a volume has one export) and are
#: followed by a check. The poll is the net under both. Each poll wakes the loop: in the TCG
#: guest of tests/bench/vm_fio.sh ~0.9 ms of CPU per check; at 0.01 s that
#: was 87 ms/s per idle LU and 42-56 us per 4K I/O, at 0.1 s the loop took
#: 6-7 us per I/O and our 4K IOPS went 2168 -> 2552 (ours/fileio 0.78 -> 0.89).
ROUTE_CHECK_S = 0.1
#: The native side's counters go into the LU's metrics every this many route
#: checks (0.2 s), not more often: in a TCG guest each fold (two dicts, two
#: bucket lists, two LuStats.add) was the largest part of a 10 ms tick,
#: and the loop's ticks cost more CPU per I/O than the ring thread's own
#: user time. The metrics lag the native I/O by this much at most; closing
#: the device folds the rest.
FOLD_EVERY_CHECKS = 2


class NativeRingView:
    """What TcmuDevice uses of its ring, over the native one."""

    def __init__(self, native: Any, mv: memoryview) -> None:
        self.native = native
        self.mv = mv
        self.read_len = native.read_len
        self.tmr: list = []

    @property
    def out_of_order(self) -> int:
        return self.native.stats()["out_of_order"]

    def complete(self, req: Request, status: int, sense: bytes = b"", *,
                 read_len: int | None = None, unknown_op: bool = False) -> None:
        self.native.complete(req.slot, req.cmd_id, status, bytes(sense),
                             -1 if read_len is None else read_len, unknown_op)


class NativeTcmuDevice(TcmuDevice):
    native: Any = None

    def _serve(self) -> None:
        mv = memoryview(self.buf).cast("B")
        self.native = NativeRing(self.buf, self.fd, self._ooo, RingError, LATENCY_BUCKETS)
        self.ring = NativeRingView(self.native, mv)
        self._mv = mv
        self._lease: DirectLease | None = None
        self._route: str | None = "not checked yet"
        self._writes_seen = 0
        self._checks_to_fold = FOLD_EVERY_CHECKS
        self._route_soon_due = False
        self._loop.add_reader(self.native.handoff_fd, self._on_handoff)
        self._watching = True
        self.native.start()
        self._route_timer = self._loop.call_later(ROUTE_CHECK_S, self._route_tick)

    # -- commands handed over ----------------------------------------------------
    def _on_handoff(self) -> None:
        native = self.native
        if native is None or self._closed:
            return
        items = native.take()
        self._note_native_writes()       # a flush run from here covers them
        if items:
            if any(cdb[:1] == _CAW for _, cdb, _, _, _, _ in items):
                self._revoke()          # no direct write overlaps a COMPARE AND WRITE
            self._run_batch([Request(cmd_id, cdb, iovs, bidi, slot, kflags)
                             for cmd_id, cdb, iovs, bidi, slot, kflags in items])
            self._check_route()
        if native.error is not None:
            self._on_stopped(native)

    def _on_stopped(self, native: Any) -> None:
        """The native thread stopped: the uio device went away or the ring is corrupt."""
        self._revoke()
        self._unwatch()
        if native.gone:
            log.warning("%s: %s; no longer serving", self.name, native.error)
            self.gone = True
        else:
            log.error("%s: ring corrupt (%s); device stops serving", self.name, native.error)
            self.stats["errors"] += 1

    def _note_native_writes(self) -> None:
        n = self.native.writes_done
        if n != self._writes_seen and self._lease is not None:
            store = self._lease.store
            if isinstance(store, FileBlockStore):
                store.note_written(n - self._writes_seen)
        self._writes_seen = n

    # -- the published route -------------------------------------------------------
    def _scsi_device(self) -> ScsiDevice | None:
        """The ScsiDevice behind our LUN: the target itself, or its LunSet's."""
        if isinstance(self.target, ScsiDevice):
            return self.target
        dev = self.target.device(self.lun) if hasattr(self.target, "device") else None
        return dev if isinstance(dev, ScsiDevice) else None

    def _check_route(self) -> None:
        """Publish the LU direct when its LunIO and SCSI device both allow it;
        take it back as soon as either does not."""
        dev = self._scsi_device()
        why = "no ScsiDevice" if dev is None else dev.direct_refusal(self.nexus)
        lease = self._lease
        if lease is not None:
            if why is None and lease.valid():
                return
            self._revoke()
            self._note_route(why or "the LunIO's lease ended")
        if why is not None or self.gone or self._closed:
            self._note_route(why or "device stopped")
            return
        get = getattr(dev.lunio, "direct_lease", None)
        lease = get() if get is not None else None
        if lease is None:
            self._note_route("the LunIO routes I/O through work")
            return
        if not isinstance(lease.store, FileBlockStore) or lease.store.size < dev.num_blocks * dev.block_size:
            lease.release()             # only a file's descriptor serves preadv/pwritev as is
            self._note_route("not a file store")
            return
        self._note_route("direct")
        self._lease = lease
        lease.on_change = self._route_soon
        # a descriptor of our own: the store closing its fd (a volume deleted
        # under a backstore) cannot make ours name another file before the
        # next check takes the route back
        self._direct_fd = os.dup(lease.store.fd)
        self.native.set_direct(self._direct_fd, dev.block_size, dev.num_blocks,
                               dev.limits.max_transfer)

    def _note_route(self, why: str | None) -> None:
        """One debug line per change of route (and why), not per check."""
        if why != self._route:
            self._route = why
            log.debug("%s: READ/WRITE route: %s", self.name, why)
            self.stats["route"] = why

    def _revoke(self) -> None:
        if self._lease is None:
            return
        self.native.set_direct(-1)      # returns once no direct command runs
        os.close(self._direct_fd)
        self._note_native_writes()
        self._lease.release()
        self._lease = None

    def _route_soon(self) -> None:
        """The lease may have ended (told by the LunIO, inside a state
        change): check it on the loop's next turn; the change waits for it
        at the gate."""
        if not self._route_soon_due:
            self._route_soon_due = True
            self._loop.call_soon(self._route_now)

    def _route_now(self) -> None:
        self._route_soon_due = False
        if not self._closed and self.native is not None:
            self._check_route()

    def _route_tick(self) -> None:
        if self._closed or self.native is None:
            return
        self._note_native_writes()
        self._check_route()
        self._checks_to_fold -= 1
        if not self._checks_to_fold:
            self._checks_to_fold = FOLD_EVERY_CHECKS
            self._fold_stats()
        self._route_timer = self._loop.call_later(ROUTE_CHECK_S, self._route_tick)

    def _fold_stats(self) -> None:
        """The native side's per-kind counters into the LU's metrics."""
        reads, writes = self.native.take_counts()
        dev = self._scsi_device()
        if dev is None:
            return
        for kind, k in ((READ, reads), (WRITE, writes)):
            if k["commands"]:
                dev.stats.add(kind, k["commands"], k["bytes"], k["seconds"], k["buckets"])

    # -- lifecycle -----------------------------------------------------------------
    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self.native.handoff_fd)
            self._watching = False

    def _stop_fetching(self) -> None:
        if self.native is None:
            return
        self._route_timer.cancel()
        self._revoke()
        self.native.stop()
        self._unwatch()
        self._fold_stats()
        st = self.native.stats()
        self.stats["native_handed"] = st["handed"]
        self.stats["wakeups"] += st["wakeups"]
        self.stats["notifies"] += st["notifies"]

    def _release_ring(self) -> None:
        self.ring.mv.release()
        self.ring.native = None
        self.native = None              # its buffer export ends with it


_CAW = bytes([COMPARE_AND_WRITE])
