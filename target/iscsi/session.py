"""Full feature phase of one iSCSI session (ERL 0, one connection):
CmdSN ordering, SCSI command/data transfer (immediate, unsolicited and
R2T-solicited Data-Out; Data-In with phase collapse), NOP, task management,
text (SendTargets) and logout.

Handlers run synchronously from the connection's receive path; a PDU's data
segment is a view into the receive buffer and is copied before returning.
Each delivered SCSI command runs as its own asyncio task, so commands are
handed to the SCSI layer in CmdSN order but execute concurrently.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from target.scsi.api import CHECK_CONDITION, TASK_ABORTED, Nexus, ScsiCommand, ScsiResponse

from . import pdu as P
from .cmdsn import CmdWindow, sn_lt
from .params import NOT_UNDERSTOOD, REJECT, TextError, encode_text, parse_text
from .residual import block_size_of, data_out_length

if TYPE_CHECKING:  # pragma: no cover
    from .connection import IscsiConnection
    from .login import LoginResult
    from .server import IscsiServer, IscsiTargetConfig

log = logging.getLogger(__name__)

ATTR_SIMPLE, ATTR_ORDERED, ATTR_HEAD_OF_QUEUE, ATTR_ACA = 1, 2, 3, 4
ABORT_WAIT = 30.0          # bound on waiting for aborted/cancelled commands
LOGOUT_DRAIN = 30.0        # bound on waiting for in-flight commands at logout


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    s = bytearray(18)
    s[0] = 0x70
    s[2] = key & 0x0F
    s[7] = 10
    s[12] = asc
    s[13] = ascq
    return bytes(s)


SENSE_INTERNAL_FAILURE = fixed_sense(0x04, 0x44, 0x00)     # HARDWARE ERROR, internal target failure
SENSE_INVALID_FIELD_CDB = fixed_sense(0x05, 0x24, 0x00)    # ILLEGAL REQUEST
SENSE_LUN_NOT_SUPPORTED = fixed_sense(0x05, 0x25, 0x00)
# RFC 7143 11.4.7.2 and SPC-4 for data transfer errors the target detects
SENSE_UNEXPECTED_UNSOLICITED = fixed_sense(0x05, 0x0C, 0x0C)   # unexpected unsolicited data
SENSE_NOT_ENOUGH_UNSOLICITED = fixed_sense(0x05, 0x0C, 0x0D)   # not enough unsolicited data
SENSE_DATA_PHASE_ERROR = fixed_sense(0x0B, 0x4B, 0x00)          # ABORTED COMMAND, data phase error
SENSE_INVALID_TTT = fixed_sense(0x0B, 0x4B, 0x01)               # invalid target port transfer tag
SENSE_TOO_MUCH_WRITE_DATA = fixed_sense(0x0B, 0x4B, 0x02)
SENSE_DATA_OFFSET_ERROR = fixed_sense(0x0B, 0x4B, 0x05)


def iscsi_transport_id(initiator_port: str) -> bytes:
    """SPC-4 iSCSI TransportID, format 01h (initiator port name with ISID)."""
    name = initiator_port.encode()
    # "<name>,i,0x<isid>" NUL terminated, padded to a multiple of 4
    body = name + b"\0"
    body += b"\0" * ((-len(body)) & 3)
    if len(body) < 20:
        body += b"\0" * (20 - len(body))     # SPC-4: ADDITIONAL LENGTH at least 20
    return bytes((0x40 | 0x05, 0)) + len(body).to_bytes(2, "big") + body


class ProtocolViolation(Exception):
    """The initiator broke the protocol in a way that ends the connection."""


class R2TState:
    __slots__ = ("ttt", "offset", "end", "next", "r2tsn", "datasn")

    def __init__(self, ttt: int, offset: int, length: int, r2tsn: int) -> None:
        self.ttt = ttt
        self.offset = offset
        self.end = offset + length
        self.next = offset
        self.r2tsn = r2tsn
        self.datasn = 0           # next DataSN expected in this Data-Out sequence


class Task:
    __slots__ = ("session", "itt", "lun", "raw_lun", "cdb", "edtl", "read", "write", "attr", "cmdsn",
                 "counted", "buf", "received", "unsol_end", "unsol_next", "r2t_next", "r2tsn",
                 "r2ts", "data_ready", "aio", "aborted", "notify_abort", "state", "window_released",
                 "error_sense", "immediate", "unsol_datasn", "wait_for")

    def __init__(self, session: "Session", pdu: P.Pdu, cdb: bytes) -> None:
        self.session = session
        self.itt = pdu.itt
        self.raw_lun = pdu.raw_lun
        self.lun = pdu.lun
        self.cdb = cdb
        self.edtl = pdu.u32(20)
        self.read = bool(pdu.flags & P.FLAG_READ)
        self.write = bool(pdu.flags & P.FLAG_WRITE)
        self.attr = pdu.flags & P.ATTR_MASK
        self.cmdsn = pdu.cmdsn
        self.immediate = pdu.immediate
        self.counted = False
        self.buf: bytearray | None = None
        self.received = 0
        self.unsol_end = 0
        self.unsol_next = 0
        self.unsol_datasn = 0
        self.r2t_next = 0
        self.r2tsn = 0
        self.r2ts: dict[int, R2TState] = {}
        self.data_ready: asyncio.Event | None = None
        self.aio: asyncio.Task | None = None
        self.aborted = False
        self.notify_abort = False
        self.state = "queued"
        self.window_released = False
        self.error_sense: bytes | None = None
        self.wait_for: list[Task] | None = None

    @property
    def data_complete(self) -> bool:
        return self.received >= self.edtl


class Session:
    def __init__(self, server: "IscsiServer", conn: "IscsiConnection", result: "LoginResult") -> None:
        self.server = server
        self.conn = conn
        self.params = result.params
        self.target: "IscsiTargetConfig | None" = result.target
        self.discovery = result.discovery
        self.isid = result.isid
        self.tsih = result.tsih
        self.cid = result.cid
        self.window = CmdWindow(result.initial_cmdsn, server.queue_depth)
        self.initiator_name = self.params.initiator_name
        port = f"{self.initiator_name},i,0x{self.isid.hex()}"
        if self.target is not None:
            tport = f"{self.target.iqn},t,0x{self.target.tpgt:04x}"
        else:
            tport = ""
        self.nexus = Nexus(initiator=port, target_port=tport, initiator_name=self.initiator_name,
                           transport_id=iscsi_transport_id(port))
        self.tasks: dict[int, Task] = {}
        self.ttts: dict[int, Task] = {}
        self._ordered: dict[int, Task] = {}     # last ORDERED command per LUN
        self._next_ttt = 1
        self.closed = False
        self.logging_out = False
        self.text_pending: bytes = b""
        self.text_ttt = P.ALL_ONES
        self.text_req = bytearray()
        self.idle = asyncio.Event()
        self.idle.set()
        self.commands = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._aux: set[asyncio.Task] = set()

    # -- helpers ---------------------------------------------------------------
    @property
    def key(self) -> tuple[str, bytes, str]:
        return (self.initiator_name, self.isid, self.target.iqn if self.target else "")

    @property
    def scsi(self):
        return self.target.scsi_target

    def new_ttt(self) -> int:
        while True:
            t = self._next_ttt
            self._next_ttt = (t + 1) & 0x7FFFFFFF or 1
            if t not in self.ttts:
                return t

    def _sn_fields(self, statsn: int | None) -> dict[int, int]:
        f = {28: self.window.exp_cmdsn, 32: self.window.max_cmdsn}
        if statsn is not None:
            f[24] = statsn
        return f

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._aux.add(t)
        t.add_done_callback(self._aux.discard)
        return t

    def reject(self, bhs: bytes, reason: int) -> None:
        log.info("session %s: reject 0x%02x for %s", self.tsih, reason,
                 P.OPCODE_NAMES.get(bhs[0] & 0x3F, hex(bhs[0] & 0x3F)))
        self.conn.send(P.build_bhs(P.OP_REJECT, P.FLAG_FINAL, b2=reason, itt=P.ALL_ONES,
                                   fields=self._sn_fields(self.conn.next_statsn())), bytes(bhs[:P.BHS_LEN]))

    # -- dispatch ----------------------------------------------------------------
    def handle(self, pdu: P.Pdu, placed: bool = False) -> None:
        op = pdu.opcode
        if op == P.OP_DATA_OUT:
            self._data_out(pdu, placed)
            return
        if op == P.OP_NOP_OUT and pdu.itt == P.ALL_ONES:
            return       # answer to our NOP-In, or a ping that wants no reply: liveness only
        if op == P.OP_SNACK_REQ:
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)   # ERL 0: no SNACK
            return
        if op not in (P.OP_NOP_OUT, P.OP_SCSI_CMD, P.OP_TMF_REQ, P.OP_TEXT_REQ, P.OP_LOGOUT_REQ):
            self.reject(pdu.bhs, P.REJECT_CMD_NOT_SUPPORTED)
            return
        if self.discovery and op in (P.OP_SCSI_CMD, P.OP_TMF_REQ):
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return
        if self.logging_out:
            self.reject(pdu.bhs, P.REJECT_WAITING_FOR_LOGOUT)
            return
        if not pdu.immediate:
            verdict = self.window.classify(pdu.cmdsn)
            if verdict != CmdWindow.OK:
                log.warning("session %s: %s CmdSN %d ignored (%s; window %d..%d)", self.tsih,
                            P.OPCODE_NAMES[op], pdu.cmdsn, verdict, self.window.exp_cmdsn,
                            self.window.max_cmdsn)
                return
        if op == P.OP_SCSI_CMD:
            action = self._prepare_scsi(pdu)
        elif op == P.OP_NOP_OUT:
            data = bytes(pdu.data[:self.params.initiator_mrdsl])
            action = lambda counted: self._nop(pdu, data, counted)     # noqa: E731
        elif op == P.OP_TMF_REQ:
            action = lambda counted: self._spawn(self._tmf(pdu, counted))  # noqa: E731
        elif op == P.OP_TEXT_REQ:
            data = bytes(pdu.data)
            action = lambda counted: self._text(pdu, data, counted)    # noqa: E731
        else:
            action = lambda counted: self._spawn(self._logout(pdu, counted))  # noqa: E731
        if pdu.immediate:
            action(False)
        else:
            verdict, ready = self.window.submit(pdu.cmdsn, action)
            for a in ready:
                a(True)

    def _noop(self, counted: bool) -> None:
        if counted:
            self.window.complete()

    # -- SCSI commands ---------------------------------------------------------
    def _prepare_scsi(self, pdu: P.Pdu) -> Callable[[bool], None]:
        itt = pdu.itt
        cdb = bytes(pdu.bhs[32:48])
        if pdu.ahs:
            try:
                for atype, spec in P.iter_ahs(pdu.ahs):
                    if atype == P.AHS_EXTENDED_CDB and len(spec) > 1:
                        cdb = cdb + spec[1:]
            except P.PduError:
                self.reject(pdu.bhs, P.REJECT_INVALID_PDU_FIELD)
                return self._noop
        if itt == P.ALL_ONES or itt in self.tasks:
            self.reject(pdu.bhs, P.REJECT_TASK_IN_PROGRESS if itt in self.tasks
                        else P.REJECT_INVALID_PDU_FIELD)
            return self._noop
        task = Task(self, pdu, cdb)
        dlen = len(pdu.data)
        prm = self.params
        if dlen and not task.write:
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return self._noop
        if dlen and not prm.immediate_data:
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return self._noop
        if task.write:
            if dlen > task.edtl or dlen > prm.first_burst_length:
                self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
                return self._noop
            if task.edtl > self.server.max_cmd_data:
                task.error_sense = SENSE_INVALID_FIELD_CDB
            else:
                task.buf = bytearray(task.edtl)
                if dlen:
                    task.buf[:dlen] = pdu.data
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
        self.tasks[itt] = task
        self.idle.clear()
        self.commands += 1

        def deliver(counted: bool) -> None:
            task.counted = counted
            if task.aborted:
                if task.notify_abort and not self.closed:
                    self._release_window(task)
                    self._send_status(task, TASK_ABORTED, b"")
                self._finish(task)
                return
            task.state = "data"
            task.wait_for = self._ordering_deps(task)
            task.aio = asyncio.get_running_loop().create_task(self._run(task))
        return deliver

    def data_out_destination(self, bhs: bytes, dlen: int) -> memoryview | None:
        """Where the payload of this (not yet complete) Data-Out belongs, if it
        plainly continues one of the task's data sequences; else None."""
        if (bhs[0] & 0x3F) != P.OP_DATA_OUT:
            return None
        itt, ttt = int.from_bytes(bhs[16:20], "big"), int.from_bytes(bhs[20:24], "big")
        off = int.from_bytes(bhs[40:44], "big")
        task = self.tasks.get(itt)
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
        if task is None or task.aborted or task.error_sense is not None:
            log.debug("session %s: Data-Out for unknown/aborted/failed ITT 0x%08x dropped",
                      self.tsih, pdu.itt)
            return
        err = self._check_data_out(task, pdu)
        if err is not None:
            # ERL 0 cannot ask for the data again: the command fails (the
            # connection and the other commands carry on)
            why, sense = err
            log.warning("session %s: ITT 0x%08x: %s", self.tsih, task.itt, why)
            self._fail_task(task, sense)
            return
        off = pdu.u32(40)
        n = len(pdu.data)
        if task.buf is not None and n and not placed:
            task.buf[off:off + n] = pdu.data
        task.received += n
        self.bytes_in += n
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

    async def _run(self, task: Task) -> None:
        try:
            if task.write and task.received < task.edtl and task.error_sense is None:
                task.data_ready = asyncio.Event()
                self._send_r2ts(task)
                await task.data_ready.wait()
                task.data_ready = None
            if task.wait_for:
                # SAM task attributes: an ORDERED command runs after every
                # command delivered before it, and later SIMPLE ones after it
                deps = [t.aio for t in task.wait_for if t.aio is not None and not t.aio.done()]
                task.wait_for = None
                if deps:
                    await asyncio.wait(deps)
            task.state = "exec"
            if task.error_sense is not None:
                self._release_window(task)
                self._send_status(task, CHECK_CONDITION, task.error_sense)
                return
            data_out = memoryview(task.buf) if task.buf is not None else None
            cmd = ScsiCommand(cdb=task.cdb, lun=task.lun, nexus=self.nexus, data_out=data_out,
                              expected_in=task.edtl if task.read else 0, task_tag=task.itt,
                              task_attr=task.attr)
            try:
                rsp = await self.scsi.execute(cmd)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session %s: SCSI layer failed on CDB %s", self.tsih, task.cdb[:1].hex())
                rsp = ScsiResponse(CHECK_CONDITION, SENSE_INTERNAL_FAILURE)
            if task.aborted or self.closed:
                return
            if self.conn.write_paused:
                await self.conn.drain()        # do not pile responses onto a slow reader
                if task.aborted or self.closed:
                    return
            task.state = "done"
            self._release_window(task)
            self._send_result(task, rsp)
            await self.conn.drain()
        except asyncio.CancelledError:
            if task.notify_abort and not self.closed:
                self._release_window(task)
                self._send_status(task, TASK_ABORTED, b"")
        except ProtocolViolation as e:
            self.conn.protocol_error(str(e))
        except Exception:
            log.exception("session %s: task 0x%08x failed", self.tsih, task.itt)
            self.conn.abort("internal error")
        finally:
            self._finish(task)

    def _release_window(self, task: Task) -> None:
        if not task.window_released:
            task.window_released = True
            if task.counted:
                self.window.complete()

    def _finish(self, task: Task) -> None:
        self._release_window(task)
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        for ttt in list(task.r2ts):
            self.ttts.pop(ttt, None)
        task.r2ts.clear()
        task.buf = None
        if not self.tasks:
            self.idle.set()

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
        prm = self.params
        conn = self.conn
        status = rsp.status
        sense = bytes(rsp.sense) if rsp.sense else b""
        edtl = task.edtl
        res_flags = 0
        residual = 0
        n = 0
        dv = None
        if task.read:
            raw = rsp.data_in
            dv = raw if isinstance(raw, memoryview) else memoryview(raw)
            if dv.format != "B" or dv.ndim != 1:
                dv = dv.cast("B")
            xfer = int(rsp.extra.get("transfer_length", len(dv)))
            n = min(len(dv), edtl)
        elif "transfer_length" in rsp.extra:
            xfer = int(rsp.extra["transfer_length"])
        elif task.write:
            tl = data_out_length(task.cdb, block_size_of(self.scsi, task.lun))
            xfer = edtl if tl is None else tl
        else:
            xfer = edtl
        if xfer > edtl:
            res_flags, residual = P.RSP_OVERFLOW, xfer - edtl
        elif xfer < edtl:
            res_flags, residual = P.RSP_UNDERFLOW, edtl - xfer
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
        conn.write_buffers(buffers, n)
        self.bytes_out += n
        if not collapse:
            self._send_status(task, status, sense, flags=res_flags, residual=residual, exp_datasn=datasn)

    # -- NOP -----------------------------------------------------------------------
    def _nop(self, pdu: P.Pdu, data: bytes, counted: bool) -> None:
        self._noop(counted)
        bhs = P.build_bhs(P.OP_NOP_IN, P.FLAG_FINAL, lun=pdu.raw_lun, itt=pdu.itt,
                          fields={20: P.ALL_ONES, **self._sn_fields(self.conn.next_statsn())})
        self.conn.send(bhs, data)

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
        try:
            response = await self._tmf_do(pdu, func, lun)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session %s: TMF %d failed", self.tsih, func)
            response = P.TMF_RSP_REJECTED
        finally:
            self._noop(counted)
        if self.closed:
            return
        self._tmf_rsp(pdu.itt, response)
        if func == P.TMF_TARGET_COLD_RESET and response == P.TMF_RSP_COMPLETE:
            await self.conn.drain()
            for s in self.server.sessions_of(self.target):
                s.conn.close("target cold reset")

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

    # -- text ------------------------------------------------------------------------------
    def _text(self, pdu: P.Pdu, data: bytes, counted: bool) -> None:
        self._noop(counted)
        ttt = pdu.ttt
        if ttt != P.ALL_ONES and ttt == self.text_ttt and self.text_pending:
            self._send_text_chunk(pdu.itt)
            return
        self.text_pending = b""
        self.text_ttt = P.ALL_ONES
        self.text_req += data
        if len(self.text_req) > 65536:
            self.text_req = bytearray()
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return
        if pdu.flags & P.FLAG_CONTINUE:
            self.text_ttt = self.new_ttt() | 0x80000000
            bhs = P.build_bhs(P.OP_TEXT_RSP, 0, itt=pdu.itt,
                              fields={20: self.text_ttt, **self._sn_fields(self.conn.next_statsn())})
            self.conn.send(bhs)
            return
        raw = bytes(self.text_req)
        self.text_req = bytearray()
        try:
            pairs = parse_text(raw)
        except TextError:
            self.reject(pdu.bhs, P.REJECT_PROTOCOL_ERROR)
            return
        out = bytearray()
        for key, value in pairs:
            if key == "SendTargets":
                out += self.server.sendtargets_text(value, self)
            elif key.startswith("X-") or key.startswith("X#"):
                out += encode_text([(key, NOT_UNDERSTOOD)])
            elif key in ("MaxRecvDataSegmentLength", "HeaderDigest", "DataDigest", "MaxBurstLength",
                         "FirstBurstLength", "ImmediateData", "InitialR2T"):
                out += encode_text([(key, REJECT)])     # no renegotiation in FFP
            else:
                out += encode_text([(key, NOT_UNDERSTOOD)])
        self.text_pending = bytes(out)
        self._send_text_chunk(pdu.itt)

    def _send_text_chunk(self, itt: int) -> None:
        limit = self.params.initiator_mrdsl
        chunk, rest = self.text_pending[:limit], self.text_pending[limit:]
        if rest:
            self.text_ttt = self.new_ttt() | 0x80000000
            flags = P.FLAG_CONTINUE
        else:
            self.text_ttt = P.ALL_ONES
            flags = P.FLAG_FINAL
        self.text_pending = rest
        bhs = P.build_bhs(P.OP_TEXT_RSP, flags, itt=itt,
                          fields={20: self.text_ttt, **self._sn_fields(self.conn.next_statsn())})
        self.conn.send(bhs, chunk)

    # -- logout --------------------------------------------------------------------------
    async def _logout(self, pdu: P.Pdu, counted: bool) -> None:
        reason = pdu.flags & 0x7F
        if reason == P.LOGOUT_REMOVE_FOR_RECOVERY:
            self._noop(counted)
            response = P.LOGOUT_RSP_RECOVERY_NOT_SUPPORTED
        elif reason == P.LOGOUT_CLOSE_CONNECTION and pdu.u16(20) != self.cid:
            self._noop(counted)
            response = P.LOGOUT_RSP_CID_NOT_FOUND
        else:
            self.logging_out = True
            # commands still waiting for their Data-Out will not get it: end
            # them; let the ones the SCSI layer is executing finish
            stuck = [t for t in self.tasks.values() if t.state in ("queued", "data")]
            if stuck:
                await self.abort_tasks(stuck, notify=False)
            pending = [t.aio for t in self.tasks.values() if t.aio is not None and not t.aio.done()]
            if pending:
                await asyncio.wait(pending, timeout=LOGOUT_DRAIN)
            self._noop(counted)
            response = P.LOGOUT_RSP_OK
        if self.closed:
            return
        bhs = P.build_bhs(P.OP_LOGOUT_RSP, P.FLAG_FINAL, b2=response, itt=pdu.itt,
                          fields=self._sn_fields(self.conn.next_statsn()))
        # Time2Wait / Time2Retain (bytes 40..43) stay 0: nothing to recover at ERL 0
        self.conn.send(bhs)
        if response == P.LOGOUT_RSP_OK:
            log.info("session %s (%s): logout", self.tsih, self.nexus.initiator)
            self.conn.close("logout")

    def request_logout(self, seconds: int) -> None:
        """Async Message, AsyncEvent 1: ask the initiator to log out within
        ``seconds`` (RFC 7143 11.9.1), e.g. before the target stops."""
        if self.closed:
            return
        bhs = P.build_bhs(P.OP_ASYNC_MSG, P.FLAG_FINAL, lun=0, itt=P.ALL_ONES,
                          fields=self._sn_fields(self.conn.next_statsn()),
                          raw={36: bytes((1, 0)) + (0).to_bytes(4, "big") + min(seconds, 3600).to_bytes(2, "big")})
        self.conn.send(bhs)

    # -- teardown ----------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until no command is in flight."""
        if self.tasks:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("session %s: %d commands still in flight at stop", self.tsih, len(self.tasks))

    def close(self) -> None:
        """Connection gone: drop every task and the nexus."""
        if self.closed:
            return
        self.closed = True
        for t in list(self.tasks.values()):
            t.aborted = True
            if t.aio is not None and not t.aio.done():
                t.aio.cancel()
        self.tasks.clear()
        self.ttts.clear()
        self.window.drop_pending()
        for a in list(self._aux):
            a.cancel()
        self.idle.set()
        self.server._session_closed(self)
        if self.target is not None:
            try:
                self.target.scsi_target.nexus_lost(self.nexus)
            except Exception:
                log.exception("nexus_lost failed")
