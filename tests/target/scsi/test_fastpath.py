"""ScsiDevice.try_execute: the synchronous READ/WRITE fast path serves only
what the full path would serve the same way, and declines everything else
without side effects."""
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from target.scsi import DeviceOptions
from target.scsi.api import GOOD, ScsiCommand

from .util import NX_A, NX_B, asynctest, cdb10, cdb16, good, mem_device, ready, send

BS = 512


def rd(cdb: bytes, n: int, nexus=NX_A) -> ScsiCommand:
    return ScsiCommand(bytes(cdb), 0, nexus, None, n)


def wr(cdb: bytes, data: bytes, nexus=NX_A) -> ScsiCommand:
    return ScsiCommand(bytes(cdb), 0, nexus, data)


@asynctest
async def test_serves_plain_reads_and_writes_once_the_nexus_is_ready():
    dev, store = mem_device(blocks=64)
    assert dev.try_execute(rd(cdb10(0x28, 0, 1), BS)) is None      # power-on UA still due
    await ready(dev)
    data = bytes(range(256)) * 4
    r = dev.try_execute(wr(cdb10(0x2A, 3, 2), data))
    assert r is not None and r.status == GOOD and r.transfer_length == 2 * BS
    assert good(await send(dev, cdb10(0x28, 3, 2))) == data       # the full path sees it
    r = dev.try_execute(rd(cdb16(0x88, 3, 2), 2 * BS))
    assert r is not None and bytes(r.data_in) == data
    a, b = bytearray(100), bytearray(2 * BS - 100)                  # scattered Data-In buffers
    r = dev.try_execute(rd(cdb10(0x28, 3, 2), 2 * BS), [memoryview(a), memoryview(b)])
    assert r is not None and bytes(a + b) == data
    r = dev.try_execute(wr(cdb16(0x8A, 63, 1), b"z" * BS))
    assert r is not None and bytes(store.current[63 * BS:]) == b"z" * BS
    assert dev.try_execute(rd(cdb10(0x28, 0, 1), BS), None) is not None


@asynctest
async def test_declines_what_the_full_path_must_handle():
    dev, store = mem_device(blocks=64)
    await ready(dev, NX_A, NX_B)
    before = bytes(store.current)
    declined = [
        wr(cdb10(0x2A, 0, 1, flags=0x08), b"f" * BS),     # FUA: needs a flush before GOOD
        wr(cdb10(0x2A, 0, 1, flags=0x20), b"p" * BS),     # WRPROTECT: an error to report
        wr(cdb10(0x2A, 63, 2), b"o" * 2 * BS),             # beyond the last LBA
        wr(cdb10(0x2A, 0, 0), b""),                        # nothing to transfer
        wr(cdb10(0x2A, 0, 2), b"s" * BS),                  # Data-Out shorter than the CDB
        wr(cdb10(0x2A, 0, 1), b"l" * 2 * BS),              # ... or longer (a residual)
        rd(cdb10(0x28, 0, 2), BS),                         # expected length differs
        rd(cdb10(0x28, 0, 1) [:9], BS),                    # CDB cut short
        ScsiCommand(bytes(cdb10(0x2F, 0, 1)), 0, NX_A),    # VERIFY: not a fast-path command
    ]
    for cmd in declined:
        assert dev.try_execute(cmd) is None, cmd.cdb.hex()
    assert bytes(store.current) == before
    good(await send(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus=NX_B))   # SPC-2 RESERVE by B
    assert dev.try_execute(rd(cdb10(0x28, 0, 1), BS)) is None
    assert dev.try_execute(wr(cdb10(0x2A, 0, 1), b"r" * BS)) is None
    assert dev.try_execute(rd(cdb10(0x28, 0, 1), BS, NX_B)) is not None   # the holder itself
    good(await send(dev, bytes([0x17, 0, 0, 0, 0, 0]), nexus=NX_B))   # RELEASE
    assert dev.try_execute(rd(cdb10(0x28, 0, 1), BS)) is not None
    dev.lunio.generation += 1                        # data changed under the hosts
    assert dev.try_execute(rd(cdb10(0x28, 0, 1), BS)) is None      # the full path raises the UA
    r = await send(dev, cdb10(0x28, 0, 1))
    assert r.status != GOOD


@asynctest
async def test_declines_writes_around_compare_and_write_and_on_read_only_or_write_through():
    dev, _ = mem_device(blocks=64)
    await ready(dev)
    req = await dev.range_lock.acquire(0, BS, exclusive=True)        # an ATS in progress
    assert dev.try_execute(wr(cdb10(0x2A, 40, 1), b"x" * BS)) is None
    assert dev.try_execute(rd(cdb10(0x28, 40, 1), BS)) is not None   # reads are not ordered by it
    dev.range_lock.release(req)
    assert dev.try_execute(wr(cdb10(0x2A, 40, 1), b"x" * BS)) is not None
    ro, _ = mem_device(blocks=8, read_only=True)
    await ready(ro)
    assert ro.try_execute(wr(cdb10(0x2A, 0, 1), b"x" * BS)) is None
    assert ro.try_execute(rd(cdb10(0x28, 0, 1), BS)) is not None      # reads are fine
    wt, _ = mem_device(blocks=8, options=DeviceOptions(write_cache=False))
    await ready(wt)
    assert wt.try_execute(wr(cdb10(0x2A, 0, 1), b"x" * BS)) is None   # write-through: durable first


op = st.tuples(st.booleans(), st.sampled_from([10, 16]), st.integers(0, 70), st.integers(0, 9),
               st.integers(0, 2), st.sampled_from([0, 0, 0, 0x08, 0x10, 0x20]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=30))
def test_fast_path_matches_the_full_path(ops):
    """The same commands through try_execute-then-execute and through
    execute alone give the same statuses, data and medium contents."""
    import asyncio

    async def main():
        fast, fstore = mem_device(blocks=64)
        slow, sstore = mem_device(blocks=64)
        await ready(fast)
        await ready(slow)
        for i, (write, size, lba, blocks, skew, flags) in enumerate(ops):
            mk = cdb10 if size == 10 else cdb16
            n = blocks * BS
            if write:
                cdb = mk(0x2A if size == 10 else 0x8A, lba, blocks, flags)
                data = struct.pack(">I", i) * (max(n + (skew - 1) * BS, 0) // 4)
                cmds = [wr(cdb, data) for _ in range(2)]
            else:
                cdb = mk(0x28 if size == 10 else 0x88, lba, blocks, flags)
                cmds = [rd(cdb, n + (skew - 1) * BS) for _ in range(2)]
            r1 = fast.try_execute(cmds[0]) or await fast.execute(cmds[0])
            r2 = await slow.execute(cmds[1])
            assert (r1.status, bytes(r1.sense), bytes(r1.data_in)) == \
                (r2.status, bytes(r2.sense), bytes(r2.data_in)), (write, cdb.hex())
        assert fstore.current == sstore.current
    asyncio.run(main())
