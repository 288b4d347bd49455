"""The command ring of one TCMU device, as the user side sees it.

Pure logic over the shared mapping (an ``mmap`` in production, any writable
buffer in tests): no I/O, no event loop.

``fetch()`` walks the entries the kernel published (our parse position up to
``mailbox.cmd_head``, modulo ``cmdr_size``), skipping PAD entries, and returns
a :class:`Request` per CMD entry with the CDB and iovecs *copied out* of the
ring: once ``cmd_tail`` moves past an entry the kernel may reuse its space.

``complete()`` writes a response and moves ``cmd_tail``. The kernel reclaims
ring space and looks commands up strictly in ring order from its last
cleaned position up to ``cmd_tail``, reading ``hdr.cmd_id`` of each CMD
entry it passes. Two ways to complete commands that finish out of order:

* kernel advertises ``TCMU_MAILBOX_FLAG_CAP_OOOC`` (every kernel since
  4.x; libtcmu's ``tcmulib_command_complete`` does this): the response goes
  into the first CMD entry at ``cmd_tail`` with ``hdr.cmd_id`` rewritten to
  the finished command's id, and the tail moves over that one entry (and
  over PAD/TMR entries before and after it). The command whose request
  occupied that slot is unaffected: its CDB/iovecs were copied on fetch and
  its data buffers belong to its cmd_id until the kernel sees its own
  completion.
* no CAP_OOOC: the response is written into the command's own entry and the
  tail moves only over a prefix of completed entries (head-of-line blocking).

Either way the tail only passes entries we have parsed, in ring order.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from . import abi


_ZERO_RSP_HEAD = bytes(8)
CHECK_CONDITION = 0x02


class RingError(Exception):
    """The shared ring holds something impossible (corrupt or wrong ABI)."""


@dataclass
class Request:
    cmd_id: int
    cdb: bytes
    iovs: list[tuple[int, int]]          # (offset into map, length): Data-Out or Data-In
    bidi_iovs: list[tuple[int, int]] = field(default_factory=list)   # Data-In of bidi commands
    slot: int = 0                        # entry offset within the command ring
    kflags: int = 0

    @property
    def data_length(self) -> int:
        return sum(n for _, n in self.iovs)

    @property
    def in_iovs(self) -> list[tuple[int, int]]:
        return self.bidi_iovs if self.bidi_iovs else self.iovs


@dataclass
class TmrNotice:
    tmr_type: int
    cmd_ids: list[int]


@dataclass
class _Slot:
    off: int                  # offset within the ring
    length: int
    is_cmd: bool
    done: bool = False


class Ring:
    def __init__(self, buf, *, ooo: bool | None = None) -> None:
        self.mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        version, flags, cmdr_off, cmdr_size, _ = abi.MAILBOX_HDR.unpack_from(self.mv, 0)
        if version != abi.TCMU_MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}, expected {abi.TCMU_MAILBOX_VERSION}")
        if cmdr_size == 0 or cmdr_size % abi.TCMU_OP_ALIGN_SIZE or cmdr_off + cmdr_size > len(self.mv):
            raise RingError(f"bad command ring: off {cmdr_off} size {cmdr_size} map {len(self.mv)}")
        self.flags = flags
        self.cmdr_off = cmdr_off
        self.cmdr_size = cmdr_size
        self.ooo = bool(flags & abi.TCMU_MAILBOX_FLAG_CAP_OOOC) if ooo is None else ooo
        self.read_len = bool(flags & abi.TCMU_MAILBOX_FLAG_CAP_READ_LEN)
        self.parse = self.tail              # next entry we have not looked at
        self._slots: collections.deque[_Slot] = collections.deque()   # tail .. parse, ring order
        self.tmr: list[TmrNotice] = []
        self.out_of_order = 0               # completions written into another command's slot

    # -- mailbox -------------------------------------------------------------------
    @property
    def head(self) -> int:
        return abi.U32.unpack_from(self.mv, abi.MB_CMD_HEAD)[0]

    @property
    def tail(self) -> int:
        return abi.U32.unpack_from(self.mv, abi.MB_CMD_TAIL)[0]

    def _set_tail(self, value: int) -> None:
        abi.U32.pack_into(self.mv, abi.MB_CMD_TAIL, value)

    def in_flight(self) -> int:
        """CMD entries fetched whose slot the tail has not passed."""
        return sum(1 for s in self._slots if s.is_cmd and not s.done)

    # -- kernel -> user ----------------------------------------------------------------
    def fetch(self) -> list[Request]:
        """Parse every entry between our parse position and cmd_head."""
        head = self.head
        if head >= self.cmdr_size or head % abi.TCMU_OP_ALIGN_SIZE:
            raise RingError(f"cmd_head {head} outside ring of {self.cmdr_size}")
        out: list[Request] = []
        base = self.cmdr_off
        steps = 0
        while self.parse != head:
            steps += 1
            if steps > self.cmdr_size // abi.TCMU_OP_ALIGN_SIZE:
                raise RingError("ring walk does not reach cmd_head")
            off = self.parse
            len_op, cmd_id, kflags, _uflags = abi.ENT_HDR.unpack_from(self.mv, base + off)
            op = abi.hdr_get_op(len_op)
            length = abi.hdr_get_len(len_op)
            if length == 0 or length % abi.TCMU_OP_ALIGN_SIZE or off + length > self.cmdr_size:
                raise RingError(f"entry at {off}: bad length {length} (op {op})")
            if op == abi.TCMU_OP_CMD:
                out.append(self._parse_cmd(off, length, cmd_id, kflags))
                self._slots.append(_Slot(off, length, True))
            else:
                if op == abi.TCMU_OP_TMR:
                    tmr_type, _, _, cnt, _, _ = abi.TMR.unpack_from(self.mv, base + off + 8)
                    cnt = min(cnt, (length - abi.TMR_CMD_IDS_OFF) // 2)
                    ids = [int.from_bytes(self.mv[base + off + abi.TMR_CMD_IDS_OFF + 2 * i:
                                                  base + off + abi.TMR_CMD_IDS_OFF + 2 * i + 2], "little")
                           for i in range(cnt)]
                    self.tmr.append(TmrNotice(tmr_type, ids))
                elif op != abi.TCMU_OP_PAD:
                    # as libtcmu: flag it and pass over it
                    self.mv[base + off + abi.ENT_UFLAGS] |= abi.TCMU_UFLAG_UNKNOWN_OP
                self._slots.append(_Slot(off, length, False, True))
            self.parse = (off + length) % self.cmdr_size
        self._advance()
        return out

    def _parse_cmd(self, off: int, length: int, cmd_id: int, kflags: int) -> Request:
        p = self.cmdr_off + off
        iov_cnt, bidi, dif, cdb_off, _, _ = abi.REQ.unpack_from(self.mv, p + abi.REQ_OFF)
        n = iov_cnt + bidi + dif
        if abi.REQ_IOV_OFF + n * abi.IOVEC.size > length:
            raise RingError(f"entry at {off}: {n} iovecs do not fit in {length} bytes")
        iovs = []
        limit = len(self.mv)
        for i in range(iov_cnt + bidi):
            b, ln = abi.IOVEC.unpack_from(self.mv, p + abi.REQ_IOV_OFF + i * abi.IOVEC.size)
            if b + ln > limit:
                raise RingError(f"cmd {cmd_id}: iovec {b}+{ln} outside the map")
            iovs.append((b, ln))
        if cdb_off >= limit:
            raise RingError(f"cmd {cmd_id}: cdb offset {cdb_off} outside the map")
        first = self.mv[cdb_off]
        clen = abi.cdb_length(first, self.mv[cdb_off + 7] if cdb_off + 7 < limit else 0)
        cdb = bytes(self.mv[cdb_off:min(cdb_off + clen, limit)])
        return Request(cmd_id, cdb, iovs[:iov_cnt], iovs[iov_cnt:], off, kflags)

    # -- user -> kernel ----------------------------------------------------------------
    def complete(self, req: Request, status: int, sense: bytes = b"", *,
                 read_len: int | None = None, unknown_op: bool = False) -> None:
        """Write the response of ``req`` and move cmd_tail as far as allowed."""
        if self.ooo:
            # _advance leaves a pending CMD slot (or nothing) at the front:
            # non-CMD slots are born done and done slots at the front go
            slot = self._slots[0] if self._slots else None
            if slot is None or slot.done:
                raise RingError(f"completion of cmd {req.cmd_id} with no pending ring slot")
            if slot.off != req.slot:
                self.out_of_order += 1
        else:
            slot = next((s for s in self._slots if s.is_cmd and s.off == req.slot and not s.done), None)
            if slot is None:
                raise RingError(f"cmd {req.cmd_id}: slot {req.slot} not pending")
        p = self.cmdr_off + slot.off
        len_op, _cmd_id, kflags, uflags = abi.ENT_HDR.unpack_from(self.mv, p)
        uflags &= ~(abi.TCMU_UFLAG_UNKNOWN_OP | abi.TCMU_UFLAG_READ_LEN)
        if unknown_op:
            uflags |= abi.TCMU_UFLAG_UNKNOWN_OP
        if read_len is not None and self.read_len:
            uflags |= abi.TCMU_UFLAG_READ_LEN
        # response first, header (cmd_id) last, then the tail
        mv = self.mv
        mv[p + 8:p + abi.RSP_SENSE_OFF] = _ZERO_RSP_HEAD
        mv[p + abi.RSP_STATUS_OFF] = status & 0xFF
        if read_len is not None and self.read_len:
            abi.U32.pack_into(mv, p + abi.RSP_READ_LEN_OFF, read_len)
        if sense or status == CHECK_CONDITION:
            # the kernel reads the sense buffer only with CHECK CONDITION
            s = bytes(sense[:abi.TCMU_SENSE_BUFFERSIZE]).ljust(abi.TCMU_SENSE_BUFFERSIZE, b"\0")
            mv[p + abi.RSP_SENSE_OFF:p + abi.RSP_SENSE_OFF + abi.TCMU_SENSE_BUFFERSIZE] = s
        abi.ENT_HDR.pack_into(self.mv, p, len_op, req.cmd_id, kflags, uflags)
        slot.done = True
        self._advance()

    def _advance(self) -> None:
        tail = self.tail
        moved = False
        while self._slots and self._slots[0].done:
            s = self._slots.popleft()
            if s.off != tail:
                raise RingError(f"tail {tail} out of step with slot {s.off}")
            tail = (tail + s.length) % self.cmdr_size
            moved = True
        if moved:
            self._set_tail(tail)

    def reset(self) -> None:
        """Forget everything (after the kernel reset the ring: head = tail = 0)."""
        self._slots.clear()
        self.parse = self.tail
