"""Plays target_core_user's side of a TCMU ring for tests.

The layout is written independently of target.tcmu.abi, from the uapi
header's numbers: mailbox {u16 version; u16 flags; u32 cmdr_off; u32
cmdr_size; u32 cmd_head; u32 cmd_tail aligned 64}, entry header {u32 len_op;
u16 cmd_id; u8 kflags; u8 uflags}, req {u32 iov_cnt, iov_bidi_cnt,
iov_dif_cnt; u64 cdb_off; u64 pad1, pad2; struct iovec iov[]} at 8 -- the
inner struct is not packed, so cdb_off is at entry offset 24 and iov[] at
48 --, rsp {u8 scsi_status; u8; u16; u32 read_len; char sense[96]} at 8.
Entry sizes as the kernel computes them: max(offsetof(iov[n]) = 48 + 16n,
sizeof(entry)=112) +
round_up(cdb_len, 8); a PAD fills the ring's end when an entry does not fit.
Completions are consumed as tcmu_handle_completions does: from the last
cleaned offset up to cmd_tail, looking each CMD entry's cmd_id up.
"""
from __future__ import annotations

import asyncio
import mmap
import socket
import struct

CMDR_OFF = 128        # sizeof(struct tcmu_mailbox), as the 6.1 guest kernel reports


def round8(n: int) -> int:
    return (n + 7) & ~7


class Completion:
    def __init__(self, cmd_id, status, sense, uflags, read_len, data_in, slot):
        self.cmd_id = cmd_id
        self.status = status
        self.sense = sense
        self.uflags = uflags
        self.read_len = read_len
        self.data_in = data_in
        self.slot = slot

    def __repr__(self) -> str:
        return f"Completion(id={self.cmd_id}, status={self.status:#x}, slot={self.slot})"


class FakeKernel:
    def __init__(self, *, cmdr_size: int = 4096, data_size: int = 1 << 20, flags: int = 0b1111,
                 block: int = 4096) -> None:
        self.cmdr_size = cmdr_size
        self.data_off = CMDR_OFF + cmdr_size
        self.size = self.data_off + data_size
        self.map = mmap.mmap(-1, self.size)
        struct.pack_into("=HHIII", self.map, 0, 2, flags, CMDR_OFF, cmdr_size, 0)
        struct.pack_into("=I", self.map, 64, 0)
        self.user_sock, self.kern_sock = socket.socketpair()
        self.kern_sock.setblocking(False)
        self.block = block
        self.next_block = 0
        self.data_blocks = data_size // block
        self.last_cleaned = 0
        self.next_id = 1
        self.pending: dict[int, dict] = {}     # cmd_id -> iovs etc.
        self.slots: list[tuple[int, str]] = []  # (offset, "pad"/"cmd") in order written

    # -- mailbox ------------------------------------------------------------------
    @property
    def head(self) -> int:
        return struct.unpack_from("=I", self.map, 12)[0]

    @head.setter
    def head(self, v: int) -> None:
        struct.pack_into("=I", self.map, 12, v)

    @property
    def tail(self) -> int:
        return struct.unpack_from("=I", self.map, 64)[0]

    # -- helpers -------------------------------------------------------------------
    def _alloc(self, n: int, pieces: int) -> list[tuple[int, int]]:
        """n bytes of data area split into ``pieces`` non-adjacent iovecs."""
        iovs = []
        left = n
        for i in range(pieces):
            take = left if i == pieces - 1 else max(1, n // pieces)
            nblocks = max(1, -(-take // self.block)) + 1        # +1 keeps pieces apart
            if self.next_block + nblocks > self.data_blocks:
                self.next_block = 0
            off = self.data_off + self.next_block * self.block
            self.next_block += nblocks
            iovs.append((off, take))
            left -= take
        return iovs

    def _put_entry(self, length: int) -> int:
        """Ring offset for an entry of ``length`` bytes, PAD-ing the end if needed."""
        head = self.head
        if head + length > self.cmdr_size:
            pad = self.cmdr_size - head
            struct.pack_into("=IHBB", self.map, CMDR_OFF + head, pad | 0, 0, 0, 0)
            self.slots.append((head, "pad"))
            head = 0
        return head

    def fits(self, cdb_len: int, n_iovs: int) -> bool:
        """is_ring_space_avail(): room for the entry (and a PAD before it)
        between cmd_head and the last entry the kernel cleaned."""
        length = max(48 + 16 * n_iovs, 112) + round8(cdb_len)
        head = self.head
        used = (head - self.last_cleaned) % self.cmdr_size
        free = self.cmdr_size - used - 1
        needed = length + (self.cmdr_size - head if head + length > self.cmdr_size else 0)
        return free >= needed

    def submit(self, cdb: bytes, *, data_out: bytes | None = None, data_in: int = 0,
               pieces: int = 1, bidi_in: int = 0, fill: int = 0xAA, notify: bool = True) -> int:
        cmd_id = self.next_id
        self.next_id = (self.next_id % 0xFFFF) + 1
        iovs: list[tuple[int, int]] = []
        if data_out is not None:
            iovs = self._alloc(len(data_out), pieces)
            pos = 0
            for off, n in iovs:
                self.map[off:off + n] = data_out[pos:pos + n]
                pos += n
        elif data_in:
            iovs = self._alloc(data_in, pieces)
            for off, n in iovs:
                self.map[off:off + n] = bytes([fill]) * n
        bidi = self._alloc(bidi_in, 1) if bidi_in else []
        n = len(iovs) + len(bidi)
        base = max(48 + 16 * n, 112)
        length = base + round8(len(cdb))
        off = self._put_entry(length)
        p = CMDR_OFF + off
        self.map[p:p + length] = bytes(length)
        struct.pack_into("=IHBB", self.map, p, length | 1, cmd_id, 0, 0)
        cdb_off = p + base
        struct.pack_into("=IIIIQQQ", self.map, p + 8, len(iovs), len(bidi), 0, 0, cdb_off, 0, 0)
        for i, (b, ln) in enumerate(iovs + bidi):
            struct.pack_into("=QQ", self.map, p + 48 + 16 * i, b, ln)
        self.map[cdb_off:cdb_off + len(cdb)] = cdb
        self.pending[cmd_id] = {"iovs": iovs, "bidi": bidi, "in": bool(data_in) or bool(bidi)}
        self.slots.append((off, "cmd"))
        self.head = (off + length) % self.cmdr_size
        if notify:
            self.notify()
        return cmd_id

    def submit_raw(self, op: int, length: int, notify: bool = True) -> int:
        off = self._put_entry(length)
        self.map[CMDR_OFF + off:CMDR_OFF + off + length] = bytes(length)
        struct.pack_into("=IHBB", self.map, CMDR_OFF + off, length | op, 0, 0, 0)
        self.slots.append((off, f"op{op}"))
        self.head = (off + length) % self.cmdr_size
        if notify:
            self.notify()
        return off

    def notify(self) -> None:
        self.kern_sock.send(b"\1\0\0\0")

    # -- completions (tcmu_handle_completions) ----------------------------------------
    def reap(self) -> list[Completion]:
        out = []
        tail = self.tail
        for _ in range(self.cmdr_size // 8):
            if self.last_cleaned == tail:
                break
            p = CMDR_OFF + self.last_cleaned
            len_op, cmd_id, _k, uflags = struct.unpack_from("=IHBB", self.map, p)
            op, length = len_op & 7, len_op & ~7
            assert length, "zero-length entry under the tail"
            if op in (0, 2) or op > 2:
                self.last_cleaned = (self.last_cleaned + length) % self.cmdr_size
                continue
            assert op == 1
            assert cmd_id in self.pending, f"cmd_id {cmd_id} not found, ring is broken"
            info = self.pending.pop(cmd_id)
            status = self.map[p + 8]
            read_len = struct.unpack_from("=I", self.map, p + 12)[0]
            sense = bytes(self.map[p + 16:p + 16 + 96])
            data = b""
            if info["in"]:
                src = info["bidi"] or info["iovs"]
                data = b"".join(self.map[b:b + n] for b, n in src)
                if uflags & 2:
                    data = data[:read_len]
            out.append(Completion(cmd_id, status, sense, uflags, read_len, data, self.last_cleaned))
            self.last_cleaned = (self.last_cleaned + length) % self.cmdr_size
        else:
            raise AssertionError("tail walk did not terminate")
        return out

    async def wait_doorbell(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_recv(self.kern_sock, 4), timeout)
        # drain further doorbells already queued
        try:
            while self.kern_sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    async def wait_completions(self, count: int, timeout: float = 5.0) -> list[Completion]:
        got: list[Completion] = []
        for _ in range(count + 10):
            got += self.reap()
            if len(got) >= count:
                return got
            await self.wait_doorbell(timeout)
        got += self.reap()
        return got

    def close(self) -> None:
        self.user_sock.close()
        self.kern_sock.close()
        try:
            self.map.close()
        except BufferError:
            pass
