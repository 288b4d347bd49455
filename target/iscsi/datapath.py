"""SCSI command data path of a session (mixed into Session): command
receipt, immediate/unsolicited/R2T-solicited Data-Out, task attributes,
execution by the SCSI layer and Data-In/SCSI Response with residuals."""
from __future__ import annotations

import asyncio
import logging
import mmap
from functools import partial
from typing import Any, Callable

from target.scsi.api import (BUSY, CHECK_CONDITION, TASK_ABORTED, TASK_SET_FULL, Deferred, ScsiCommand,
                             ScsiResponse, Submitted, submitter)

from .. import eager
from ..logsafe import RateLimitedLog
from . import pdu as P
from .budget import COMMAND_COST, SMALL_WRITE
from .buffers import EAGER_WRITE, POOL_MIN
from .lane import ENABLED as LANE_ENABLED
from .residual import residual_count
from .task import (ATTR_HEAD_OF_QUEUE, ATTR_ORDERED, SENSE_DATA_OFFSET_ERROR, SENSE_DATA_PHASE_ERROR,
                   SENSE_INTERNAL_FAILURE, SENSE_INVALID_FIELD_CDB, SENSE_INVALID_TTT,
                   SENSE_NOT_ENOUGH_UNSOLICITED, SENSE_TOO_MUCH_WRITE_DATA,
                   SENSE_UNEXPECTED_UNSOLICITED, ProtocolViolation, R2TState, Task)

log = logging.getLogger("target.iscsi.session")
ratelog = RateLimitedLog(log)     # for what a client can trigger once per command

# Immediate commands bypass the CmdSN window (RFC 7143 3.2.2.1); beyond this
# many in flight per session they are answered TASK SET FULL, which SCSI
# initiators retry (Linux also lowers the device's queue depth).
IMMEDIATE_LIMIT = 16


def write_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A zeroed buffer for a write's data. Big ones are anonymous mappings
    whose pages the kernel supplies as the data lands, so a write whose data
    never comes costs address space, not memory."""
    if nbytes <= SMALL_WRITE:
        return bytearray(nbytes)
    return mmap.mmap(-1, nbytes)


class DataPathMixin:
    # -- SCSI commands ---------------------------------------------------------
    def _prepare_scsi(self, pdu: P.Pdu, placed: bool = False) -> Task | None:
        """Check and admit a SCSI Command PDU (``placed``: its immediate data
        was received into the buffer _immediate_destination gave); returns
        its task, to deliver when its CmdSN comes up, or None if it was
        rejected."""
        itt = pdu.itt
        cdb = bytes(pdu.bhs[32:48])
        if pdu.ahs:
            try:
                for atype, spec in P.iter_ahs(pdu.ahs):
                    if atype == P.AHS_EXTENDED_CDB and len(spec) > 1:
                        cdb = cdb + spec[1:]
            except P.PduError:
                self.reject(pdu.bhs, P.REJECT_INVALID_PDU_FIELD)
                return None
        if itt == P.ALL_ONES or itt in self.tasks or (self.lane is not None and self.lane.native.busy(itt)):
            self.reject(pdu.bhs, P.REJECT_INVALID_PDU_FIELD if itt == P.ALL_ONES
                        else P.REJECT_TASK_IN_PROGRESS)
            return None
        task = Task(self, pdu, cdb)
        dlen = len(pdu.data)
        prm = self.params
        if dlen and not task.write:
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return None
        if dlen and not prm.immediate_data:
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return None
        if task.write:
            if dlen > task.edtl or dlen > prm.first_burst_length:
                self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
                return None
            if task.edtl > self.server.max_cmd_data:
                task.error_sense = SENSE_INVALID_FIELD_CDB
            task.received = dlen
            if prm.initial_r2t or pdu.final:
                # F=1: no unsolicited Data-Out follows (RFC 7143 11.3.4); R2Ts
                # solicit everything after the immediate data
                task.unsol_end = dlen
            else:
                # unsolicited Data-Out follows: the whole first burst
                task.unsol_end = max(dlen, min(prm.first_burst_length, task.edtl))
            task.unsol_next = dlen
            task.r2t_next = task.unsol_end
            self.bytes_in += dlen
        if task.read and task.write:
            task.error_sense = SENSE_INVALID_FIELD_CDB      # bidirectional: not supported
        if pdu.immediate and self.immediate_inflight >= IMMEDIATE_LIMIT:
            self._refuse(task, TASK_SET_FULL)
        elif task.write and task.error_sense is None:
            self._admit_write(task, pdu.data, placed)
        elif self.budget.try_take(COMMAND_COST):
            task.charged = COMMAND_COST
        else:
            self._refuse(task, TASK_SET_FULL if self.budget.over_session_limit(COMMAND_COST) else BUSY)
        if pdu.immediate:
            self.immediate_inflight += 1
        if not self.tasks:
            self.idle.clear()          # set only while no task is in (see _retire, _finish)
        self.tasks[itt] = task
        self.commands += 1
        return task

    def _deliver(self, task: Task, counted: bool) -> None:
        """The command's turn has come (CmdSN order): run it."""
        task.counted = counted
        if task.aborted:
            if task.notify_abort and not self.closed:
                self._retire(task)
                self._send_status(task, TASK_ABORTED, b"")
            self._finish(task)
            return
        task.state = "data"
        if LANE_ENABLED:
            task.lane_wait = self.lane_hold(task)
        if task.attr == ATTR_ORDERED or self._ordered:     # else nothing to wait for
            task.wait_for = self._ordering_deps(task)
        if not self._run_now(task):
            # runs now; a Task only if it has to wait (None once it is done).
            # The loop is passed: asyncio.get_running_loop() costs a getpid()
            # system call, a real share of a command that waits (RBD).
            task.aio = eager.start(self._run(task), self.conn.loop)

    def _admit_write(self, task: Task, immediate: memoryview, placed: bool) -> None:
        """Charge a write and give it its buffer. All of its data if that
        fits and it is not huge (the buffer is allocated at once, or is the
        one its immediate data was ``placed`` in); else what is on its way
        anyway (immediate and unsolicited data: a big buffer is then a lazy
        mapping, and the rest is charged before its R2Ts go out, see _run);
        else the command is refused."""
        edtl = task.edtl
        budget = self.budget
        if edtl <= EAGER_WRITE and budget.try_take(COMMAND_COST + edtl):
            task.charged, task.paid_to = COMMAND_COST + edtl, edtl
            if placed:
                task.buf = immediate.obj        # the pooled buffer of _immediate_destination
                return
            if edtl < POOL_MIN and len(immediate) == edtl:
                task.buf = bytearray(immediate)      # all of it came with the command
                return
            # Data-Out (or the immediate data, below) fills every byte of it
            # before the write executes
            task.buf = self.server.buffers.take(edtl)
        else:
            part = edtl if edtl <= SMALL_WRITE else task.unsol_end
            if not budget.try_take(COMMAND_COST + part):
                self._refuse(task, TASK_SET_FULL if budget.over_session_limit(COMMAND_COST + part)
                             else BUSY)
                return
            task.charged, task.paid_to = COMMAND_COST + part, part
            if part:
                task.buf = write_buffer(edtl)
        if len(immediate):
            task.buf[:len(immediate)] = immediate

    def _refuse(self, task: Task, status: int) -> None:
        """Answer a command BUSY / TASK SET FULL without running it: its
        data (immediate or unsolicited, already on the way) is dropped."""
        if task.error_sense is None:        # a CHECK CONDITION already due says more
            task.error_status = status
            task.error_sense = b""
        task.paid_to = 0
        log.debug("session %s: ITT 0x%08x refused with status 0x%02x", self.tsih, task.itt, status)

    async def _charge(self, task: Task, nbytes: int) -> None:
        """Charge ``nbytes`` more to the task, waiting for the budget if needed."""
        if self.budget.try_take(nbytes):
            task.charged += nbytes
            return
        fut = asyncio.get_running_loop().create_future()

        def granted() -> None:
            if task.finished or fut.done():
                self.budget.give(nbytes)        # nobody waits for it any more
                return
            task.charged += nbytes
            fut.set_result(None)
        if self.budget.take_or_wait(nbytes, granted):
            task.charged += nbytes
            return
        await fut

    def payload_destination(self, bhs: bytes, dlen: int) -> memoryview | None:
        """Where the payload of this (not yet complete) PDU is to be received
        (``handle(pdu, placed=True)`` follows when it is in); None: in the
        connection's buffer, as usual."""
        op = bhs[0] & 0x3F
        if op == P.OP_DATA_OUT:
            return self._data_out_destination(bhs, dlen)
        if op == P.OP_SCSI_CMD:
            return self._immediate_destination(bhs, dlen)
        return None

    def _immediate_destination(self, bhs: bytes, dlen: int) -> memoryview | None:
        """A write command's immediate data goes to the start of an idle
        pooled buffer as big as all its data, which the command then takes
        as its own (_admit_write) rather than copying it there. Only an idle
        one: nothing is charged for it yet (the command is not even whole),
        so a peer that never completes the PDU holds no memory that was not
        held already."""
        edtl = int.from_bytes(bhs[20:24], "big")
        if ((bhs[1] & (P.FLAG_READ | P.FLAG_WRITE)) != P.FLAG_WRITE or self.discovery
                or not self.params.immediate_data or dlen > self.params.first_burst_length
                or not dlen <= edtl <= EAGER_WRITE or edtl > self.server.max_cmd_data):
            return None
        buf = self.server.buffers.take_idle(edtl)
        return None if buf is None else memoryview(buf)[:dlen]

    def _data_out_destination(self, bhs: bytes, dlen: int) -> memoryview | None:
        """Where the payload of this Data-Out belongs, if it plainly continues
        one of the task's data sequences; else None."""
        itt, ttt = int.from_bytes(bhs[16:20], "big"), int.from_bytes(bhs[20:24], "big")
        off = int.from_bytes(bhs[40:44], "big")
        task = self.tasks.get(itt)
        if task is None and self.lane is not None:
            return self.lane.native.destination(bhs, dlen)      # a write the lane collects?
        if (task is None or task.aborted or task.error_sense is not None or task.buf is None
                or not task.write or off + dlen > task.edtl):
            return None
        if ttt == P.ALL_ONES:
            ok = off == task.unsol_next and off + dlen <= task.unsol_end
        else:
            r = task.r2ts.get(ttt)
            ok = r is not None and off == r.next and off + dlen <= r.end
        return memoryview(task.buf)[off:off + dlen] if ok else None

    def _ordering_deps(self, task: Task) -> list[Task] | None:
        """Commands this one must wait for (per LUN, this session's task set)."""
        attr = task.attr
        if attr == ATTR_HEAD_OF_QUEUE:
            return None
        lun = task.lun
        if attr == ATTR_ORDERED:
            deps = [t for t in self.tasks.values()
                    if t is not task and t.lun == lun and t.aio is not None and not t.aio.done()]
            self._ordered[lun] = task
            return deps or None
        last = self._ordered.get(lun)
        if last is not None:
            if last.aio is not None and not last.aio.done() and not last.aborted:
                return [last]
            del self._ordered[lun]
        return None

    def _data_out(self, pdu: P.Pdu, placed: bool = False) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None and self.lane is not None:
            # a write the lane collects takes it, or hands itself over
            if self.lane.data_out(pdu):
                return
            task = self.tasks.get(pdu.itt)
        if task is None or task.aborted or task.error_sense is not None:
            log.debug("session %s: Data-Out for unknown/aborted/failed ITT 0x%08x dropped",
                      self.tsih, pdu.itt)
            return
        err = self._check_data_out(task, pdu)
        if err is not None:
            # ERL 0 cannot ask for the data again: the command fails (the
            # connection and the other commands carry on)
            why, sense = err
            ratelog.warning("data-out", "session %s: ITT 0x%08x: %s", self.tsih, task.itt, why)
            self._fail_task(task, sense)
            return
        off = pdu.u32(40)
        n = len(pdu.data)
        if task.buf is not None and n and not placed:
            task.buf[off:off + n] = pdu.data
        task.received += n
        self.bytes_in += n
        self.budget.progress()
        if task.state == "data":
            if task.received >= task.edtl:
                if task.data_ready is not None:
                    task.data_ready.set()
            elif pdu.ttt != P.ALL_ONES:
                self._send_r2ts(task)

    def _check_data_out(self, task: Task, pdu: P.Pdu) -> tuple[str, bytes] | None:
        """Validate one Data-Out against the task's data sequences and
        advance them; returns (reason, sense) if the PDU is wrong."""
        if not task.write:
            return "Data-Out for a command that is not a write", SENSE_UNEXPECTED_UNSOLICITED
        off = pdu.u32(40)
        n = len(pdu.data)
        if off + n > task.edtl:
            return f"Data-Out beyond EDTL ({off}+{n} > {task.edtl})", SENSE_TOO_MUCH_WRITE_DATA
        ttt = pdu.ttt
        datasn = pdu.u32(36)
        if ttt == P.ALL_ONES:
            if off + n > task.unsol_end:
                return (f"unsolicited Data-Out at {off}+{n} beyond the first burst {task.unsol_end}",
                        SENSE_UNEXPECTED_UNSOLICITED)
            if off != task.unsol_next:
                return f"unsolicited Data-Out at {off}, expected {task.unsol_next}", SENSE_DATA_OFFSET_ERROR
            if datasn != task.unsol_datasn:
                return f"Data-Out DataSN {datasn}, expected {task.unsol_datasn}", SENSE_DATA_PHASE_ERROR
            task.unsol_datasn += 1
            task.unsol_next += n
            if pdu.final and task.unsol_next != task.unsol_end:
                return "unsolicited burst ended early", SENSE_NOT_ENOUGH_UNSOLICITED
            return None
        r = task.r2ts.get(ttt)
        if r is None:
            return f"Data-Out with unknown TTT 0x{ttt:08x}", SENSE_INVALID_TTT
        if off != r.next or off + n > r.end:
            return f"solicited Data-Out at {off}+{n}, expected {r.next}..{r.end}", SENSE_DATA_OFFSET_ERROR
        if datasn != r.datasn:
            return f"Data-Out DataSN {datasn}, expected {r.datasn}", SENSE_DATA_PHASE_ERROR
        r.datasn += 1
        r.next += n
        if r.next == r.end:
            del task.r2ts[ttt]
            self.ttts.pop(ttt, None)
        elif pdu.final:
            return "solicited burst ended early", SENSE_DATA_PHASE_ERROR
        return None

    def _fail_task(self, task: Task, sense: bytes) -> None:
        """End a write whose data went wrong with CHECK CONDITION, without
        executing it; its remaining Data-Out PDUs are dropped."""
        task.error_sense = sense
        task.buf = None
        for ttt in list(task.r2ts):
            self.ttts.pop(ttt, None)
        task.r2ts.clear()
        if task.data_ready is not None:
            task.data_ready.set()      # _run wakes up and answers with the sense
        # a task not yet delivered answers as soon as its CmdSN comes up

    def _send_r2ts(self, task: Task) -> None:
        prm = self.params
        conn = self.conn
        while len(task.r2ts) < prm.max_outstanding_r2t and task.r2t_next < task.edtl:
            length = min(prm.max_burst_length, task.edtl - task.r2t_next)
            ttt = self.new_ttt()
            r = R2TState(ttt, task.r2t_next, length, task.r2tsn)
            task.r2ts[ttt] = r
            self.ttts[ttt] = task
            bhs = P.pack_bhs(P.OP_R2T, P.FLAG_FINAL, 0, 0, task.raw_lun, task.itt, ttt, conn.statsn,
                             self.window.exp_cmdsn, self.window.max_cmdsn, task.r2tsn, r.offset, length)
            conn.send(bhs)
            task.r2tsn += 1
            task.r2t_next += length

    def _run_now(self, task: Task) -> bool:
        """The common case without a coroutine: a command that waits for
        nothing (all its data is in, no ordering dependency, its budget
        at hand, the socket keeping up) is executed and, when the SCSI
        layer answers at once, answered right here. Returns False, having
        done nothing, if it must wait first (then _run does it all)."""
        if (task.wait_for or task.lane_wait or task.error_sense is not None
                or self.conn.write_paused):
            return False
        if task.read:
            # the data it will produce, held until the socket took it
            n = task.edtl if task.edtl < self.server.max_cmd_data else self.server.max_cmd_data
            if not self.budget.try_take(n):
                return False
            task.charged += n
        elif task.write and task.received < task.edtl:
            return False
        rsp = self._execute(task)
        if rsp.__class__ is ScsiResponse:
            self._answer(task, rsp)
        elif rsp.__class__ is Deferred:
            # answered from its future's done-callback (a read in flight in
            # its store): no coroutine, no Task; an abort cancels the future
            task.aio = rsp.future                                         # type: ignore[union-attr]
            rsp.future.add_done_callback(partial(self._answered, task, rsp.finish))  # type: ignore[union-attr]
        else:
            task.aio = eager.start(self._run(task, rsp), self.conn.loop)
        return True

    def _answer(self, task: Task, rsp: ScsiResponse) -> None:
        """Send a command's response, its socket keeping up."""
        if task.aborted or self.closed:
            self._finish(task)
            return
        task.state = "done"
        self._retire(task)
        self._send_result(task, rsp)
        conn = self.conn
        if conn.behind():
            # the charge stands for the unsent answer until the peer took it
            task.aio = eager.start(self._drained(task), conn.loop)
        else:
            self._finish(task)

    def _answered(self, task: Task, finish: Callable[[asyncio.Future[Any]], ScsiResponse],
                  done: asyncio.Future[Any]) -> None:
        """A Deferred answer's future is done (or was cancelled: the command
        was aborted): what _run does after its await."""
        try:
            # aborted after its future was done but before this ran: answered
            # as an abort all the same (a Task would have been cancelled)
            if done.cancelled() or task.aborted:
                if task.notify_abort and not self.closed:
                    self._retire(task)
                    self._send_status(task, TASK_ABORTED, b"")
                self._finish(task)
            elif self.conn.write_paused and not self.closed:
                # do not pile responses onto a slow reader: _run waits for it
                task.aio = eager.start(self._run(task, finish(done)), self.conn.loop)
            else:
                self._answer(task, finish(done))
        except Exception:
            log.exception("session %s: task 0x%08x failed", self.tsih, task.itt)
            self.conn.abort("internal error")
            self._finish(task)

    def _execute(self, task: Task) -> Submitted:
        """Hand the command to the SCSI layer: its response, or what to
        await for it. Never raises (but cancellation, when awaited)."""
        task.state = "exec"
        cmd = ScsiCommand(task.cdb, task.lun, self.nexus,
                          memoryview(task.buf) if task.buf is not None else None,
                          task.edtl if task.read else 0, task.itt, task.attr)
        st = self.target.scsi_target
        if st is not self._scsi_target:
            # looked up per command (the target's LUN set may be replaced
            # while a session runs), but resolved only when it changed
            self._scsi_target = st
            self._scsi_submit = submitter(st)
        try:
            return self._scsi_submit(cmd)
        except Exception:
            log.exception("session %s: SCSI layer failed on CDB %s", self.tsih, task.cdb[:1].hex())
            return ScsiResponse(CHECK_CONDITION, SENSE_INTERNAL_FAILURE)

    async def _drained(self, task: Task) -> None:
        """A command answered at once whose answer the peer has not read
        yet: its charge is given back when it has."""
        try:
            await self.conn.drain()
        finally:
            self._finish(task)

    async def _run(self, task: Task, pending: Submitted | None = None) -> None:
        """A command that waits: for its data, budget or ordering (then it
        is executed here), or, with ``pending``, for the SCSI layer."""
        try:
            if pending is None:
                if task.write and task.received < task.edtl and task.error_sense is None:
                    if task.paid_to < task.edtl:
                        # all of it at once: a write holding part of its data can
                        # never block another that holds the rest
                        await self._charge(task, task.edtl - task.paid_to)
                        task.paid_to = task.edtl
                        if task.buf is None and task.error_sense is None:
                            task.buf = write_buffer(task.edtl)
                    if task.received < task.edtl and task.error_sense is None:
                        task.data_ready = asyncio.Event()
                        self._send_r2ts(task)
                        await task.data_ready.wait()
                        task.data_ready = None
                if task.lane_wait:
                    # it holds the lanes: the target's lane writes in flight end first
                    task.lane_wait = False
                    await self.lane_writes_end()
                if task.wait_for:
                    # SAM task attributes: an ORDERED command runs after every
                    # command delivered before it, and later SIMPLE ones after it
                    deps = [t.aio for t in task.wait_for if t.aio is not None and not t.aio.done()]
                    task.wait_for = None
                    if deps:
                        await asyncio.wait(deps)
                if task.error_sense is not None:
                    task.state = "exec"
                    self._retire(task)
                    self._send_status(task, task.error_status, task.error_sense)
                    return
                if task.read:
                    # the data it will produce, held until the socket took it
                    await self._charge(task, min(task.edtl, self.server.max_cmd_data))
                    if task.aborted or self.closed:
                        return
                pending = self._execute(task)
            if pending.__class__ is ScsiResponse:
                rsp = pending
            else:
                try:
                    rsp = await pending
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("session %s: SCSI layer failed on CDB %s", self.tsih,
                                  task.cdb[:1].hex())
                    rsp = ScsiResponse(CHECK_CONDITION, SENSE_INTERNAL_FAILURE)
            pending = None
            if task.aborted or self.closed:
                return
            if self.conn.write_paused:
                await self.conn.drain()        # do not pile responses onto a slow reader
                if task.aborted or self.closed:
                    return
            task.state = "done"
            self._retire(task)
            self._send_result(task, rsp)
            # the transport holds (a copy of) what is unsent; the charge now
            # stands for that until drain() says the peer took it
            rsp = None
            if self.conn.behind():             # (no drain() coroutine when not)
                await self.conn.drain()
        except asyncio.CancelledError:
            if task.notify_abort and not self.closed:
                self._retire(task)
                self._send_status(task, TASK_ABORTED, b"")
        except ProtocolViolation as e:
            self.conn.protocol_error(str(e))
        except Exception:
            log.exception("session %s: task 0x%08x failed", self.tsih, task.itt)
            self.conn.abort("internal error")
        finally:
            self._finish(task)

    def _retire(self, task: Task) -> None:
        """Just before a command's final status goes out: reopen its CmdSN
        slot (the status carries the new MaxCmdSN) and free its ITT, which
        the initiator may reuse as soon as it sees the status."""
        self._release_window(task)
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
            if not self.tasks:
                self.idle.set()

    def _release_window(self, task: Task) -> None:
        if not task.window_released:
            task.window_released = True
            if task.counted:
                self.window.complete()

    def _finish(self, task: Task) -> None:
        if not task.finished:
            task.finished = True
            if LANE_ENABLED:
                self.lane_release(task)
            self.budget.give(task.charged)
            task.charged = 0
            if task.immediate:
                self.immediate_inflight -= 1
        if not task.window_released:           # (else _retire did this and the rest)
            self._release_window(task)
            tasks = self.tasks
            if tasks.get(task.itt) is task:
                del tasks[task.itt]
                if not tasks:
                    self.idle.set()
        if task.r2ts:
            for ttt in task.r2ts:
                self.ttts.pop(ttt, None)
            task.r2ts.clear()
        buf = task.buf
        if buf is not None:
            task.buf = None
            self.server.buffers.give(buf)      # unless something still uses it (buffers)

    def _send_status(self, task: Task, status: int, sense: bytes, *, flags: int = 0,
                     residual: int = 0, exp_datasn: int | None = None) -> None:
        if exp_datasn is None:
            exp_datasn = task.r2tsn     # ExpDataSN: R2Ts (writes) or Data-In PDUs (reads) sent
        data = (len(sense).to_bytes(2, "big") + bytes(sense)) if sense else b""
        bhs = P.pack_bhs(P.OP_SCSI_RSP, P.FLAG_FINAL | flags, 0, status, b"", task.itt, 0,
                         self.conn.next_statsn(), self.window.exp_cmdsn, self.window.max_cmdsn,
                         exp_datasn, 0, residual)
        self.conn.send(bhs, data)

    def _send_result(self, task: Task, rsp: ScsiResponse) -> None:
        if task.read:
            raw = rsp.data_in
            n = len(raw)
            if (0 < n == task.edtl and n <= self.single_data_in and not rsp.sense
                    and rsp.transfer_length is None
                    and (raw.__class__ is bytearray or raw.__class__ is bytes)):
                # the common answer (a 4 KiB read): all the data the initiator
                # asked for in one Data-In that carries the status, its
                # header packed in one go with its length
                conn = self.conn
                window = self.window
                # (n <= single_data_in: within DataSegmentLength's 24 bits)
                bhs = P.BHS_WORDS.pack(P.OP_DATA_IN, P.FLAG_FINAL | P.DATAIN_STATUS, 0, rsp.status, n,
                                       P.ZERO_LUN, task.itt, P.ALL_ONES, conn.next_statsn(),
                                       window.exp_cmdsn, window.max_cmdsn, 0, 0, 0)
                if n & 3:
                    pad = P.padding(n)
                    conn.write_buffers([bhs, raw, pad], P.BHS_LEN + n + len(pad))
                else:
                    conn.write_buffers([bhs, raw], P.BHS_LEN + n)
                self.bytes_out += n
                return
        elif not rsp.sense and self.plain_pdus:
            tl = rsp.transfer_length
            if tl is None or tl == task.edtl:
                # the common answer to a write (or a command without data):
                # a status without sense or residual, no digests, its header
                # packed in one go (what _send_status comes to for it)
                conn = self.conn
                window = self.window
                conn.write_buffers([P.BHS_WORDS.pack(
                    P.OP_SCSI_RSP, P.FLAG_FINAL, 0, rsp.status, 0, P.ZERO_LUN, task.itt, 0,
                    conn.next_statsn(), window.exp_cmdsn, window.max_cmdsn, task.r2tsn, 0, 0)], P.BHS_LEN)
                return
        prm = self.params
        conn = self.conn
        status = rsp.status
        sense = bytes(rsp.sense) if rsp.sense else b""
        edtl = task.edtl
        n = 0
        dv = None
        if task.read:
            raw = rsp.data_in
            dv = raw if isinstance(raw, memoryview) else memoryview(raw)
            if dv.format != "B" or dv.ndim != 1:
                dv = dv.cast("B")
            xfer = len(dv) if rsp.transfer_length is None else rsp.transfer_length
            n = min(len(dv), edtl)
        elif rsp.transfer_length is not None:
            xfer = rsp.transfer_length
        else:   # no Data-Out the SCSI layer knows of (e.g. an unsupported opcode)
            xfer = edtl
        res_flags, residual = residual_count(xfer, edtl)
        if n == 0:
            self._send_status(task, status, sense, flags=res_flags, residual=residual)
            return
        collapse = not sense
        mrdsl = prm.initiator_mrdsl
        mbl = prm.max_burst_length
        buffers: list = []
        offset = 0
        datasn = 0
        seq_left = mbl
        hd, dd = conn.header_digest, conn.data_digest
        exp_cmdsn = self.window.exp_cmdsn
        max_cmdsn = self.window.max_cmdsn
        raw_lun = b"\0" * 8
        while offset < n:
            chunk = min(mrdsl, n - offset, seq_left)
            last = offset + chunk == n
            seq_end = last or chunk == seq_left
            flags = P.FLAG_FINAL if seq_end else 0
            b3 = 0
            statsn = 0
            res = 0
            if last and collapse:
                flags |= P.DATAIN_STATUS | res_flags     # O/U bits sit where SCSI Response has them
                b3 = status
                statsn = conn.next_statsn()
                res = residual
            bhs = P.pack_bhs(P.OP_DATA_IN, flags, 0, b3, raw_lun, task.itt, P.ALL_ONES, statsn,
                             exp_cmdsn, max_cmdsn, datasn, offset, res)
            buffers += P.encode(bhs, dv[offset:offset + chunk], header_digest=hd, data_digest=dd)
            offset += chunk
            datasn += 1
            seq_left = mbl if seq_end else seq_left - chunk
        conn.write_buffers(buffers, P.wire_len(buffers))
        self.bytes_out += n
        if not collapse:
            self._send_status(task, status, sense, flags=res_flags, residual=residual, exp_datasn=datasn)
