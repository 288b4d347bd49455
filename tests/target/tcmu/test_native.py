"""The native ring loop (target/tcmu/native_device.py): which commands its thread
answers by itself and which it hands to Python, against a fake kernel and
real file stores."""
from __future__ import annotations

import asyncio
import os
import struct

import pytest

from restore_core.engine import Engine
from restore_core.metadata import MemoryMetadataStore
from restore_core.plain_lunio import PlainLunIO
from restore_core.stores.file import FileBlockStore
from target.scsi.api import CHECK_CONDITION, GOOD
from target.tcmu import abi
from target.tcmu import native_device as native
from target.tcmu.handler import as_scsi_target
from target.tcmu.native_device import NativeTcmuDevice

from .fake_kernel import CMDR_OFF, FakeKernel
from .test_ring import rw10, run, until


BS = 512
TUR = bytes(6)
SYNC_CACHE_10 = bytes([0x35]) + bytes(9)
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([op, flags]) + struct.pack(">QI", lba, n) + b"\0\0"


def handed(dev: NativeTcmuDevice) -> int:
    return dev.native.stats()["handed"]


async def serve(k: FakeKernel, target) -> NativeTcmuDevice:
    dev = NativeTcmuDevice("t", target, fd=k.user_sock.fileno(), buf=k.map)
    dev.open()
    return dev


async def one(k: FakeKernel, cdb: bytes, **kw):
    cid = k.submit(cdb, **kw)
    [c] = await k.wait_completions(1)
    assert c.cmd_id == cid
    return c


async def direct_on(k: FakeKernel, dev: NativeTcmuDevice) -> None:
    """The nexus's first command takes its power-on unit attention (Python);
    the route is published direct after that batch."""
    c = await one(k, TUR)
    assert c.status == CHECK_CONDITION and c.sense[2] & 0x0F == 0x06
    assert (await one(k, TUR)).status == GOOD
    await until(lambda: dev._lease is not None)
    assert dev._lease is not None


def file_lu(tmp_path, blocks: int = 256):
    store = FileBlockStore(str(tmp_path / "lu.img"), blocks * BS, create=True)
    return store, as_scsi_target(PlainLunIO(store), BS)


def test_the_install_built_the_native_loop():
    # setup.py builds it optional (an install without a compiler still
    # works); .ci/install provides one, so here it must be there
    assert native.AVAILABLE, "target.tcmu._nativering was not built (gcc, python3-dev?)"


def test_reads_and_writes_of_a_direct_lu_are_answered_by_the_native_loop(tmp_path):
    async def main():
        store, target = file_lu(tmp_path)
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        before = handed(dev)
        payload = bytes(range(256)) * 16                       # 8 blocks
        assert (await one(k, rw10(0x2A, 3, 8), data_out=payload, pieces=3)).status == GOOD
        assert (await one(k, rw16(0x8A, 100, 2), data_out=b"w" * 1024)).status == GOOD
        c = await one(k, rw16(0x88, 3, 8), data_in=4096, pieces=2)
        assert (c.status, c.data_in) == (GOOD, payload)
        c = await one(k, rw10(0x28, 100, 2), data_in=1024)
        assert (c.status, c.data_in) == (GOOD, b"w" * 1024)
        assert handed(dev) == before                          # none went through Python
        with open(tmp_path / "lu.img", "rb") as f:
            img = f.read()
        assert img[3 * BS:11 * BS] == payload and img[100 * BS:102 * BS] == b"w" * 1024
        assert k.tail == k.head
        await dev.close()
        lu = target.device(0).stats                           # the LU's metrics count them
        assert (lu.commands[0], lu.commands[1]) == (2, 2)
        assert (lu.bytes[0], lu.bytes[1]) == (5120, 5120)
        store.close()
        k.close()
    run(main())


def test_a_batch_of_direct_commands_is_answered_with_one_kick(tmp_path):
    """The kernel publishes several commands with one interrupt: the thread
    wakes once, answers them all and tells the kernel once (each uio write
    is a syscall, and the kernel's completion pass, per batch); the LU's
    metrics still count every command, with the batch's latency."""
    async def main():
        store, target = file_lu(tmp_path)
        k = FakeKernel(cmdr_size=8192)
        dev = await serve(k, target)
        await direct_on(k, dev)
        st0, n0 = dev.native.stats(), handed(dev)
        for i in range(6):
            k.submit(rw10(0x2A, 8 * i, 1), data_out=bytes([i]) * BS, notify=False)
        for i in range(6):
            k.submit(rw10(0x28, 8 * i, 1), data_in=BS, notify=False)
        k.notify()
        got = await k.wait_completions(12)
        assert all(c.status == GOOD for c in got) and len(got) == 12
        assert sorted(c.data_in for c in got if c.data_in) == [bytes([i]) * BS for i in range(6)]
        st = dev.native.stats()
        assert handed(dev) == n0
        assert (st["wakeups"] - st0["wakeups"], st["notifies"] - st0["notifies"]) == (1, 1)
        await dev.close()
        lu = target.device(0).stats
        assert (lu.commands[0], lu.commands[1]) == (6, 6)
        assert sum(lu.buckets[0]) == 6 and sum(lu.buckets[1]) == 6
        store.close()
        k.close()
    run(main())


def test_the_lu_metrics_take_the_native_counts_while_it_serves(tmp_path):
    """The native counters reach the LU's metrics every FOLD_EVERY_CHECKS
    route checks, not only when the device closes."""
    async def main():
        store, target = file_lu(tmp_path)
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        for lba in (1, 2):
            assert (await one(k, rw10(0x2A, lba, 1), data_out=b"m" * BS)).status == GOOD
        lu = target.device(0).stats
        await until(lambda: lu.commands[1] == 2, timeout=20 * native.FOLD_EVERY_CHECKS * native.ROUTE_CHECK_S)
        assert lu.commands[1] == 2 and dev._lease is not None
        await dev.close()
        store.close()
        k.close()
    run(main())


def test_a_read_that_would_wait_for_the_disk_goes_to_python(tmp_path):
    """The native thread runs commands one at a time: a read missing the page
    cache (RWF_NOWAIT says it would block) goes to Python's threads instead
    of holding up every command behind it."""
    async def main():
        store, target = file_lu(tmp_path)
        data = os.urandom(8 * BS)
        os.pwrite(store.fd, data, 40 * BS)
        os.fsync(store.fd)
        os.posix_fadvise(store.fd, 0, 0, os.POSIX_FADV_DONTNEED)   # clean pages leave the cache
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        n0, b0 = handed(dev), dev.native.stats()["would_block"]
        c = await one(k, rw10(0x28, 40, 8), data_in=8 * BS)
        assert (c.status, c.data_in) == (GOOD, data)
        assert (handed(dev) - n0, dev.native.stats()["would_block"] - b0) == (1, 1)
        await dev.close()
        store.close()
        k.close()
    run(main())


def test_what_the_route_does_not_cover_is_answered_by_python(tmp_path):
    """Out of range, FUA, protection bits, zero length, a length that does
    not match the data, other opcodes: each handed over, answered in full."""
    async def main():
        store, target = file_lu(tmp_path, blocks=64)
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        n0 = handed(dev)
        c = await one(k, rw10(0x28, 63, 2), data_in=1024)    # past the end
        assert c.status == CHECK_CONDITION and (c.sense[2], c.sense[12]) == (0x05, 0x21)
        c = await one(k, rw16(0x8A, 1 << 40, 1), data_out=b"x" * BS)
        assert c.status == CHECK_CONDITION and (c.sense[2], c.sense[12]) == (0x05, 0x21)
        c = await one(k, bytes([0x2A, 0x20]) + rw10(0x2A, 1, 1)[2:], data_out=b"p" * BS)
        assert c.status == CHECK_CONDITION and (c.sense[2], c.sense[12]) == (0x05, 0x24)   # WRPROTECT
        c = await one(k, bytes([0x2A, 0x08]) + rw10(0x2A, 2, 1)[2:], data_out=b"f" * BS)
        assert c.status == GOOD                               # FUA: Python writes it through
        c = await one(k, INQUIRY, data_in=96)
        assert c.status == GOOD and c.data_in[0] == 0
        c = await one(k, rw10(0x28, 4, 0), data_in=BS)        # no blocks: no data
        assert c.status == GOOD
        assert handed(dev) - n0 == 6
        with open(tmp_path / "lu.img", "rb") as f:
            assert f.read()[2 * BS:3 * BS] == b"f" * BS
        await dev.close()
        store.close()
        k.close()
    run(main())


def test_a_flush_covers_the_native_loops_writes(tmp_path):
    """SYNCHRONIZE CACHE (Python) after writes the native thread made on the
    store's descriptor must fdatasync: the store's group flush skips the sync
    when it thinks nothing was written since the last one."""
    async def main():
        store, target = file_lu(tmp_path)
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        assert (await one(k, SYNC_CACHE_10)).status == GOOD
        syncs = store.fdatasyncs
        n0 = handed(dev)
        assert (await one(k, rw10(0x2A, 7, 1), data_out=b"d" * BS)).status == GOOD
        assert handed(dev) == n0
        assert (await one(k, SYNC_CACHE_10)).status == GOOD
        assert store.fdatasyncs == syncs + 1
        await dev.close()
        store.close()
        k.close()
    run(main())


class _Pair:
    """A fractured pair of file volumes under an engine; the source served."""

    async def start(self, tmp_path, blocks: int = 64) -> None:
        size = blocks * BS
        self.src = FileBlockStore(str(tmp_path / "src.img"), size, create=True)
        self.cln = FileBlockStore(str(tmp_path / "cln.img"), size, create=True)
        self.eng = Engine(MemoryMetadataStore())
        self.sio = self.eng.add_volume("src", self.src)
        self.eng.add_volume("cln", self.cln)
        await self.eng.start()

    async def fracture(self):
        p = await self.eng.create_pair("src", "cln", extent_size=4096)
        await self.eng.wait_job(p.id, 30)
        await self.eng.fracture(p.id)
        return p

    async def stop(self) -> None:
        await self.eng.close()
        self.src.close()
        self.cln.close()


def test_a_fractured_volumes_write_is_marked_before_its_response(tmp_path):
    """A volume with a pair is never published direct: its writes go to
    Python, which marks the extent before the write is acknowledged."""
    async def main():
        rig = _Pair()
        await rig.start(tmp_path)
        pair = await rig.fracture()
        target = as_scsi_target(rig.sio, BS)
        k = FakeKernel()
        dev = await serve(k, target)
        await one(k, TUR)
        await one(k, TUR)
        await asyncio.sleep(3 * native.ROUTE_CHECK_S)
        n0 = handed(dev)
        for e in (1, 3, 6):
            assert not pair.maps.may_differ().test(e)
            c = await one(k, rw10(0x2A, e * 8, 1), data_out=b"h" * BS)
            assert c.status == GOOD
            assert pair.maps.may_differ().test(e), f"extent {e} acknowledged unmarked"
        assert handed(dev) - n0 == 3
        await dev.close()
        await rig.stop()
        k.close()
    run(main())


@pytest.mark.parametrize("poll", [None, 60.0], ids=["default-poll", "poll-a-minute"])
def test_a_state_change_takes_the_route_back_before_it_happens(tmp_path, monkeypatch, poll):
    """Creating a pair closes the volume's gate: the native loop stops
    answering before the pair exists, and the volume's writes go to Python
    (and are tracked) from then on. The LunIO tells the lease's holder when
    the gate starts closing, so the change does not wait for the route poll
    (ROUTE_CHECK_S made a minute)."""
    if poll is not None:
        monkeypatch.setattr(native, "ROUTE_CHECK_S", poll)

    async def main():
        rig = _Pair()
        await rig.start(tmp_path)
        target = as_scsi_target(rig.sio, BS)
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        n0 = handed(dev)
        assert (await one(k, rw10(0x2A, 0, 1), data_out=b"a" * BS)).status == GOOD
        assert handed(dev) == n0
        pair = await asyncio.wait_for(rig.fracture(), 10)
        assert dev._lease is None and rig.sio.vol.gate.inflight == 0
        assert (await one(k, rw10(0x2A, 16, 1), data_out=b"b" * BS)).status == GOOD
        assert handed(dev) == n0 + 1
        assert pair.maps.may_differ().test(2)
        await dev.close()
        await rig.stop()
        k.close()
    run(main())


@pytest.mark.parametrize("ooo", [True, False], ids=["ooo", "in-order"])
def test_concurrent_mix_of_native_and_python_commands(tmp_path, ooo):
    """Direct READ/WRITEs and handed-over commands (INQUIRY, out-of-range
    reads, FUA writes) in the same batches, completed by both threads into
    one ring: every command answered once, right, and the tail at the head."""
    async def main():
        store, target = file_lu(tmp_path, blocks=128)
        k = FakeKernel(cmdr_size=8192, flags=0b1110 | int(ooo))
        dev = await serve(k, target)
        await direct_on(k, dev)
        want = {}
        for rnd in range(20):
            for i in range(6):
                lba = (rnd * 6 + i) % 120
                if i == 1:
                    cid = k.submit(INQUIRY, data_in=96, notify=False)
                    want[cid] = ("inq", None)
                elif i == 3:
                    cid = k.submit(rw10(0x28, 200, 1), data_in=BS, notify=False)
                    want[cid] = ("oor", None)
                elif i == 4:
                    data = bytes([rnd, i]) * (BS // 2)
                    cid = k.submit(bytes([0x2A, 0x08]) + rw10(0x2A, lba, 1)[2:], data_out=data,
                                   notify=False)
                    want[cid] = ("w", None)
                else:
                    data = bytes([rnd, i, 7, 9]) * (BS // 4)
                    cid = k.submit(rw10(0x2A, lba, 1), data_out=data, notify=False)
                    want[cid] = ("w", None)
            k.notify()
            got = await k.wait_completions(6)
            assert len(got) == 6
            for c in got:
                kind, _ = want.pop(c.cmd_id)
                if kind == "oor":
                    assert c.status == CHECK_CONDITION and c.sense[12] == 0x21
                else:
                    assert c.status == GOOD, (kind, c)
        assert not want and k.tail == k.head and dev.native.in_flight() == 0
        st = dev.native.stats()
        assert st["handed"] >= 3 * 20
        await dev.close()
        store.close()
        k.close()
    run(main())


def test_a_malformed_entry_stops_the_device_with_one_error(tmp_path, caplog):
    async def main():
        store, target = file_lu(tmp_path)
        k = FakeKernel()
        dev = await serve(k, target)
        await direct_on(k, dev)
        cid = k.submit(rw10(0x28, 0, 1), data_in=BS, notify=False)
        off = k.slots[-1][0]
        struct.pack_into("=QQ", k.map, CMDR_OFF + off + abi.REQ_IOV_OFF, k.size, BS)   # outside the map
        k.notify()
        await until(lambda: dev.stats["errors"])
        assert dev.stats["errors"] == 1 and cid in k.pending
        await dev.close()
        store.close()
        k.close()
    with caplog.at_level("ERROR"):
        run(main())
    assert any("ring corrupt" in r.getMessage() and "outside the map" in r.getMessage()
               for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)
