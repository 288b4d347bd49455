"""The published route of a session's native lane: plain READs, and plain
WRITEs to RBD LUs, their R2Ts and Data-Out included (target/iscsi/_nativelane.c;
design and numbers in docs/native-lane.md).

The route is published, not re-made per command, as the TCMU native ring
does (target/tcmu/native_device.py): a LUN is direct for this session while
its ScsiDevice says this nexus's plain READ/WRITEs need no check beyond
their CDB (``direct_refusal``) and the session holds the LunIO's
:class:`~restore_core.direct.DirectLease` on a file store or an unfenced
RBD store. Unlike a TCMU device, an iSCSI LU has several nexuses: a command
of any session of the target that is not a plain READ/WRITE may change what
every session may do (a reservation, a unit attention, MODE SELECT), so its
delivery takes every session's lane back (``hold``) and its end re-checks
them; state changes that are not commands revoke through the device's
``watch_route`` and the lease's ``on_change``, synchronously. A file read
finishes inside the scan; an RBD read is in flight across loop turns, so
taking its LUN back keeps the lease until the last one completes, and task
management and close wait for them (``drained``). A lane write in flight
is a SIMPLE command in flight: an ORDERED command (SAM orders it after
every earlier one) and a COMPARE AND WRITE (atomic against every write)
run only once the target's lane writes have ended (``writes_end``,
Session.lane_writes_end); other commands may overlap one, as they may a
SIMPLE write on Python's path. A write still collecting its data is not
in flight: taking its LUN back hands it to Python's path as a task where it
stands (``_adopt``), so task management, logout and ordering find it
among the session's tasks.
"""
from __future__ import annotations

import logging
import os
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import asyncio

from restore_core.direct import DirectLease
from restore_core.stores.file import FileBlockStore
from restore_core.stores.rbd import RbdStore
from restore_core.stores.rbd_submit import NATIVE_API
from target.scsi.device import ScsiDevice
from target.scsi.lustats import LATENCY_BUCKETS, READ, WRITE

from . import pdu as P
from .buffers import DIRECT_MIN, EAGER_WRITE
from .task import R2TState, Task

try:
    from ._nativelane import Lane
except ImportError:             # not built
    Lane = None

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger(__name__)

#: On by default: without it an RBD LU's 4K reads reach 0.44-0.59 of fio's
#: rbd engine, with it 0.72-0.78 (docs/native-lane.md). LIVERESTORE_ISCSI_LANE=0
#: in the daemon's environment turns it off (an escape hatch: every command
#: then takes Python's path, which the lane leaves byte-for-byte as it was).
ENABLED = Lane is not None and os.environ.get("LIVERESTORE_ISCSI_LANE", "1") != "0"
#: The poll is a net, not the mechanism: every state change that can end a
#: LUN's route revokes it synchronously -- commands of this target's
#: sessions hold every lane while they run (HOLDS), the LunIO calls the
#: lease's on_change, the ScsiDevice calls watch_route's callback (a UA
#: queued, a reservation or mode page changed, capacity, the LUN removed).
#: What the poll still does is publish again a LUN whose refusal ended
#: without a call (a unit attention reported by a plain READ, a pair
#: deleted, a gate reopened): late, that costs speed, never a wrong answer.
ROUTE_CHECK_S = 0.1
#: opcodes that cannot change any nexus's route (the lane answers the reads)
PLAIN_IO = frozenset((0x28, 0x2A, 0x88, 0x8A))
MAX_LANE_LUN = 255
#: The lane's per-LUN counters go into the LUs' metrics (LuStats: IOPS,
#: bytes, latency) this often, as the TCMU native ring's do
#: (native_device.FOLD_EVERY_CHECKS): scrapes lag the lane by this much at
#: most, and closing the session folds the rest. Its own timer, not the
#: route poll's: the fold must not depend on the route's safety net.
FOLD_S = 0.2
#: id(target config) -> commands of its sessions that may change a route,
#: running now: while any runs, no lane of the target answers
HOLDS: dict[int, int] = {}
#: RBD reads in flight hold their memory's worth of the session's budget;
#: the lane takes it in blocks of this (one Python call per ~250 4 KiB
#: reads) and gives back what it holds idle beyond two blocks
CREDIT_BLOCK = 1 << 20
#: take_counts' kinds, in the C lane's order
LANE_KINDS = (READ, WRITE)


class SessionLane:
    def __init__(self, session: "Session") -> None:
        self.session = session
        self.native = Lane()
        self._leases: dict[int, tuple[DirectLease, int]] = {}
        self._scsi_target: Any = None
        self._closed = False
        self._draining: dict[int, DirectLease] = {}   # revoked LUN -> its lease, reads in flight
        self._unwatch: dict[int, Callable[[], None]] = {}     # published LUN -> stop its device's calls
        self._check_due = False
        self._idle: list[asyncio.Future] = []
        loop = session.conn.loop
        self._rbd = NATIVE_API is not None
        if self._rbd:
            self.native.set_rbd(NATIVE_API, _credit_taker(self))
        prm = session.params
        max_cmd = session.server.max_cmd_data
        # immediate data as the session allows it; writes that need R2Ts
        # only with one burst outstanding at a time (MaxOutstandingR2T 1,
        # what open-iscsi and libiscsi negotiate): the lane solicits one,
        # so its R2Ts are the ones Python's path would send
        self.native.set_write_params(
            min(prm.first_burst_length, prm.target_mrdsl) if prm.immediate_data else 0, max_cmd,
            min(max_cmd, EAGER_WRITE) if prm.max_outstanding_r2t == 1 else 0,
            prm.max_burst_length, DIRECT_MIN)
        self._writes_idle: list[asyncio.Future] = []
        self._fd = self.native.fileno()
        loop.add_reader(self._fd, self._complete)
        self.native.set_buckets(LATENCY_BUCKETS)
        self._fold_timer = loop.call_later(FOLD_S, self._fold_tick)
        self._timer = loop.call_later(ROUTE_CHECK_S, self._poll)

    # -- the route --------------------------------------------------------------
    def _devices(self) -> dict[int, ScsiDevice]:
        st = self.session.target.scsi_target if self.session.target is not None else None
        if isinstance(st, ScsiDevice):
            return {0: st}
        luns = getattr(st, "luns", None)
        if luns is None or not hasattr(st, "device"):
            return {}
        out = {}
        for lun in luns():
            dev = st.device(lun)
            if isinstance(dev, ScsiDevice) and lun <= MAX_LANE_LUN:
                out[lun] = dev
        return out

    def check(self) -> None:
        """Publish each LUN this nexus may read directly; take back the
        others."""
        s = self.session
        if self._closed or s.closed or s.logging_out or HOLDS.get(id(s.target)):
            self.revoke_all()
            return
        st = s.target.scsi_target if s.target is not None else None
        if st is not self._scsi_target:
            self.revoke_all()
            self._scsi_target = st
        devices = self._devices()
        for lun in list(self._leases):
            dev = devices.get(lun)
            lease = self._leases[lun][0]
            if dev is None or not lease.valid() or dev.direct_refusal(s.nexus) is not None:
                self._revoke(lun)
        for lun, dev in devices.items():
            if lun in self._leases or dev.direct_refusal(s.nexus) is not None:
                continue
            get = getattr(dev.lunio, "direct_lease", None)
            lease = get() if get is not None else None
            if lease is None:
                continue
            store = lease.store
            aio = _rbd_submitter(store) if self._rbd and lun not in self._draining else 0
            if ((not isinstance(store, FileBlockStore) and not aio)
                    or store.size < dev.num_blocks * dev.block_size):
                lease.release()
                continue
            fd = -1 if aio else os.dup(store.fd)
            self._leases[lun] = (lease, fd)
            lease.on_change = self.check
            self._unwatch[lun] = dev.watch_route(partial(self._device_changed, lun))
            self.native.set_lun(lun, fd, dev.block_size, dev.num_blocks, dev.limits.max_transfer,
                                aio)

    def _revoke(self, lun: int) -> None:
        lease, fd = self._leases.pop(lun)
        self.native.set_lun(lun, -1)
        self._unwatch.pop(lun)()
        if fd >= 0:
            os.close(fd)
        if self.native.lun_counts(lun)[2]:
            self._draining[lun] = lease     # its gate stays entered until they end
        else:
            lease.release()
        if not self._closed:
            # writes still collecting their data continue on Python's path,
            # which checks the LU's state when they execute
            for write in self.native.demote(lun):
                self._adopt(*write)

    def _device_changed(self, lun: int) -> None:
        """The LUN's ScsiDevice changed state (ScsiDevice.watch_route): no
        lane read of it from now on; whether it may be published again is
        decided after the change, not inside it."""
        if lun in self._leases:
            self._revoke(lun)
        if not self._check_due and not self._closed:
            self._check_due = True
            self.session.conn.loop.call_soon(self._check_now)

    def _check_now(self) -> None:
        self._check_due = False
        if not self._closed:
            self._checked()

    def _checked(self) -> None:
        """check(), and a failed one takes every LUN back."""
        try:
            self.check()
        except Exception:
            log.exception("session %s: lane route check failed", self.session.tsih)
            self.revoke_all()

    # -- RBD reads and writes in flight -------------------------------------------
    def _complete(self) -> None:
        """librbd finished reads and writes: answer the good ones (one
        writev for the batch); a failed one, or any once its store is
        fenced, runs as its command through Python's path instead (which
        answers NOT READY with the reason, or whatever the store's error
        deserves; a write is written again only by that path, which checks
        the fence first)."""
        s = self.session
        conn = s.conn
        w = s.window
        gone = conn.closing or s.closed
        try:
            nbytes, n, retry = self.native.complete(None if gone else conn._wbuf, conn.statsn,
                                                    w.exp_cmdsn, w.max_cmdsn,
                                                    w.depth - w.inflight)
        except MemoryError:
            # the batch's reads were taken off the lane and freed, some maybe
            # answered into the write buffer, none counted: the connection
            # cannot go on consistently. Dropped, as after any lost
            # connection the host retries its commands on a new one.
            log.error("session %s: out of memory answering lane reads; connection dropped",
                      s.tsih)
            conn.abort("out of memory answering lane reads")
            nbytes, n, retry = 0, 0, None
        w.complete(n)
        if n and not gone:
            conn.statsn = self.native.statsn
            conn._wbytes += nbytes
            conn.pdus_out += n
            s.bytes_out += nbytes - n * P.BHS_LEN
            conn.flush()
        if retry is not None:
            for command in retry:
                if command.__class__ is tuple:
                    self._adopt(*command)
                else:
                    self._retry(command)
        # what it holds idle, but for two blocks; all of it when commands
        # (of any session) wait for budget: idle credit must not starve them
        self._give_credit(0 if s.budget.server.waiting() else 2 * CREDIT_BLOCK)
        for lun in [lun for lun in self._draining if not self.native.lun_counts(lun)[2]]:
            self._draining.pop(lun).release()
        if not self.native.writes_inflight:
            for f in self._writes_idle:
                if not f.done():
                    f.set_result(None)
            self._writes_idle.clear()
        if not self.native.inflight:
            for f in self._idle:
                if not f.done():
                    f.set_result(None)
            self._idle.clear()
            if self._closed:
                conn.loop.remove_reader(self._fd)

    def _retry(self, command: bytes) -> None:
        """A lane read that failed becomes its command's task, as Python
        would have made it: its CmdSN was taken and it still counts in the
        window, so it is delivered at once (before drained() can return:
        task management and logout then find it among the tasks)."""
        s = self.session
        s.commands -= 1                 # counted once, when the lane took it
        task = s._prepare_scsi(P.Pdu(command))
        if task is None:
            s._noop(True)
        else:
            s._deliver(task, True)

    def _adopt(self, bhs: bytes, buf: memoryview, received: int, r2t_next: int, r2tsn: int,
               r2t: tuple[int, int, int, int, int] | None, cost: int) -> None:
        """A lane write becomes a task of Python's path exactly where it
        stands (the C lane's give_back): a write that failed in librbd (all
        its data in), or one collecting its data whose route was taken back
        or whose Data-Out the lane does not judge. Its data stays in the
        lane's memory (``buf``), its budget bytes become the task's charge,
        its R2Ts (TTT, DataSN, offsets) carry on, and like a retried read it
        is delivered at once in the window slot it holds."""
        s = self.session
        pdu = P.Pdu(bhs)
        task = Task(s, pdu, bytes(bhs[32:48]))
        task.buf = buf
        task.received = received
        task.unsol_end = task.unsol_next = pdu.dlen     # F=1: no unsolicited Data-Out
        task.r2t_next = r2t_next
        task.r2tsn = r2tsn
        if r2t is not None:
            ttt, off, end, nxt, datasn = r2t
            st = R2TState(ttt, off, end - off, r2tsn - 1)
            st.next, st.datasn = nxt, datasn
            task.r2ts[ttt] = st
            s.ttts[ttt] = task
        task.charged, task.paid_to = cost, task.edtl
        if not s.tasks:
            s.idle.clear()
        s.tasks[task.itt] = task
        s._deliver(task, True)

    # -- writes collecting their data -------------------------------------------
    def data_out(self, pdu: P.Pdu) -> bool:
        """A Data-Out of no Python task: True if the lane took it; False if
        it is Python's (the lane having just handed its write over as a
        task, or it belongs to no command at all: Python drops it)."""
        s = self.session
        conn = s.conn
        w = s.window
        res = self.native.data_out(pdu.bhs, pdu.data, conn._wbuf, conn.statsn, w.exp_cmdsn,
                                   w.max_cmdsn)
        if res is None:
            return False
        if res.__class__ is tuple:
            self._adopt(*res)
            return False
        s.bytes_in += len(pdu.data)
        s.budget.progress()
        if res:
            conn.queued(1, res)
        return True

    def placed(self, itt: int) -> None:
        """The rest of a lane write's immediate data has been placed."""
        s = self.session
        conn = s.conn
        w = s.window
        res = self.native.placed(itt, conn._wbuf, conn.statsn, w.exp_cmdsn, w.max_cmdsn)
        if res.__class__ is tuple:
            self._adopt(*res)
        elif res:
            conn.queued(1, res)

    def _credit(self, need: int) -> int:
        """Budget for RBD reads: a block (or just ``need``) more; 0 at the
        session's or the server's limit, and the lane leaves commands to
        Python until reads in flight give some back."""
        budget = self.session.budget
        for n in (max(need, CREDIT_BLOCK), need):
            if budget.try_take(n):
                return n
        return 0

    def _give_credit(self, keep: int) -> None:
        """Hand the budget back what the lane holds idle beyond ``keep``."""
        extra = self.native.credit - keep
        if extra > 0:
            self.native.credit -= extra
            self.session.budget.give(extra)

    async def writes_end(self) -> None:
        """Until no write of the lane is in flight."""
        if self.native.writes_inflight:
            f = self.session.conn.loop.create_future()
            self._writes_idle.append(f)
            await f

    async def drained(self) -> None:
        """Until no read of the lane is in flight (task management and logout
        answer after the commands they cover)."""
        if self.native.inflight:
            f = self.session.conn.loop.create_future()
            self._idle.append(f)
            await f

    def revoke_all(self) -> None:
        for lun in list(self._leases):
            self._revoke(lun)

    def _poll(self) -> None:
        if self._closed:
            return
        self._checked()
        self._timer = self.session.conn.loop.call_later(ROUTE_CHECK_S, self._poll)

    # -- metrics ------------------------------------------------------------------
    def _fold_tick(self) -> None:
        if self._closed:
            return
        self._fold_timer = self.session.conn.loop.call_later(FOLD_S, self._fold_tick)
        self._fold_stats()

    def _fold_stats(self) -> None:
        """The READs the lane answered since the last fold, into their LUs'
        metrics. The last fold is close's: the lane answers nothing after
        it (a closed session's RBD completions are dropped unanswered)."""
        counts = self.native.take_counts()
        if not counts:
            return
        devices = self._devices()
        for lun, kind, commands, nbytes, seconds, buckets in counts:
            dev = devices.get(lun)
            if dev is not None:         # an LU removed since: its metrics went with it
                dev.stats.add(LANE_KINDS[kind], commands, nbytes, seconds, buckets)

    def close(self) -> None:
        self._closed = True
        self.native.drop_collecting()       # nothing of them was written
        log.info("session %s: the lane answered %d READs (%d would have waited for the disk) "
                 "and %d WRITEs (%d R2Ts)", self.session.tsih, self.native.answered,
                 self.native.would_block, self.native.written, self.native.r2ts)
        self._fold_timer.cancel()
        self._fold_stats()
        self._timer.cancel()
        self.revoke_all()
        self._give_credit(0)
        if not self.native.inflight:
            self.session.conn.loop.remove_reader(self._fd)


def _rbd_submitter(store: object) -> object:
    """The submitter of an RBD store the lane may read through (0: none)."""
    if not isinstance(store, RbdStore):
        return 0
    return store.lane_submitter() or 0


def _credit_taker(lane: SessionLane) -> Callable[[int], int]:
    """SessionLane._credit for the C lane, without a reference to the lane
    (the C object is not garbage-collected: a cycle through it would leak)."""
    ref = weakref.ref(lane)

    def take(need: int) -> int:
        held = ref()
        return 0 if held is None else held._credit(need)
    return take
