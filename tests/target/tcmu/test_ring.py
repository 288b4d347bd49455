"""TcmuDevice against a fake kernel: a ring laid out like target_core_user's."""
from __future__ import annotations

import asyncio
import struct

import pytest

from target.scsi.api import CHECK_CONDITION, GOOD, ScsiResponse
from target.tcmu import abi
from target.tcmu import native_device as native
from target.tcmu.device import TcmuDevice
from target.tcmu.native_device import NativeTcmuDevice
from target.tcmu.ring import Ring, RingError

from .fake_kernel import CMDR_OFF, FakeKernel

ILLEGAL_OPCODE = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])


class MemTarget:
    """READ(10)/WRITE(10)/INQUIRY over a bytearray; gates hold chosen LBAs."""

    def __init__(self, blocks: int = 256, bs: int = 512) -> None:
        self.bs = bs
        self.data = bytearray(blocks * bs)
        self.gates: dict[int, asyncio.Event] = {}
        self.seen = []

    async def execute(self, cmd):
        self.seen.append(cmd)
        op = cmd.cdb[0]
        if op in (0x28, 0x2A):
            lba, n = struct.unpack(">I", cmd.cdb[2:6])[0], struct.unpack(">H", cmd.cdb[7:9])[0]
            if lba in self.gates:
                await self.gates[lba].wait()
            a, b = lba * self.bs, (lba + n) * self.bs
            if op == 0x28:
                return ScsiResponse(GOOD, b"", bytes(self.data[a:b]))
            assert cmd.data_out is not None and len(cmd.data_out) == b - a
            self.data[a:b] = cmd.data_out
            return ScsiResponse(GOOD)
        if op == 0x12:
            return ScsiResponse(GOOD, b"", b"\0\0\x06\x02\x1f" + b"X" * 31)
        if op == 0xEE:
            raise RuntimeError("boom")
        if op == 0x53:                   # XDWRITEREAD(10): a bidirectional command
            return ScsiResponse(GOOD, b"", bytes(reversed(bytes(cmd.data_out))))
        return ScsiResponse(CHECK_CONDITION, ILLEGAL_OPCODE)


def rw10(op: int, lba: int, n: int) -> bytes:
    return bytes([op, 0]) + struct.pack(">I", lba) + b"\0" + struct.pack(">H", n) + b"\0"


async def until(cond, timeout: float = 5.0) -> None:
    """Let the loop run until cond() (the native ring loop hands commands
    over from its thread: a few loop iterations may not be enough)."""
    for _ in range(int(timeout / 0.002)):
        if cond():
            return
        await asyncio.sleep(0.002)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# Every device test runs on both ring loops: Python's and the native thread's
# (which hands these targets' commands to Python: they are no ScsiDevice).
DEVICE_CLASSES = [TcmuDevice] + ([NativeTcmuDevice] if native.AVAILABLE else [])
_device_class = TcmuDevice


@pytest.fixture(autouse=True, params=DEVICE_CLASSES, ids=lambda c: c.__name__)
def device_class(request):
    global _device_class
    _device_class = request.param
    yield request.param
    _device_class = TcmuDevice


async def start(k: FakeKernel, target, **kw) -> TcmuDevice:
    dev = _device_class("t", target, fd=k.user_sock.fileno(), buf=k.map, **kw)
    dev.open()
    return dev


def test_abi_matches_uapi_header():
    # numbers from include/uapi/linux/target_core_user.h (packed structs)
    assert abi.TCMU_MAILBOX_VERSION == 2
    assert (abi.MB_VERSION, abi.MB_FLAGS, abi.MB_CMDR_OFF, abi.MB_CMDR_SIZE, abi.MB_CMD_HEAD) == (0, 2, 4, 8, 12)
    assert abi.MB_CMD_TAIL == 64                      # __aligned__(ALIGN_SIZE=64)
    assert abi.ENT_HDR.size == 8 and abi.ENT_UFLAGS == 7
    # req is an unpacked struct inside the packed entry: u64 cdb_off is 8-aligned
    assert abi.REQ_OFF + abi.REQ.size == abi.REQ_IOV_OFF == 8 + (4 * 3 + 4) + 8 * 3 == 48
    assert abi.IOVEC.size == 16
    assert (abi.RSP_STATUS_OFF, abi.RSP_READ_LEN_OFF, abi.RSP_SENSE_OFF) == (8, 12, 16)
    assert abi.CMD_ENTRY_SIZE == 112 and abi.TCMU_SENSE_BUFFERSIZE == 96
    assert abi.TMR_CMD_IDS_OFF == 32
    assert (abi.TCMU_OP_PAD, abi.TCMU_OP_CMD, abi.TCMU_OP_TMR, abi.TCMU_OP_MASK) == (0, 1, 2, 7)
    assert (abi.TCMU_UFLAG_UNKNOWN_OP, abi.TCMU_UFLAG_READ_LEN, abi.TCMU_UFLAG_KEEP_BUF) == (1, 2, 4)
    assert (abi.TCMU_MAILBOX_FLAG_CAP_OOOC, abi.TCMU_MAILBOX_FLAG_CAP_READ_LEN,
            abi.TCMU_MAILBOX_FLAG_CAP_TMR) == (1, 2, 4)
    assert (abi.TCMU_CMD_ADDED_DEVICE, abi.TCMU_CMD_REMOVED_DEVICE, abi.TCMU_CMD_RECONFIG_DEVICE,
            abi.TCMU_CMD_SET_FEATURES) == (1, 2, 3, 7)
    assert (abi.TCMU_ATTR_DEVICE, abi.TCMU_ATTR_MINOR, abi.TCMU_ATTR_CMD_STATUS,
            abi.TCMU_ATTR_DEVICE_ID, abi.TCMU_ATTR_SUPP_KERN_CMD_REPLY) == (1, 2, 7, 8, 9)
    assert abi.cdb_length(0x28) == 10 and abi.cdb_length(0x08) == 6
    assert abi.cdb_length(0x88) == 16 and abi.cdb_length(0xA8) == 12
    assert abi.cdb_length(0x7F, 24) == 32


def test_write_then_read_scatter_gather():
    async def main():
        k = FakeKernel()
        t = MemTarget()
        dev = await start(k, t)
        payload = bytes(range(256)) * 16          # 4096 bytes = 8 blocks
        wid = k.submit(rw10(0x2A, 3, 8), data_out=payload, pieces=3)
        [c] = await k.wait_completions(1)
        assert (c.cmd_id, c.status, c.uflags) == (wid, GOOD, 0)
        assert t.data[3 * 512:11 * 512] == payload
        assert bytes(t.seen[0].data_out) == payload and t.seen[0].lun == 0 and t.seen[0].expected_in == 0
        assert t.seen[0].nexus.initiator == "tcmu" and t.seen[0].nexus.target_port == "tcmu"
        rid = k.submit(rw10(0x28, 3, 8), data_in=4096, pieces=3)
        [c] = await k.wait_completions(1)
        assert (c.cmd_id, c.status) == (rid, GOOD)
        assert c.data_in == payload
        assert t.seen[1].data_out is None and t.seen[1].expected_in == 4096
        assert k.tail == k.head
        await dev.close()
        k.close()
    run(main())


def test_check_condition_sense_and_status():
    async def main():
        k = FakeKernel()
        dev = await start(k, MemTarget())
        cid = k.submit(bytes([0xC5, 0, 0, 0, 0, 0]) + bytes(10))
        [c] = await k.wait_completions(1)
        assert c.cmd_id == cid and c.status == CHECK_CONDITION
        assert c.sense == ILLEGAL_OPCODE + bytes(96 - len(ILLEGAL_OPCODE))
        eid = k.submit(bytes([0xEE]) + bytes(15))
        [c] = await k.wait_completions(1)
        assert c.cmd_id == eid and c.status == CHECK_CONDITION
        assert (c.sense[2], c.sense[12], c.sense[13]) == (0x04, 0x44, 0x00)   # internal target failure
        assert dev.stats["errors"] == 1
        await dev.close()
        k.close()
    run(main())


def test_ring_wraps_with_pad_entries():
    async def main():
        k = FakeKernel(cmdr_size=1000)        # 128-byte entries do not divide it: PADs
        t = MemTarget()
        dev = await start(k, t)
        for i in range(40):
            data = bytes([i]) * 512
            cid = k.submit(rw10(0x2A, i, 1), data_out=data)
            [c] = await k.wait_completions(1)
            assert (c.cmd_id, c.status) == (cid, GOOD)
            assert k.tail == k.head
        pads = [s for s in k.slots if s[1] == "pad"]
        assert len(pads) >= 3
        for i in range(40):
            assert t.data[i * 512:(i + 1) * 512] == bytes([i]) * 512
        await dev.close()
        k.close()
    run(main())


def test_batch_across_wrap_in_one_doorbell():
    async def main():
        k = FakeKernel(cmdr_size=1000)
        t = MemTarget()
        for i in range(5):                      # park head near the end first
            k.submit(rw10(0x2A, 100 + i, 1), data_out=b"z" * 512, notify=False)
        dev = await start(k, t)                  # picks up what is already there
        await k.wait_completions(5)
        ids = [k.submit(rw10(0x2A, i, 1), data_out=bytes([i + 1]) * 512, notify=False) for i in range(6)]
        assert any(s[1] == "pad" for s in k.slots)
        k.notify()
        got = await k.wait_completions(6)
        assert sorted(c.cmd_id for c in got) == sorted(ids)
        assert all(c.status == GOOD for c in got) and k.tail == k.head
        await dev.close()
        k.close()
    run(main())


def test_batch_is_completed_and_kicked_once_within_its_wakeup():
    """Commands answered at once are completed, and the kernel kicked once
    for all of them, before the wake-up that fetched them returns: no kick
    per command and no loop iteration more (an epoll_wait each under load)."""
    async def main():
        k = FakeKernel()
        ids = [k.submit(rw10(0x2A, i, 1), data_out=bytes([i + 1]) * 512, notify=False) for i in range(5)]
        dev = TcmuDevice("t", MemTarget(), fd=k.user_sock.fileno(), buf=k.map)
        dev.open()                               # fetches what is on the ring; no await after it
        got = k.reap()
        assert sorted(c.cmd_id for c in got) == ids and all(c.status == GOOD for c in got)
        assert k.tail == k.head
        assert k.kern_sock.recv(64) == bytes(4)  # one kick, already written
        assert dev.stats["notifies"] == 1
        await dev.close()
        k.close()
    run(main())


def test_out_of_order_completion_with_cap_oooc():
    """A slow command must not hold back later ones: the finished command's
    response goes into the entry at cmd_tail with its own cmd_id (libtcmu)."""
    async def main():
        k = FakeKernel(flags=abi.TCMU_MAILBOX_FLAG_CAP_OOOC)
        t = MemTarget()
        t.gates[7] = asyncio.Event()
        dev = await start(k, t)
        slow = k.submit(rw10(0x28, 7, 1), data_in=512, notify=False)
        fast = k.submit(rw10(0x2A, 9, 1), data_out=b"f" * 512)
        [c] = await k.wait_completions(1)
        assert c.cmd_id == fast and c.slot == k.slots[0][0]     # written at the slow one's slot
        assert k.tail == k.slots[1][0]
        t.data[7 * 512:8 * 512] = b"s" * 512
        t.gates[7].set()
        [c] = await k.wait_completions(1)
        assert c.cmd_id == slow and c.slot == k.slots[1][0] and c.data_in == b"s" * 512
        assert k.tail == k.head
        assert dev.ring.out_of_order == 2          # both answers went into each other's slot
        await dev.close()
        k.close()
    run(main())


def test_in_order_tail_without_cap_oooc():
    """Without CAP_OOOC a completed entry is answered in place and the tail
    only moves over a prefix of completed entries."""
    async def main():
        k = FakeKernel(flags=0)
        t = MemTarget()
        t.gates[7] = asyncio.Event()
        dev = await start(k, t)
        k.submit(rw10(0x2A, 1, 1), data_out=b"a" * 512)    # the tail away from 0 first
        await k.wait_completions(1)
        start_tail = k.tail
        assert start_tail != 0
        slow = k.submit(rw10(0x28, 7, 1), data_in=512, notify=False)
        fast = k.submit(rw10(0x2A, 9, 1), data_out=b"f" * 512)
        for _ in range(50):                     # let the fast one finish
            await asyncio.sleep(0)
            if t.data[9 * 512] == ord("f"):
                break
        await asyncio.sleep(0.01)
        assert t.data[9 * 512:10 * 512] == b"f" * 512
        assert k.tail == start_tail and k.reap() == []   # the fast one's answer waits behind the slow one
        p = CMDR_OFF + k.slots[2][0]
        assert struct.unpack_from("=H", k.map, p + 4)[0] == fast and k.map[p + 8] == GOOD
        t.gates[7].set()
        got = await k.wait_completions(2)
        assert [(c.cmd_id, c.slot) for c in got] == [(slow, k.slots[1][0]), (fast, k.slots[2][0])]
        assert k.tail == k.head
        await dev.close()
        k.close()
    run(main())


def test_unknown_ring_op_is_flagged_and_passed():
    async def main():
        k = FakeKernel()
        dev = await start(k, MemTarget())
        off = k.submit_raw(5, 64, notify=False)          # an op this ABI does not define
        tmr = k.submit_raw(2, 40, notify=False)          # TMR notification: passed over
        cid = k.submit(bytes([0x12, 0, 0, 0, 36, 0]), data_in=36)
        got = await k.wait_completions(1)
        assert [c.cmd_id for c in got] == [cid]
        assert k.map[CMDR_OFF + off + 7] & abi.TCMU_UFLAG_UNKNOWN_OP
        assert not k.map[CMDR_OFF + tmr + 7] & abi.TCMU_UFLAG_UNKNOWN_OP
        assert k.tail == k.head
        await dev.close()
        k.close()
    run(main())


def test_short_data_in_read_len_and_zero_fill():
    async def main():
        # kernel with CAP_READ_LEN: read_len reports the short transfer
        k = FakeKernel(flags=abi.TCMU_MAILBOX_FLAG_CAP_OOOC | abi.TCMU_MAILBOX_FLAG_CAP_READ_LEN)
        dev = await start(k, MemTarget())
        k.submit(bytes([0x12, 0, 0, 0, 255, 0]), data_in=255, pieces=2)
        [c] = await k.wait_completions(1)
        assert c.uflags & abi.TCMU_UFLAG_READ_LEN and c.read_len == 36
        assert c.data_in == b"\0\0\x06\x02\x1f" + b"X" * 31
        await dev.close()
        k.close()
        # without it: the rest of the buffer is zeroed, never stale bytes
        k = FakeKernel(flags=abi.TCMU_MAILBOX_FLAG_CAP_OOOC)
        dev = await start(k, MemTarget())
        k.submit(bytes([0x12, 0, 0, 0, 255, 0]), data_in=255, pieces=2, fill=0xAA)
        [c] = await k.wait_completions(1)
        assert not c.uflags & abi.TCMU_UFLAG_READ_LEN
        assert c.data_in == b"\0\0\x06\x02\x1f" + b"X" * 31 + bytes(255 - 36)
        await dev.close()
        k.close()
    run(main())


def test_many_concurrent_commands_and_devices():
    async def main():
        ks = [FakeKernel(cmdr_size=8192), FakeKernel(cmdr_size=8192)]
        ts = [MemTarget(), MemTarget()]
        for t in ts:
            t.gates[0] = asyncio.Event()
        devs = [await start(k, t) for k, t in zip(ks, ts)]
        ids = []
        for d, k in enumerate(ks):
            ids.append([k.submit(rw10(0x2A, 1 + i, 1), data_out=bytes([d * 40 + i]) * 512, notify=False)
                        for i in range(30)])
            k.submit(rw10(0x28, 0, 1), data_in=512)       # held: the others overtake it
        for d, k in enumerate(ks):
            got = await k.wait_completions(30)
            assert sorted(c.cmd_id for c in got) == sorted(ids[d])
        for t in ts:
            t.gates[0].set()
        for d, (k, t) in enumerate(zip(ks, ts)):
            [c] = await k.wait_completions(1)
            assert c.status == GOOD and k.tail == k.head
            for i in range(30):
                assert t.data[(1 + i) * 512:(2 + i) * 512] == bytes([d * 40 + i]) * 512
        for dev in devs:
            await dev.close()
        for k in ks:
            k.close()
    run(main())


def test_corrupt_ring_is_detected():
    k = FakeKernel()
    ring = Ring(k.map)
    struct.pack_into("=IHBB", k.map, CMDR_OFF, 0 | 1, 1, 0, 0)   # zero length entry
    k.head = 64
    with pytest.raises(RingError):
        ring.fetch()
    ring.mv.release()
    k2 = FakeKernel()
    struct.pack_into("=H", k2.map, 0, 1)
    with pytest.raises(RingError):
        Ring(k2.map)
    k.close()
    k2.close()


def test_close_with_command_in_flight_leaves_it_on_the_ring():
    async def main():
        k = FakeKernel()
        t = MemTarget()
        t.gates[5] = asyncio.Event()
        dev = await start(k, t)
        k.submit(rw10(0x28, 5, 1), data_in=512)
        await until(lambda: t.seen)
        assert t.seen
        await dev.close()
        assert k.tail == 0 and k.reap() == []
        k.close()
    run(main())


def test_restart_resets_ring_left_by_a_dead_handler():
    """Entries a dead handler never completed: the new one asks the kernel to
    reset the ring (kernel answers them BUSY, head = tail = 0) before it
    walks anything, then serves new commands from offset 0."""
    async def main():
        k = FakeKernel()
        t = MemTarget()
        old = [k.submit(rw10(0x2A, i, 1), data_out=b"o" * 512, notify=False) for i in range(3)]
        assert k.head != k.tail
        resets = []

        def reset_ring():               # what the kernel does on action/reset_ring = 1
            resets.append((k.tail, k.head))
            for cid in old:
                k.pending.pop(cid)
            struct.pack_into("=I", k.map, 12, 0)
            struct.pack_into("=I", k.map, 64, 0)
            k.last_cleaned = 0
        dev = await start(k, t, reset_ring=reset_ring)
        assert resets == [(0, 3 * 128)]
        assert t.seen == []                          # nothing old was re-executed
        cid = k.submit(rw10(0x2A, 9, 1), data_out=b"n" * 512)
        [c] = await k.wait_completions(1)
        assert (c.cmd_id, c.status, c.slot) == (cid, GOOD, 0)
        assert t.data[:512] == bytes(512) and t.data[9 * 512:10 * 512] == b"n" * 512
        await dev.close()
        k.close()
    run(main())


def test_vanished_doorbell_fd_stops_serving_instead_of_spinning():
    async def main():
        k = FakeKernel()
        t = MemTarget()
        dev = await start(k, t)
        k.kern_sock.close()                 # the kernel side goes away: reads return EOF
        await until(lambda: dev.gone)
        assert dev.gone
        wakeups = dev.stats["wakeups"]
        for _ in range(50):
            await asyncio.sleep(0)
        assert dev.stats["wakeups"] == wakeups    # no longer polled
        await dev.close()
        k.user_sock.close()
        k.map.close()
    run(main())


def test_bidirectional_command_uses_bidi_iovecs_for_data_in():
    async def main():
        k = FakeKernel()
        t = MemTarget()
        dev = await start(k, t)
        out = bytes(range(200)) * 5
        cid = k.submit(bytes([0x53]) + bytes(9), data_out=out, pieces=2, bidi_in=len(out))
        [c] = await k.wait_completions(1)
        assert (c.cmd_id, c.status) == (cid, GOOD)
        assert c.data_in == bytes(reversed(out))
        assert bytes(t.seen[0].data_out) == out and t.seen[0].expected_in == len(out)
        await dev.close()
        k.close()
    run(main())


def test_graceful_close_completes_running_commands():
    async def main():
        k = FakeKernel()
        t = MemTarget()
        t.gates[5] = asyncio.Event()
        dev = await start(k, t)
        cid = k.submit(rw10(0x28, 5, 1), data_in=512)
        await until(lambda: t.seen)
        closing = asyncio.ensure_future(dev.close(drain=10))
        await asyncio.sleep(0)
        k.submit(rw10(0x28, 6, 1), data_in=512)       # arrives while closing: not fetched
        await asyncio.sleep(0.01)
        t.gates[5].set()
        await closing
        got = k.reap()
        assert [c.cmd_id for c in got] == [cid] and got[0].status == GOOD
        assert len(t.seen) == 1 and k.tail != k.head   # the late one stays for the next opener
        k.close()
    run(main())
