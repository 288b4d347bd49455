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
import struct
from dataclasses import dataclass, field

from . import abi


CHECK_CONDITION = 0x02
# the ABI's names the per-command code reads, as module globals (one lookup
# each instead of two: this code runs per command)
_ENT_HDR, _REQ_HEAD, _IOVEC, _U32 = abi.ENT_HDR, abi.REQ_HEAD, abi.IOVEC, abi.U32
_REQ_OFF, _REQ_IOV_OFF, _IOVEC_SIZE = abi.REQ_OFF, abi.REQ_IOV_OFF, abi.IOVEC.size
_OP_MASK, _OP_CMD, _MB_CMD_TAIL = abi.TCMU_OP_MASK, abi.TCMU_OP_CMD, abi.MB_CMD_TAIL
_ALIGN_MASK = abi.TCMU_OP_ALIGN_SIZE - 1
_LEN_MASK = ~abi.TCMU_OP_MASK & 0xFFFFFFFF
_FLAGS = struct.Struct("=BB")               # kflags, uflags of an entry header
_ID_FLAGS = struct.Struct("=HBB")           # cmd_id, kflags, uflags


class RingError(Exception):
    """The shared ring holds something impossible (corrupt or wrong ABI)."""


@dataclass(slots=True)
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


# A fetched CMD entry the tail has not passed: [offset, end, done], where
# end is where the tail goes once it passes the entry: past it and past the
# PAD/TMR entries that follow it (those need no completion).
_OFF, _END, _DONE = 0, 1, 2


# iovec arrays by count: one unpack per command instead of one per iovec
_IOVECS = [struct.Struct(f"={2 * n}Q") for n in range(9)]


def _iovecs(n: int) -> struct.Struct:
    return _IOVECS[n] if n < len(_IOVECS) else struct.Struct(f"={2 * n}Q")


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
        self._slots: collections.deque[list] = collections.deque()    # pending CMD entries, ring order
        self.tmr: list[TmrNotice] = []
        self.out_of_order = 0               # completions written into another command's slot

    # -- mailbox -------------------------------------------------------------------
    @property
    def head(self) -> int:
        return abi.U32.unpack_from(self.mv, abi.MB_CMD_HEAD)[0]

    @property
    def tail(self) -> int:
        return abi.U32.unpack_from(self.mv, abi.MB_CMD_TAIL)[0]

    def in_flight(self) -> int:
        """CMD entries fetched whose slot the tail has not passed."""
        return sum(1 for s in self._slots if not s[_DONE])

    # -- kernel -> user ----------------------------------------------------------------
    def fetch(self) -> list[Request]:
        """Parse every entry between our parse position and cmd_head."""
        head = self.head
        if head >= self.cmdr_size or head % abi.TCMU_OP_ALIGN_SIZE:
            raise RingError(f"cmd_head {head} outside ring of {self.cmdr_size}")
        if self.parse == head:
            return []
        out: list[Request] = []
        mv, base, size, slots = self.mv, self.cmdr_off, self.cmdr_size, self._slots
        off = self.parse
        tail = None                 # where the tail goes now: PAD/TMR entries with no CMD before them
        for _ in range(size // abi.TCMU_OP_ALIGN_SIZE):     # a corrupt ring cannot loop us forever
            if off == head:
                break
            len_op, cmd_id, kflags, _uflags = _ENT_HDR.unpack_from(mv, base + off)
            op = len_op & _OP_MASK
            length = len_op & _LEN_MASK
            if length == 0 or length & _ALIGN_MASK or off + length > size:
                raise RingError(f"entry at {off}: bad length {length} (op {op})")
            end = (off + length) % size
            if op == _OP_CMD:
                out.append(self._parse_cmd(off, length, cmd_id, kflags))
                slots.append([off, end, False])
            else:
                self._note_other(op, off, length)
                if slots:
                    slots[-1][_END] = end
                else:
                    tail = end
            off = end
        else:
            if off != head:
                raise RingError("ring walk does not reach cmd_head")
        self.parse = off
        if tail is not None:
            self._set_tail(tail)
        return out

    def _note_other(self, op: int, off: int, length: int) -> None:
        """A PAD (nothing to do), a TMR notice, or an entry we do not know."""
        base = self.cmdr_off
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

    def _parse_cmd(self, off: int, length: int, cmd_id: int, kflags: int) -> Request:
        mv = self.mv
        p = self.cmdr_off + off
        iov_cnt, bidi, dif, cdb_off = _REQ_HEAD.unpack_from(mv, p + _REQ_OFF)
        n = iov_cnt + bidi
        if _REQ_IOV_OFF + (n + dif) * _IOVEC_SIZE > length:
            raise RingError(f"entry at {off}: {n + dif} iovecs do not fit in {length} bytes")
        limit = len(mv)
        if n == 1:
            b, ln = _IOVEC.unpack_from(mv, p + _REQ_IOV_OFF)
            iovs = [(b, ln)]
        else:
            flat = _iovecs(n).unpack_from(mv, p + _REQ_IOV_OFF)
            iovs = list(zip(flat[0::2], flat[1::2]))
        for b, ln in iovs:
            if b + ln > limit:
                raise RingError(f"cmd {cmd_id}: iovec {b}+{ln} outside the map")
        if cdb_off >= limit:
            raise RingError(f"cmd {cmd_id}: cdb offset {cdb_off} outside the map")
        clen = abi.cdb_length(mv[cdb_off], mv[cdb_off + 7] if cdb_off + 7 < limit else 0)
        cdb = bytes(mv[cdb_off:min(cdb_off + clen, limit)])
        if bidi:
            return Request(cmd_id, cdb, iovs[:iov_cnt], iovs[iov_cnt:], off, kflags)
        return Request(cmd_id, cdb, iovs, [], off, kflags)

    # -- user -> kernel ----------------------------------------------------------------
    def complete(self, req: Request, status: int, sense: bytes = b"", *,
                 read_len: int | None = None, unknown_op: bool = False) -> None:
        """Write the response of ``req`` and move cmd_tail as far as allowed."""
        slots = self._slots
        if self.ooo:
            # the first pending entry takes the response, whoever's it was,
            # and the tail passes it (and the PAD/TMR entries after it)
            if not slots:
                raise RingError(f"completion of cmd {req.cmd_id} with no pending ring slot")
            slot = slots.popleft()
            if slot[_OFF] != req.slot:
                self.out_of_order += 1
            self._respond(slot[_OFF], req.cmd_id, status, sense, read_len, unknown_op)
            _U32.pack_into(self.mv, _MB_CMD_TAIL, slot[_END])      # _set_tail, per command
            return
        slot = next((s for s in slots if s[_OFF] == req.slot and not s[_DONE]), None)
        if slot is None:
            raise RingError(f"cmd {req.cmd_id}: slot {req.slot} not pending")
        self._respond(slot[_OFF], req.cmd_id, status, sense, read_len, unknown_op)
        slot[_DONE] = True
        if slot is slots[0]:
            # the tail passes the done entries at the front
            while slots and slots[0][_DONE]:
                tail = slots.popleft()[_END]
            self._set_tail(tail)

    def _respond(self, off: int, cmd_id: int, status: int, sense: bytes, read_len: int | None,
                 unknown_op: bool) -> None:
        """Write a response into the CMD entry at ``off``: status, read_len
        and sense first, the header (cmd_id, flags) last."""
        mv = self.mv
        p = self.cmdr_off + off
        kflags, uflags = _FLAGS.unpack_from(mv, p + 6)
        uflags &= ~(abi.TCMU_UFLAG_UNKNOWN_OP | abi.TCMU_UFLAG_READ_LEN)
        if unknown_op:
            uflags |= abi.TCMU_UFLAG_UNKNOWN_OP
        if read_len is not None and self.read_len:
            uflags |= abi.TCMU_UFLAG_READ_LEN
        else:
            read_len = 0
        abi.RSP_HEAD.pack_into(mv, p + abi.RSP_STATUS_OFF, status & 0xFF, read_len)
        if sense or status == CHECK_CONDITION:
            # the kernel reads the sense buffer only with CHECK CONDITION
            s = bytes(sense[:abi.TCMU_SENSE_BUFFERSIZE]).ljust(abi.TCMU_SENSE_BUFFERSIZE, b"\0")
            mv[p + abi.RSP_SENSE_OFF:p + abi.RSP_SENSE_OFF + abi.TCMU_SENSE_BUFFERSIZE] = s
        _ID_FLAGS.pack_into(mv, p + 4, cmd_id, kflags, uflags)

    def _set_tail(self, tail: int) -> None:
        _U32.pack_into(self.mv, _MB_CMD_TAIL, tail)

    def reset(self) -> None:
        """Forget everything (after the kernel reset the ring: head = tail = 0)."""
        self._slots.clear()
        self.parse = self.tail
