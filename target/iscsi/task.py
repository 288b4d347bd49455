"""Per-command state of the iSCSI data path: the Task, its R2T sequences,
SAM task attributes and the sense data the transport itself produces."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import pdu as P

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

ATTR_SIMPLE, ATTR_ORDERED, ATTR_HEAD_OF_QUEUE, ATTR_ACA = 1, 2, 3, 4


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
                 "error_sense", "error_status", "immediate", "unsol_datasn", "wait_for",
                 "charged", "paid_to", "finished", "lane_wait")

    def __init__(self, session: "Session", pdu: P.Pdu, cdb: bytes) -> None:
        self.session = session
        self.itt = pdu.itt
        raw_lun = self.raw_lun = pdu.raw_lun
        # peripheral addressing of LUN < 256, the usual one, decoded inline
        self.lun = raw_lun[1] if raw_lun[0] == 0 else P.decode_lun(raw_lun)
        self.cdb = cdb
        self.edtl = pdu.ttt              # bytes 20..23 of a SCSI Command: its EDTL
        flags = pdu.flags
        self.read = bool(flags & P.FLAG_READ)
        self.write = bool(flags & P.FLAG_WRITE)
        self.attr = flags & P.ATTR_MASK
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
        self.aio: asyncio.Future | None = None     # a Task, or a Deferred answer's future (datapath._answered)
        self.aborted = False
        self.notify_abort = False
        self.state = "queued"
        self.window_released = False
        self.error_sense: bytes | None = None
        self.error_status = 0x02          # CHECK CONDITION, or BUSY/TASK SET FULL (no sense)
        self.charged = 0                  # bytes charged to the session's memory budget
        self.paid_to = 0                  # write data up to this offset is charged
        self.finished = False
        self.wait_for: list[Task] | None = None
        # it may change what a lane write in flight sees (it holds the lanes):
        # it runs once the target's lane writes in flight have ended
        self.lane_wait = False

    def deliver(self, counted: bool) -> None:
        """Its CmdSN came up (``counted``: it holds a CmdSN window slot)."""
        self.session._deliver(self, counted)

    @property
    def data_complete(self) -> bool:
        return self.received >= self.edtl
