"""ScsiDevice.submit: one path per command. A READ/WRITE the LunIO routes
straight to the store is answered at once (a ScsiResponse, no coroutine),
one that needs work returns a coroutine; errors are the same either way and
nothing is decoded or checked twice."""
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from target.scsi import DeviceOptions
from target.scsi.api import GOOD, RESERVATION_CONFLICT, ScsiCommand, ScsiResponse

from .util import NX_A, NX_B, asynctest, cdb10, cdb16, check, good, mem_device, ready, send

BS = 512


def rd(cdb: bytes, n: int, nexus=NX_A, into=None) -> ScsiCommand:
    return ScsiCommand(bytes(cdb), 0, nexus, None, n, into=into)


def wr(cdb: bytes, data: bytes, nexus=NX_A) -> ScsiCommand:
    return ScsiCommand(bytes(cdb), 0, nexus, data)


def at_once(dev, cmd) -> ScsiResponse:
    r = dev.submit(cmd)
    assert r.__class__ is ScsiResponse, f"{cmd.cdb.hex()} needed work"
    return r


async def with_work(dev, cmd) -> ScsiResponse:
    r = dev.submit(cmd)
    assert r.__class__ is not ScsiResponse, f"{cmd.cdb.hex()} was answered at once"
    return await r


@asynctest
async def test_plain_reads_and_writes_are_answered_at_once():
    dev, store = mem_device(blocks=64)
    check(at_once(dev, rd(cdb10(0x28, 0, 1), BS)), 0x06, 0x29, 0x00)   # power-on UA, at once too
    data = bytes(range(256)) * 4
    r = at_once(dev, wr(cdb10(0x2A, 3, 2), data))
    assert r.status == GOOD and r.transfer_length == 2 * BS
    assert good(await send(dev, cdb10(0x28, 3, 2))) == data
    r = at_once(dev, rd(cdb16(0x88, 3, 2), 2 * BS))
    assert bytes(r.data_in) == data and not r.data_in_placed
    a, b = bytearray(100), bytearray(2 * BS - 100)                  # scattered Data-In buffers
    r = at_once(dev, rd(cdb10(0x28, 3, 2), 2 * BS, into=[memoryview(a), memoryview(b)]))
    assert r.data_in_placed and r.data_in == b"" and bytes(a + b) == data
    r = at_once(dev, rd(cdb10(0x28, 3, 2), 2 * BS, into=[memoryview(a)]))   # too small: its own buffer
    assert not r.data_in_placed and bytes(r.data_in) == data
    r = at_once(dev, wr(cdb16(0x8A, 63, 1), b"z" * BS))
    assert r.status == GOOD and bytes(store.current[63 * BS:]) == b"z" * BS
    r = at_once(dev, wr(cdb10(0x2A, 0, 1), b"l" * 2 * BS))          # longer Data-Out: a residual
    assert r.status == GOOD and r.transfer_length == BS


@asynctest
async def test_errors_are_answered_at_once_without_side_effects():
    dev, store = mem_device(blocks=64)
    await ready(dev, NX_A, NX_B)
    before = bytes(store.current)
    for cmd, sense in [
        (wr(cdb10(0x2A, 0, 1, flags=0x20), b"p" * BS), (0x05, 0x24, 0x00)),   # WRPROTECT
        (wr(cdb10(0x2A, 63, 2), b"o" * 2 * BS), (0x05, 0x21, 0x00)),           # beyond the last LBA
        (wr(cdb10(0x2A, 0, 2), b"s" * BS), (0x05, 0x0E, 0x03)),                # Data-Out too short
        (rd(cdb10(0x28, 0, 1)[:9], BS), (0x05, 0x24, 0x00)),                   # CDB cut short
    ]:
        r = at_once(dev, cmd)
        check(r, *sense)
    assert bytes(store.current) == before
    good(await send(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus=NX_B))   # SPC-2 RESERVE by B
    assert at_once(dev, rd(cdb10(0x28, 0, 1), BS)).status == RESERVATION_CONFLICT
    assert at_once(dev, wr(cdb10(0x2A, 0, 1), b"r" * BS)).status == RESERVATION_CONFLICT
    assert at_once(dev, rd(cdb10(0x28, 0, 1), BS, NX_B)).status == GOOD      # the holder itself
    good(await send(dev, bytes([0x17, 0, 0, 0, 0, 0]), nexus=NX_B))   # RELEASE
    dev.lunio.generation += 1                        # data changed under the hosts
    check(at_once(dev, rd(cdb10(0x28, 0, 1), BS)), 0x06, 0x28, 0x00)
    assert bytes(store.current) == before


@asynctest
async def test_work_for_fua_write_through_and_around_compare_and_write():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    good(await with_work(dev, wr(cdb10(0x2A, 0, 1, flags=0x08), b"f" * BS)))   # FUA: flush first
    req = await dev.range_lock.acquire(0, BS, exclusive=True)        # an ATS in progress
    pending = dev.submit(wr(cdb10(0x2A, 40, 1), b"x" * BS))
    assert pending.__class__ is not ScsiResponse
    assert at_once(dev, rd(cdb10(0x28, 40, 1), BS)).status == GOOD   # reads are not ordered by it
    dev.range_lock.release(req)
    good(await pending)
    assert bytes(store.current[40 * BS:41 * BS]) == b"x" * BS
    ro, _ = mem_device(blocks=8, read_only=True)
    await ready(ro)
    check(at_once(ro, wr(cdb10(0x2A, 0, 1), b"x" * BS)), 0x07, 0x27, 0x00)
    assert at_once(ro, rd(cdb10(0x28, 0, 1), BS)).status == GOOD      # reads are fine
    wt, _ = mem_device(blocks=8, options=DeviceOptions(write_cache=False))
    await ready(wt)
    good(await with_work(wt, wr(cdb10(0x2A, 0, 1), b"x" * BS)))     # write-through: durable first


op = st.tuples(st.booleans(), st.sampled_from([10, 16]), st.integers(0, 70), st.integers(0, 9),
               st.integers(0, 2), st.sampled_from([0, 0, 0, 0x08, 0x10, 0x20]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=30))
def test_direct_path_matches_the_work_path(ops):
    """The same commands on a LU with a direct path (a memory store) and on
    one whose every READ/WRITE is work (its LunIO declines the direct path)
    give the same statuses, data and medium contents."""
    import asyncio

    async def main():
        fast, fstore = mem_device(blocks=64)
        slow, sstore = mem_device(blocks=64)
        lio = slow.lunio
        lio.route_read = lambda off, into: lio.read(off, sum(map(len, into)))
        lio.route_write = lambda off, data, fua: lio.write(off, data, fua)
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
            r1 = await fast.execute(cmds[0])
            r2 = await slow.execute(cmds[1])
            assert (r1.status, bytes(r1.sense), bytes(r1.data_in), r1.transfer_length) == \
                (r2.status, bytes(r2.sense), bytes(r2.data_in), r2.transfer_length), (write, cdb.hex())
        assert fstore.current == sstore.current
    asyncio.run(main())
