"""Block commands: capacity, data path, verify, sync, WRITE SAME, UNMAP,
COMPARE AND WRITE, GET LBA STATUS."""
import asyncio
import os
import struct

from restore_core.stores.file import FileBlockStore
from restore_core.plain_lunio import PlainLunIO
from target.scsi import DeviceOptions, ScsiDevice

from .util import (IDENT, FakeLunIO, asynctest, cdb6, cdb10, cdb12, cdb16, check,
                   fake_device, field_pointer, good, info_of, mem_device, ready, send)

BS = 512


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- capacity --------------------------------------------------------------------

@asynctest
async def test_read_capacity_10_and_16():
    dev, _ = mem_device(blocks=256)
    await ready(dev)
    assert good(await send(dev, [0x25] + [0] * 9)) == bytes([0, 0, 0, 0xFF, 0, 0, 2, 0])
    data = good(await send(dev, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]))
    assert data == bytes([0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 0, 2, 0, 0, 0x03, 0xC0, 0]) + bytes(16)
    assert good(await send(dev, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 12, 0, 0])) == data[:12]
    r = await send(dev, [0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])     # LBA without PMI
    check(r, 0x5, 0x24, 0x00)
    good(await send(dev, [0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]))   # PMI=1 is fine


@asynctest
async def test_read_capacity_beyond_2tib():
    dev, _ = fake_device(FakeLunIO((3 << 40) + 512 * 7, sparse=True))
    await ready(dev)
    assert good(await send(dev, [0x25] + [0] * 9)) == bytes([0xFF] * 4 + [0, 0, 2, 0])
    data = good(await send(dev, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]))
    assert struct.unpack_from(">Q", data)[0] == (3 << 40) // 512 + 6


@asynctest
async def test_read_capacity_4k_and_thick():
    dev, _ = mem_device(blocks=16, block_size=4096, options=DeviceOptions(thin_provisioning=False))
    await ready(dev)
    assert good(await send(dev, [0x25] + [0] * 9)) == bytes([0, 0, 0, 15, 0, 0, 0x10, 0])
    data = good(await send(dev, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]))
    assert data[12:16] == bytes([0, 0, 0, 0])


# -- read / write -----------------------------------------------------------------

@asynctest
async def test_write_read_roundtrip_all_cdb_sizes():
    dev, store = mem_device(blocks=1024)
    await ready(dev)
    for i, (rd, wr) in enumerate(((lambda l, n: cdb6(0x08, l, n), lambda l, n: cdb6(0x0A, l, n)),
                                  (lambda l, n: cdb10(0x28, l, n), lambda l, n: cdb10(0x2A, l, n)),
                                  (lambda l, n: cdb12(0xA8, l, n), lambda l, n: cdb12(0xAA, l, n)),
                                  (lambda l, n: cdb16(0x88, l, n), lambda l, n: cdb16(0x8A, l, n)))):
        lba, n = 10 + 20 * i, 3 + i
        data = pattern(n * BS, i)
        good(await send(dev, wr(lba, n), data))
        assert store.current[lba * BS:(lba + n) * BS] == data
        assert good(await send(dev, rd(lba, n))) == data


@asynctest
async def test_six_byte_zero_length_means_256_blocks():
    dev, store = mem_device(blocks=512)
    await ready(dev)
    data = pattern(256 * BS)
    good(await send(dev, cdb6(0x0A, 5, 0), data))
    assert store.current[5 * BS:261 * BS] == data
    assert good(await send(dev, cdb6(0x08, 5, 0))) == data


@asynctest
async def test_zero_length_transfers_are_not_errors():
    dev, store = mem_device(blocks=16)
    await ready(dev)
    assert good(await send(dev, cdb10(0x28, 16, 0))) == b""
    good(await send(dev, cdb10(0x2A, 16, 0)))
    check(await send(dev, cdb10(0x28, 17, 0)), 0x5, 0x21, 0x00)
    assert store.writes == 0


@asynctest
async def test_out_of_range():
    dev, store = mem_device(blocks=16)
    await ready(dev)
    r = await send(dev, cdb10(0x28, 15, 2))
    assert bytes(r.sense) == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    check(await send(dev, cdb16(0x8A, 1 << 63, 1), bytes(BS)), 0x5, 0x21, 0x00)
    check(await send(dev, cdb16(0x88, (1 << 64) - 1, 2)), 0x5, 0x21, 0x00)
    check(await send(dev, cdb6(0x08, 16, 1)), 0x5, 0x21, 0x00)
    assert store.writes == 0


@asynctest
async def test_transfer_length_limit():
    dev, _ = mem_device(blocks=64, options=DeviceOptions(max_transfer_blocks=8))
    await ready(dev)
    r = await send(dev, cdb10(0x28, 0, 9))
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 7, None)
    r = await send(dev, cdb16(0x8A, 0, 9), bytes(9 * BS))
    assert field_pointer(r.sense) == (True, 10, None)
    good(await send(dev, cdb10(0x28, 0, 8)))


@asynctest
async def test_short_data_out_and_protect_fields():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    check(await send(dev, cdb10(0x2A, 0, 2), bytes(BS)), 0x5, 0x0E, 0x03)
    check(await send(dev, cdb10(0x2A, 0, 2)), 0x5, 0x0E, 0x03)
    r = await send(dev, cdb10(0x28, 0, 1, flags=0x20))
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 1, 7)
    check(await send(dev, cdb10(0x2A, 0, 1, flags=0x40), bytes(BS)), 0x5, 0x24, 0x00)
    assert store.writes == 0
    # Longer Data-Out than the CDB says: the CDB wins.
    good(await send(dev, cdb10(0x2A, 0, 1), b"\x11" * (2 * BS)))
    assert store.current[BS:2 * BS] == bytes(BS)
    # DPO is accepted and ignored; a memoryview with another format works.
    good(await send(dev, cdb10(0x2A, 1, 1, flags=0x10), memoryview(b"\x22" * BS).cast("H")))
    assert store.current[BS:2 * BS] == b"\x22" * BS


@asynctest
async def test_fua_write_is_durable_on_return():
    lunio = FakeLunIO()
    dev, _ = fake_device(lunio)
    await ready(dev)
    good(await send(dev, cdb16(0x8A, 1, 1, flags=0x08), bytes(BS)))
    good(await send(dev, cdb10(0x2A, 1, 1), bytes(BS)))
    good(await send(dev, cdb12(0xAA, 1, 1, flags=0x08), bytes(BS)))
    assert [w[2] for w in lunio.writes] == [True, False, True]


@asynctest
async def test_write_and_verify():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    data = pattern(2 * BS)
    good(await send(dev, cdb10(0x2E, 4, 2, flags=0x02), data))
    assert store.durable[4 * BS:6 * BS] == data
    good(await send(dev, cdb16(0x8E, 8, 2), data))
    assert store.durable[8 * BS:10 * BS] == data
    check(await send(dev, cdb10(0x2E, 4, 2, flags=0x04), data), 0x5, 0x24, 0x00)


# -- verify ---------------------------------------------------------------------------

@asynctest
async def test_verify_bytchk_1():
    dev, _ = mem_device(blocks=64)
    await ready(dev)
    data = pattern(4 * BS)
    good(await send(dev, cdb10(0x2A, 8, 4), data))
    good(await send(dev, cdb10(0x2F, 8, 4, flags=0x02), data))
    bad = bytearray(data)
    bad[1000] ^= 0xFF
    r = await send(dev, cdb16(0x8F, 8, 4, flags=0x02), bytes(bad))
    assert bytes(r.sense) == bytes([0xF0, 0, 0x0E, 0, 0, 0x03, 0xE8, 10, 0, 0, 0, 0, 0x1D, 0,
                                    0, 0, 0, 0])
    check(await send(dev, cdb10(0x2F, 8, 4, flags=0x04)), 0x5, 0x24, 0x00)


@asynctest
async def test_verify_bytchk_3_and_0():
    dev, _ = mem_device(blocks=64)
    await ready(dev)
    block = pattern(BS, 9)
    good(await send(dev, cdb10(0x2A, 2, 3), block * 3))
    good(await send(dev, cdb10(0x2F, 2, 3, flags=0x06), block))
    r = await send(dev, cdb10(0x2F, 1, 3, flags=0x06), block)
    check(r, 0xE, 0x1D, 0x00)
    assert info_of(r.sense) == 0
    good(await send(dev, cdb10(0x2F, 0, 64)))
    check(await send(dev, cdb10(0x2F, 60, 5)), 0x5, 0x21, 0x00)


@asynctest
async def test_verify_surfaces_medium_error():
    lunio = FakeLunIO()
    lunio.bad_offset = 40 * BS + 17
    dev, _ = fake_device(lunio)
    await ready(dev)
    r = await send(dev, cdb10(0x2F, 0, 100))
    check(r, 0x3, 0x11, 0x00)
    assert info_of(r.sense) == 40


# -- synchronize cache ----------------------------------------------------------------

@asynctest
async def test_synchronize_cache_makes_data_durable():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    good(await send(dev, cdb10(0x2A, 0, 2), pattern(2 * BS)))
    assert store.durable[:2 * BS] == bytes(2 * BS)
    good(await send(dev, cdb10(0x35, 0, 0)))
    assert store.durable[:2 * BS] == pattern(2 * BS)
    good(await send(dev, cdb10(0x2A, 4, 1), pattern(BS)))
    good(await send(dev, cdb16(0x91, 4, 1, flags=0x02)))
    assert store.durable[4 * BS:5 * BS] == pattern(BS)
    check(await send(dev, cdb10(0x35, 60, 5)), 0x5, 0x21, 0x00)


@asynctest
async def test_synchronize_cache_flush_failure_is_write_error():
    from restore_core.lunio import MediumError
    lunio = FakeLunIO()
    lunio.flush_error = MediumError("fsync failed")
    dev, _ = fake_device(lunio)
    await ready(dev)
    check(await send(dev, cdb10(0x35, 0, 0)), 0x3, 0x0C, 0x00)


# -- WRITE SAME -----------------------------------------------------------------------

@asynctest
async def test_write_same_pattern():
    dev, store = mem_device(blocks=4096)
    await ready(dev)
    block = pattern(BS, 3)
    good(await send(dev, cdb10(0x41, 5, 7), block))
    assert store.current[5 * BS:12 * BS] == block * 7
    assert store.current[12 * BS:13 * BS] == bytes(BS)
    good(await send(dev, cdb16(0x93, 100, 3000), block))   # more than one chunk
    assert store.current[100 * BS:3100 * BS] == block * 3000


@asynctest
async def test_write_same_unmap_and_ndob():
    lunio = FakeLunIO()
    lunio.buf[:] = b"\xee" * len(lunio.buf)
    dev, _ = fake_device(lunio)
    await ready(dev)
    good(await send(dev, cdb16(0x93, 4, 4, flags=0x08), bytes(BS)))
    assert lunio.unmaps == [(4 * BS, 4 * BS)]
    good(await send(dev, cdb16(0x93, 10, 2, flags=0x09)))      # UNMAP + NDOB
    assert lunio.unmaps[-1] == (10 * BS, 2 * BS)
    good(await send(dev, cdb10(0x41, 20, 2, flags=0x08), b"\x01" * BS))  # non-zero: written
    assert len(lunio.unmaps) == 2 and lunio.buf[20 * BS:22 * BS] == b"\x01" * 2 * BS
    good(await send(dev, cdb16(0x93, 30, 2, flags=0x01)))      # NDOB alone: zeros written
    assert lunio.buf[30 * BS:32 * BS] == bytes(2 * BS) and len(lunio.unmaps) == 2


@asynctest
async def test_write_same_invalid():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    for flags, bit in ((0x10, 4), (0x04, 2), (0x02, 1), (0x20, 7)):
        r = await send(dev, cdb16(0x93, 0, 1, flags=flags), bytes(BS))
        check(r, 0x5, 0x24, 0x00)
        assert field_pointer(r.sense) == (True, 1, bit)
    r = await send(dev, cdb10(0x41, 0, 0), bytes(BS))
    assert field_pointer(r.sense) == (True, 7, None)
    check(await send(dev, cdb10(0x41, 60, 5), bytes(BS)), 0x5, 0x21, 0x00)
    check(await send(dev, cdb10(0x41, 0, 5), bytes(10)), 0x5, 0x0E, 0x03)
    check(await send(dev, cdb10(0x41, 0, 5), bytes(2 * BS)), 0x5, 0x0E, 0x03)   # too much
    check(await send(dev, cdb16(0x93, 0, 5)), 0x5, 0x0E, 0x03)
    assert store.writes == 0


# -- UNMAP --------------------------------------------------------------------------------

def unmap_params(ranges, extra_desc_len: int = 0) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs) + extra_desc_len) + descs


def unmap_cdb(plen: int, anchor: bool = False) -> bytes:
    return bytes([0x42, 1 if anchor else 0, 0, 0, 0, 0, 0, plen >> 8, plen & 0xFF, 0])


@asynctest
async def test_unmap():
    lunio = FakeLunIO()
    dev, _ = fake_device(lunio)
    await ready(dev)
    p = unmap_params([(1, 2), (10, 0), (20, 5)])
    good(await send(dev, unmap_cdb(len(p)), p))
    assert lunio.unmaps == [(1 * BS, 2 * BS), (20 * BS, 5 * BS)]
    good(await send(dev, unmap_cdb(0)))


@asynctest
async def test_unmap_parameter_list_validation():
    lunio = FakeLunIO()
    dev, _ = fake_device(lunio, options=DeviceOptions(max_unmap_descriptors=2, max_unmap_blocks=8))
    await ready(dev)
    check(await send(dev, unmap_cdb(4), bytes(4)), 0x5, 0x1A, 0x00)
    p = unmap_params([(1, 2)])
    check(await send(dev, unmap_cdb(len(p)), p[:10]), 0x5, 0x0E, 0x03)
    bad = bytearray(p)
    bad[0:2] = struct.pack(">H", 100)
    check(await send(dev, unmap_cdb(len(bad)), bytes(bad)), 0x5, 0x1A, 0x00)
    p = unmap_params([(1, 2), (3, 1), (5, 1)])
    r = await send(dev, unmap_cdb(len(p)), p)
    check(r, 0x5, 0x26, 0x00)
    assert field_pointer(r.sense) == (False, 2, None)
    p = unmap_params([(1, 9)])
    r = await send(dev, unmap_cdb(len(p)), p)
    check(r, 0x5, 0x26, 0x00)
    assert field_pointer(r.sense) == (False, 16, None)
    p = unmap_params([(1, 1), (255, 2)])
    check(await send(dev, unmap_cdb(len(p)), p), 0x5, 0x21, 0x00)
    r = await send(dev, unmap_cdb(len(p), anchor=True), p)
    check(r, 0x5, 0x24, 0x00)
    assert lunio.unmaps == []       # nothing happens unless the whole list is valid


@asynctest
async def test_unmap_not_supported_when_thick():
    dev, _ = mem_device(options=DeviceOptions(thin_provisioning=False))
    await ready(dev)
    p = unmap_params([(1, 1)])
    check(await send(dev, unmap_cdb(len(p)), p), 0x5, 0x20, 0x00)


@asynctest
async def test_unmap_reads_back_zeros_on_memory_store():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    good(await send(dev, cdb10(0x2A, 0, 8), b"\xff" * 8 * BS))
    p = unmap_params([(2, 3)])
    good(await send(dev, unmap_cdb(len(p)), p))
    data = good(await send(dev, cdb10(0x28, 0, 8)))
    assert data == b"\xff" * 2 * BS + bytes(3 * BS) + b"\xff" * 3 * BS


# -- COMPARE AND WRITE ----------------------------------------------------------------------

def caw_cdb(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, n, 0, 0)


@asynctest
async def test_compare_and_write():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    old, new = pattern(BS, 1), pattern(BS, 2)
    good(await send(dev, cdb10(0x2A, 7, 1), old))
    good(await send(dev, caw_cdb(7, 1), old + new))
    assert store.current[7 * BS:8 * BS] == new
    r = await send(dev, caw_cdb(7, 1), old + pattern(BS, 3))
    check(r, 0xE, 0x1D, 0x00)
    assert info_of(r.sense) == 0                    # byte 0 already differs
    expected = bytearray(new)
    expected[300] ^= 1
    r = await send(dev, caw_cdb(7, 1), bytes(expected) + old)
    assert bytes(r.sense)[:7] == bytes([0xF0, 0, 0x0E, 0, 0, 0x01, 0x2C])
    assert store.current[7 * BS:8 * BS] == new      # a miscompare writes nothing
    good(await send(dev, caw_cdb(7, 0)))
    r = await send(dev, caw_cdb(7, 2), bytes(4 * BS))
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 13, None)
    check(await send(dev, caw_cdb(64, 1), bytes(2 * BS)), 0x5, 0x21, 0x00)
    # Data-Out must be exactly 2 x NUMBER OF LOGICAL BLOCKS: the NLB field is
    # what disagrees (libiscsi's CompareAndWrite.InvalidDataOutSize, and its
    # 256-block case that wraps NLB to 0).
    for nlb, size in ((1, BS), (1, 3 * BS), (1, 4 * BS), (0, 512 * BS)):
        r = await send(dev, caw_cdb(7, nlb), bytes(size))
        check(r, 0x5, 0x24, 0x00)
        assert field_pointer(r.sense) == (True, 13, None)
    assert store.current[7 * BS:8 * BS] == new


def _counter_block(v: int) -> bytes:
    return struct.pack(">Q", v) + bytes(BS - 8)


async def _increment_workers(dev: ScsiDevice, workers: int, each: int) -> int:
    """Each worker increments a counter in block 3 by READ + COMPARE AND WRITE,
    retrying on MISCOMPARE; meanwhile writers hammer the neighbouring blocks."""
    miscompares = 0

    async def worker():
        nonlocal miscompares
        done = 0
        while done < each:
            cur = good(await send(dev, cdb10(0x28, 3, 1)))
            v = struct.unpack_from(">Q", cur)[0]
            r = await send(dev, caw_cdb(3, 1), cur + _counter_block(v + 1))
            if r.status == 0:
                done += 1
            else:
                assert bytes(r.sense)[2] & 0xF == 0xE
                miscompares += 1

    async def neighbour():
        for i in range(each):
            good(await send(dev, cdb10(0x2A, 4, 1), bytes([i & 0xFF]) * BS))

    await asyncio.gather(*(worker() for _ in range(workers)), neighbour())
    return miscompares


@asynctest
async def test_compare_and_write_is_atomic_under_concurrency():
    lunio = FakeLunIO(yields=3)
    dev, _ = fake_device(lunio)
    await ready(dev)
    good(await send(dev, cdb10(0x2A, 3, 1), _counter_block(0)))
    miscompares = await _increment_workers(dev, workers=6, each=15)
    assert struct.unpack_from(">Q", lunio.buf, 3 * BS)[0] == 6 * 15
    assert miscompares > 0            # the workers really did race


@asynctest
async def test_compare_and_write_without_the_lock_loses_updates():
    """Proves the test above can fail: with the range lock disabled, two
    COMPARE AND WRITEs compare against the same old value."""
    import contextlib

    class NoLock:
        exclusive_pending = False

        @contextlib.asynccontextmanager
        async def hold(self, *a, **k):
            yield

        def try_shared(self, *a):
            return object()

        def release(self, req):
            pass

    lunio = FakeLunIO(yields=3)
    dev, _ = fake_device(lunio)
    dev.range_lock = NoLock()
    await ready(dev)
    good(await send(dev, cdb10(0x2A, 3, 1), _counter_block(0)))
    await _increment_workers(dev, workers=6, each=15)
    assert struct.unpack_from(">Q", lunio.buf, 3 * BS)[0] < 6 * 15


@asynctest
async def test_write_waits_for_overlapping_compare_and_write():
    lunio = FakeLunIO(yields=5)
    dev, _ = fake_device(lunio)
    await ready(dev)
    old = _counter_block(1)
    good(await send(dev, cdb10(0x2A, 3, 1), old))
    caw = asyncio.create_task(send(dev, caw_cdb(3, 1), old + _counter_block(2)))
    await asyncio.sleep(0)
    wr = asyncio.create_task(send(dev, cdb10(0x2A, 3, 1), _counter_block(9)))
    good(await caw)
    good(await wr)
    # The plain write queued behind the CAW, so it is the last one to land.
    assert struct.unpack_from(">Q", lunio.buf, 3 * BS)[0] == 9


# -- GET LBA STATUS --------------------------------------------------------------------------

def gls_cdb(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


@asynctest
async def test_get_lba_status_exact():
    lunio = FakeLunIO(64 * BS)
    lunio.runs = [(0, 8 * BS, True), (8 * BS, 16 * BS, False), (24 * BS, 40 * BS, True)]
    dev, _ = fake_device(lunio)
    await ready(dev)
    data = good(await send(dev, gls_cdb(4)))
    assert data == (struct.pack(">I4x", 4 + 48)
                    + struct.pack(">QIB3x", 4, 4, 0)
                    + struct.pack(">QIB3x", 8, 16, 1)
                    + struct.pack(">QIB3x", 24, 40, 0))
    assert good(await send(dev, gls_cdb(4, alloc=24))) == data[:24]
    check(await send(dev, gls_cdb(64)), 0x5, 0x21, 0x00)


@asynctest
async def test_get_lba_status_thick_reports_everything_mapped():
    lunio = FakeLunIO(64 * BS)
    lunio.runs = [(0, 8 * BS, True), (8 * BS, 56 * BS, False)]
    dev, _ = fake_device(lunio, options=DeviceOptions(thin_provisioning=False))
    await ready(dev)
    assert good(await send(dev, gls_cdb(2)))[8:] == struct.pack(">QIB3x", 2, 62, 0)


@asynctest
async def test_get_lba_status_partial_blocks_count_as_mapped():
    lunio = FakeLunIO(16 * 4096)
    lunio.runs = [(0, 4096 + 100, True), (4096 + 100, 4 * 4096 - 100, False),
                  (5 * 4096, 11 * 4096, True)]
    dev, _ = fake_device(lunio, block_size=4096)
    await ready(dev)
    data = good(await send(dev, gls_cdb(0)))
    assert data[8:] == (struct.pack(">QIB3x", 0, 2, 0) + struct.pack(">QIB3x", 2, 3, 1)
                        + struct.pack(">QIB3x", 5, 11, 0))


def test_get_lba_status_on_sparse_file(tmp_path):
    async def go():
        store = FileBlockStore(str(tmp_path / "lu.img"), 1 << 20, create=True)
        dev = ScsiDevice(PlainLunIO(store), IDENT)
        await ready(dev)
        good(await send(dev, cdb10(0x2A, 512, 8), b"\x01" * 8 * BS))
        data = good(await send(dev, gls_cdb(0)))
        descs = [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range((len(data) - 8) // 16)]
        assert descs[0][0] == 0
        assert sum(d[1] for d in descs) == 2048
        mapped = [d for d in descs if d[2] == 0]
        assert any(d[0] <= 512 and d[0] + d[1] >= 520 for d in mapped)
        assert any(d[2] == 1 for d in descs) or os.environ.get("LR_NO_SPARSE")
        store.close()
    asyncio.run(go())


@asynctest
async def test_transfer_length_hint_for_data_out_commands():
    """extra["transfer_length"] is the CDB's Data-Out size, for residuals."""
    dev, _ = mem_device(blocks=64)
    await ready(dev)
    cases = [
        (cdb10(0x2A, 0, 2), bytes(3 * BS), 2 * BS, 0),
        (cdb6(0x0A, 0, 0), bytes(256 * BS), 256 * BS, 2),      # out of range: still reported
        (cdb12(0xAA, 0, 1), bytes(BS), BS, 0),
        (cdb16(0x8A, 0, 1), bytes(BS // 2), BS, 2),             # short: still reported
        (cdb16(0x93, 0, 4, flags=0x01), None, 0, 0),           # NDOB
        (cdb10(0x41, 0, 4), bytes(BS), BS, 0),
        (cdb10(0x2F, 0, 2, flags=0x02), bytes(2 * BS), 2 * BS, 0),
        (cdb10(0x2F, 0, 2, flags=0x06), bytes(BS), BS, 0),
        (cdb10(0x2F, 0, 2), None, 0, 0),
        (caw_cdb(0, 1), bytes(2 * BS), 2 * BS, 0),
        (bytes([0x15, 0x10, 0, 0, 0, 0]), None, 0, 0),
    ]
    for cdb, data, expected, status in cases:
        r = await send(dev, cdb, data)
        assert r.status == status, (cdb.hex(), bytes(r.sense).hex())
        assert r.transfer_length == expected, cdb.hex()
    r = await send(dev, cdb10(0x28, 0, 2))
    assert r.transfer_length is None and len(r.data_in) == 2 * BS
    r = await send(dev, [0x2A, 0])                              # short CDB: no hint
    assert r.transfer_length is None


@asynctest
async def test_twelve_byte_verify_and_write_and_verify():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    data = pattern(3 * BS, 5)
    good(await send(dev, cdb12(0xAE, 10, 3), data))
    assert store.durable[10 * BS:13 * BS] == data
    good(await send(dev, cdb12(0xAF, 10, 3, flags=0x02), data))
    r = await send(dev, cdb12(0xAF, 10, 3, flags=0x02), bytes(3 * BS))
    check(r, 0xE, 0x1D, 0x00)
    assert info_of(r.sense) == 0
    check(await send(dev, cdb12(0xAF, 62, 3)), 0x5, 0x21, 0x00)


@asynctest
async def test_pre_fetch_is_a_range_checked_no_op():
    lunio = FakeLunIO()
    dev, _ = fake_device(lunio)
    await ready(dev)
    good(await send(dev, bytes([0x34, 0x02, 0, 0, 0, 4, 0, 0, 8, 0])))
    good(await send(dev, cdb16(0x90, 0, 256)))
    check(await send(dev, cdb16(0x90, 250, 7)), 0x5, 0x21, 0x00)
    check(await send(dev, bytes([0x34, 0, 0, 0, 1, 0, 0, 0, 1, 0])), 0x5, 0x21, 0x00)
    assert lunio.writes == []
