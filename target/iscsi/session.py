"""Full feature phase of one iSCSI session (ERL 0, one connection):
PDU dispatch and CmdSN ordering, NOP, text (SendTargets), logout and
teardown. The SCSI data path lives in ``datapath`` and task management in
``tmf`` (both mixed into Session).

Handlers run synchronously from the connection's receive path; a PDU's data
segment is a view into the receive buffer and is copied before returning.
Each delivered SCSI command runs at once: one that waits for nothing is
executed and, if the SCSI layer answers at once, answered right there
without a coroutine (DataPathMixin._run_now); one that must wait starts
eagerly (target.eager) and becomes its own asyncio task only when it
suspends. So commands are handed to the SCSI layer in CmdSN order but
execute concurrently.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from target.scsi.api import Nexus
from target.scsi.constants import COMPARE_AND_WRITE

from ..logsafe import NAME_CLIP, RateLimitedLog, clip
from . import pdu as P
from .cmdsn import CmdWindow
from .datapath import DataPathMixin
from .lane import ENABLED as LANE_ENABLED
from .lane import HOLDS, PLAIN_IO, SessionLane
from .params import NOT_UNDERSTOOD, REJECT, TextError, encode_text, parse_text
from .task import ATTR_ORDERED, ProtocolViolation, Task
from .tmf import ABORT_WAIT, TaskManagementMixin

__all__ = ["Session", "ProtocolViolation", "iscsi_transport_id"]

if TYPE_CHECKING:  # pragma: no cover
    from .connection import IscsiConnection
    from .login import LoginResult
    from .server import IscsiServer, IscsiTargetConfig

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)     # for what a client can trigger once per PDU

LOGOUT_DRAIN = 30.0        # bound on waiting for in-flight commands at logout
#: bound on a lane-holding command's wait for the lane writes in flight (as
#: task management's for the commands it aborts)
LANE_WAIT_S = ABORT_WAIT


def iscsi_transport_id(initiator_port: str) -> bytes:
    """SPC-4 iSCSI TransportID, format 01h (initiator port name with ISID)."""
    name = initiator_port.encode()
    # "<name>,i,0x<isid>" NUL terminated, padded to a multiple of 4
    body = name + b"\0"
    body += b"\0" * ((-len(body)) & 3)
    if len(body) < 20:
        body += b"\0" * (20 - len(body))     # SPC-4: ADDITIONAL LENGTH at least 20
    return bytes((0x40 | 0x05, 0)) + len(body).to_bytes(2, "big") + body


class Session(DataPathMixin, TaskManagementMixin):
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
        self.budget = server.memory.session(
            f"{self.tsih} ({clip(self.initiator_name, NAME_CLIP)})",
            # not from inside another command's budget request: on the next turn
            evict=lambda: conn.loop.call_soon(conn.abort, "over its memory budget"))
        self.immediate_inflight = 0
        # no digests: the common answers' headers are packed as they go out
        # (else they take the general path); the most Data-In one PDU may
        # carry then
        prm = self.params
        self.plain_pdus = not (prm.header_digest or prm.data_digest)
        self.single_data_in = min(prm.initiator_mrdsl, prm.max_burst_length) if self.plain_pdus else 0
        self._scsi_target = None                # the ScsiTarget _scsi_submit is for
        self._scsi_submit = None
        # the native READ lane (lane.py); LIVERESTORE_ISCSI_LANE=0 turns it off
        self.lane = SessionLane(self) if LANE_ENABLED and self.plain_pdus and not self.discovery else None
        self._lane_holds: list[Task] = []       # our commands that hold every lane of the target

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
        ratelog.info("reject", "session %s: reject 0x%02x for %s", self.tsih, reason,
                     P.OPCODE_NAMES.get(bhs[0] & 0x3F, hex(bhs[0] & 0x3F)))
        self.conn.send(P.build_bhs(P.OP_REJECT, P.FLAG_FINAL, b2=reason, itt=P.ALL_ONES,
                                   fields=self._sn_fields(self.conn.next_statsn())), bytes(bhs[:P.BHS_LEN]))

    # -- the native lane --------------------------------------------------------
    def lane_hold(self, task: Task) -> bool:
        """A command that may change any nexus's route starts: every lane of
        the target stops answering until it ends (lane_release). An ORDERED
        READ/WRITE holds too: the SIMPLE commands behind it wait for its end
        (SAM), which only Python's path does (_ordering_deps). True if it
        must not run before the target's lane writes in flight end
        (lane_writes_end): an ORDERED command runs after every command
        before it, and a COMPARE AND WRITE is atomic against every write;
        other commands may overlap a SIMPLE write in flight, as they may
        one on Python's path."""
        if task.cdb[0] in PLAIN_IO and task.attr != ATTR_ORDERED:
            return False
        self._lane_holds.append(task)
        self.lanes_stop()
        return (task.attr == ATTR_ORDERED or task.cdb[0] == COMPARE_AND_WRITE) and any(
            s.lane is not None and s.lane.native.writes_inflight
            for s in self.server.sessions_of(self.target))

    async def lane_writes_end(self) -> None:
        """Until the lane writes of every session of the target in flight
        now have ended (none starts meanwhile: the caller holds the lanes).
        Bounded as task management's wait for them is."""
        ends = [s.lane.writes_end() for s in self.server.sessions_of(self.target)
                if s.lane is not None and s.lane.native.writes_inflight]
        if ends:
            try:
                await asyncio.wait_for(asyncio.gather(*ends), LANE_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("session %s: lane writes still in flight after %.0f s; "
                            "running the command that waited for them", self.tsih, LANE_WAIT_S)

    def lanes_stop(self) -> None:
        """No lane of the target answers until lanes_go."""
        HOLDS[id(self.target)] = HOLDS.get(id(self.target), 0) + 1
        for s in self.server.sessions_of(self.target):
            if s.lane is not None:
                s.lane.revoke_all()

    def lane_release(self, task: Task) -> None:
        if task not in self._lane_holds:
            return
        self._lane_holds.remove(task)
        self.lanes_go()

    def lanes_go(self) -> None:
        key = id(self.target)
        HOLDS[key] -= 1
        if not HOLDS[key]:
            del HOLDS[key]
            for s in self.server.sessions_of(self.target):
                if s.lane is not None:
                    s.lane.check()

    # -- dispatch ----------------------------------------------------------------
    def handle(self, pdu: P.Pdu, placed: bool = False) -> None:
        op = pdu.opcode
        if (op == P.OP_SCSI_CMD and not pdu.immediate and not self.discovery
                and not self.logging_out and self.window.take_next(pdu.cmdsn)):
            # the common case first: the next command in CmdSN order, which
            # runs now (what the general path below comes to for it)
            task = self._prepare_scsi(pdu, placed)
            if task is None:
                self._noop(True)
            else:
                self._deliver(task, True)
            return
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
                ratelog.warning("cmdsn-window", "session %s: %s CmdSN %d ignored (%s; window %d..%d)",
                                self.tsih, P.OPCODE_NAMES[op], pdu.cmdsn, verdict,
                                self.window.exp_cmdsn, self.window.max_cmdsn)
                return
        if op == P.OP_SCSI_CMD:
            task = self._prepare_scsi(pdu, placed)
            action = self._noop if task is None else task.deliver
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
            for a in self.window.accept(pdu.cmdsn, action):
                a(True)

    def _noop(self, counted: bool) -> None:
        if counted:
            self.window.complete()

    # -- NOP -----------------------------------------------------------------------
    def _nop(self, pdu: P.Pdu, data: bytes, counted: bool) -> None:
        self._noop(counted)
        bhs = P.build_bhs(P.OP_NOP_IN, P.FLAG_FINAL, lun=pdu.raw_lun, itt=pdu.itt,
                          fields={20: P.ALL_ONES, **self._sn_fields(self.conn.next_statsn())})
        self.conn.send(bhs, data)

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
            if self.lane is not None:
                self.lane.revoke_all()
                await self.lane.drained()     # their answers go out before ours
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
            log.info("session %s (%s): logout", self.tsih, clip(self.nexus.initiator, NAME_CLIP))
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
        self.budget.close()
        for t in self._lane_holds[:]:
            self.lane_release(t)
        if self.lane is not None:
            self.lane.close()
        self.server._session_closed(self)
        if self.target is not None:
            try:
                self.target.scsi_target.nexus_lost(self.nexus)
            except Exception:
                log.exception("nexus_lost failed")
