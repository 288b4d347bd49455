"""Task management functions of a session (mixed into Session):
ABORT TASK / TASK SET, CLEAR TASK SET, LUN RESET, TARGET WARM/COLD RESET."""
from __future__ import annotations

import asyncio
import logging

from . import pdu as P
from .cmdsn import sn_lt
from .lane import ENABLED as LANE_ENABLED
from .task import Task

log = logging.getLogger("target.iscsi.session")

ABORT_WAIT = 30.0          # bound on waiting for aborted/cancelled commands
#: the functions that abort the tasks of other sessions too
OTHER_SESSIONS = frozenset((P.TMF_CLEAR_TASK_SET, P.TMF_LUN_RESET, P.TMF_TARGET_WARM_RESET,
                            P.TMF_TARGET_COLD_RESET))


class TaskManagementMixin:
    # -- task management -------------------------------------------------------------
    def _tmf_rsp(self, itt: int, response: int) -> None:
        bhs = P.build_bhs(P.OP_TMF_RSP, P.FLAG_FINAL, b2=response, itt=itt,
                          fields=self._sn_fields(self.conn.next_statsn()))
        self.conn.send(bhs)

    def _lun_exists(self, lun: int) -> bool:
        try:
            return lun in self.scsi.luns()
        except Exception:
            log.exception("luns() failed")
            return False

    async def _tmf(self, pdu: P.Pdu, counted: bool) -> None:
        func = pdu.flags & 0x7F
        lun = pdu.lun
        if LANE_ENABLED:
            # no lane starts a command while it runs, and this session's
            # lane reads and writes end first (they are not abortable)
            self.lanes_stop()
        try:
            if LANE_ENABLED:
                await self._lane_commands_end(func)
            response = await self._tmf_do(pdu, func, lun)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session %s: TMF %d failed", self.tsih, func)
            response = P.TMF_RSP_REJECTED
        finally:
            self._noop(counted)
            if LANE_ENABLED:
                self.lanes_go()
        if self.closed:
            return
        self._tmf_rsp(pdu.itt, response)
        if func == P.TMF_TARGET_COLD_RESET and response == P.TMF_RSP_COMPLETE:
            await self.conn.drain()
            for s in self.server.sessions_of(self.target):
                s.conn.close("target cold reset")

    async def _lane_commands_end(self, func: int) -> None:
        """Until the lane reads and writes this function covers have ended (they cannot
        be aborted: librbd owns their buffers; each is answered as completed
        before it): this session's, and for the functions that abort other
        sessions' tasks every session's of the target (SAM: a reset completes
        after the tasks it aborts). The caller stopped every lane of the
        target, so none starts meanwhile. A LUN RESET waits for those of
        other LUNs too: they end as soon, and no per-LUN wait is needed.
        Bounded as aborting Python's tasks is."""
        sessions = [self] if func not in OTHER_SESSIONS else self.server.sessions_of(self.target)
        ends = [s.lane.drained() for s in sessions if s.lane is not None]
        if not ends:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*ends), ABORT_WAIT)
        except asyncio.TimeoutError:
            log.warning("session %s: TMF %d answered with lane commands still in flight after %.0f s",
                        self.tsih, func, ABORT_WAIT)

    async def _tmf_do(self, pdu: P.Pdu, func: int, lun: int) -> int:
        if func == P.TMF_ABORT_TASK:
            ref = pdu.u32(20)
            t = self.tasks.get(ref)
            if t is not None and not t.aborted:
                await self.abort_tasks([t], notify=False)
                return P.TMF_RSP_COMPLETE
            ref_cmdsn = pdu.u32(32)
            if (not pdu.immediate and self.window.in_window(ref_cmdsn)
                    and sn_lt(ref_cmdsn, pdu.cmdsn) and not self.window.received(ref_cmdsn)):
                # the command never arrived: consider it received (and aborted)
                _, ready = self.window.submit(ref_cmdsn, self._noop)
                for a in ready:
                    a(True)
                return P.TMF_RSP_COMPLETE
            return P.TMF_RSP_NO_TASK
        if func in (P.TMF_ABORT_TASK_SET, P.TMF_CLEAR_TASK_SET, P.TMF_LUN_RESET):
            if not self._lun_exists(lun):
                return P.TMF_RSP_NO_LUN
            mine = [t for t in self.tasks.values() if t.lun == lun]
            await self.abort_tasks(mine, notify=False)
            if func != P.TMF_ABORT_TASK_SET:
                for s in self.server.sessions_of(self.target):
                    if s is not self:
                        await s.abort_tasks([t for t in s.tasks.values() if t.lun == lun], notify=True)
            if func == P.TMF_LUN_RESET:
                await self.scsi.lun_reset(lun, self.nexus)
            return P.TMF_RSP_COMPLETE
        if func in (P.TMF_TARGET_WARM_RESET, P.TMF_TARGET_COLD_RESET):
            await self.abort_tasks(list(self.tasks.values()), notify=False)
            for s in self.server.sessions_of(self.target):
                if s is not self:
                    await s.abort_tasks(list(s.tasks.values()), notify=True)
            await self.scsi.target_reset(self.nexus)
            return P.TMF_RSP_COMPLETE
        if func == P.TMF_TASK_REASSIGN:
            return P.TMF_RSP_REASSIGN_NOT_SUPPORTED
        return P.TMF_RSP_NOT_SUPPORTED

    async def abort_tasks(self, tasks: list[Task], *, notify: bool) -> None:
        waits = []
        for t in tasks:
            if t.aborted:
                continue
            t.aborted = True
            t.notify_abort = notify
            if self.tasks.get(t.itt) is t:
                del self.tasks[t.itt]      # later Data-Out for it is dropped; the ITT may be reused
            for ttt in list(t.r2ts):
                self.ttts.pop(ttt, None)
            if t.aio is not None and not t.aio.done():
                t.aio.cancel()
                waits.append(t.aio)
        if not self.tasks and not any(not w.done() for w in waits):
            self.idle.set()
        if waits:
            await asyncio.wait(waits, timeout=ABORT_WAIT)
