"""MODE SENSE / MODE SELECT."""
import struct

from .util import (NX_A, NX_B, FakeLunIO, asynctest, check, fake_device, field_pointer, good,
                   mem_device, ready, send, sense_of)

PAGE_01 = bytes([0x01, 0x0A] + [0] * 10)
PAGE_08 = bytes([0x08, 0x12, 0x04] + [0] * 17)
PAGE_0A = bytes([0x0A, 0x0A, 0x00, 0x10] + [0] * 8)
PAGE_1C = bytes([0x1C, 0x0A] + [0] * 10)
ALL = PAGE_01 + PAGE_08 + PAGE_0A + PAGE_1C


def ms6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, sub: int = 0) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0])


def ms10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024) -> bytes:
    return bytes([0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), (pc << 6) | page, 0,
                  0, 0, 0, alloc >> 8, alloc & 0xFF, 0])


@asynctest
async def test_mode_sense6_all_pages_exact():
    dev, _ = mem_device(blocks=256)
    await ready(dev)
    data = good(await send(dev, ms6(0x3F)))
    assert data == bytes([67, 0, 0x10, 8, 0, 0, 1, 0, 0, 0, 2, 0]) + ALL
    assert good(await send(dev, ms6(0x3F, sub=0xFF))) == data
    assert good(await send(dev, ms6(0x3F, alloc=4))) == data[:4]


@asynctest
async def test_mode_sense6_single_page_dbd():
    dev, _ = mem_device()
    await ready(dev)
    assert good(await send(dev, ms6(0x08, dbd=True))) == bytes([23, 0, 0x10, 0]) + PAGE_08
    assert good(await send(dev, ms6(0x0A, dbd=True))) == bytes([15, 0, 0x10, 0]) + PAGE_0A


@asynctest
async def test_mode_sense10_long_lba_descriptor():
    dev, _ = mem_device(blocks=256)
    await ready(dev)
    data = good(await send(dev, ms10(0x08, llbaa=True)))
    assert data[:8] == bytes([0, 6 + 16 + 20, 0, 0x10, 0x01, 0, 0, 16])
    assert data[8:24] == struct.pack(">QII", 256, 0, 512)
    assert data[24:] == PAGE_08
    data = good(await send(dev, ms10(0x08)))
    assert data[:8] == bytes([0, 6 + 8 + 20, 0, 0x10, 0, 0, 0, 8])
    assert data[8:16] == bytes([0, 0, 1, 0, 0, 0, 2, 0])


@asynctest
async def test_mode_sense_page_controls():
    dev, _ = mem_device()
    await ready(dev)
    ch = good(await send(dev, ms6(0x08, pc=1, dbd=True)))
    assert ch[4:] == bytes([0x08, 0x12, 0x04] + [0] * 17)
    ch = good(await send(dev, ms6(0x0A, pc=1, dbd=True)))
    assert ch[4:] == bytes([0x0A, 0x0A, 0x04] + [0] * 9)
    assert good(await send(dev, ms6(0x3F, pc=2, dbd=True)))[4:] == ALL
    check(await send(dev, ms6(0x3F, pc=3)), 0x5, 0x39, 0x00)
    r = await send(dev, ms6(0x19))
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 2, 5)
    check(await send(dev, ms6(0x08, sub=1)), 0x5, 0x24, 0x00)


@asynctest
async def test_mode_sense_big_lun_and_write_protect():
    lunio = FakeLunIO(3 << 41, sparse=True)     # 6 TiB: more blocks than 32 bits
    dev, lunio = fake_device(lunio)
    await ready(dev)
    assert good(await send(dev, ms6(0x08)))[4:8] == b"\xff\xff\xff\xff"
    from restore_core.lunio import Access, AccessState
    lunio.state = AccessState(Access.READ_ONLY, "clone while paired")
    assert good(await send(dev, ms6(0x08)))[2] == 0x90
    assert good(await send(dev, ms10(0x08)))[3] == 0x90


def select6(params: bytes, sp: bool = False) -> bytes:
    return bytes([0x15, 0x10 | (1 if sp else 0), 0, 0, len(params), 0])


def select10(params: bytes) -> bytes:
    return bytes([0x55, 0x10, 0, 0, 0, 0, 0, len(params) >> 8, len(params) & 0xFF, 0])


@asynctest
async def test_mode_select_wce_off_makes_writes_durable():
    dev, store = mem_device()
    await ready(dev, NX_A, NX_B)
    caching = bytearray(PAGE_08)
    caching[2] = 0x00
    good(await send(dev, select6(bytes(4) + bytes(caching)), bytes(4) + bytes(caching)))
    assert good(await send(dev, ms6(0x08, dbd=True)))[6] == 0x00
    good(await send(dev, bytes([0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0]), b"\x5a" * 512))
    assert store.durable[3 * 512:4 * 512] == b"\x5a" * 512
    # The other nexus hears about it; the one that changed it does not.
    check(await send(dev, [0, 0, 0, 0, 0, 0], nexus=NX_B), 0x6, 0x2A, 0x01)
    good(await send(dev, [0, 0, 0, 0, 0, 0], nexus=NX_A))


@asynctest
async def test_write_cache_on_leaves_writes_volatile():
    dev, store = mem_device()
    await ready(dev)
    good(await send(dev, bytes([0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0]), b"\x5a" * 512))
    assert store.durable[3 * 512:4 * 512] == bytes(512)
    good(await send(dev, bytes([0x2A, 0x08, 0, 0, 0, 4, 0, 0, 1, 0]), b"\x5b" * 512))  # FUA
    assert store.durable[4 * 512:5 * 512] == b"\x5b" * 512


@asynctest
async def test_mode_select_d_sense_switches_sense_format():
    dev, _ = mem_device()
    await ready(dev)
    control = bytearray(PAGE_0A)
    control[2] = 0x04
    params = bytes(8) + bytes(control)
    good(await send(dev, select10(params), params))
    r = await send(dev, [0xC5] + [0] * 15)
    assert bytes(r.sense)[:4] == bytes([0x72, 0x05, 0x20, 0x00])
    assert sense_of(r.sense) == (0x5, 0x20, 0x00)


@asynctest
async def test_mode_select_with_block_descriptor():
    dev, _ = mem_device()
    await ready(dev)
    params = bytes([0, 0, 0, 8]) + bytes([0, 0, 0, 0, 0, 0, 2, 0]) + PAGE_08
    good(await send(dev, select6(params), params))
    bad = bytes([0, 0, 0, 8]) + bytes([0, 0, 0, 0, 0, 0, 16, 0]) + PAGE_08
    r = await send(dev, select6(bad), bad)
    check(r, 0x5, 0x26, 0x00)
    assert field_pointer(r.sense) == (False, 9, None)


@asynctest
async def test_mode_select_errors():
    dev, _ = mem_device()
    await ready(dev)
    caching = bytearray(PAGE_08)
    caching[3] = 0x10                       # not changeable
    params = bytes(4) + bytes(caching)
    r = await send(dev, select6(params), params)
    check(r, 0x5, 0x26, 0x00)
    assert field_pointer(r.sense) == (False, 7, None)
    params = bytes(4) + bytes([0x08, 0x10]) + bytes(16)     # wrong page length
    check(await send(dev, select6(params), params), 0x5, 0x26, 0x00)
    params = bytes(4) + bytes([0x19, 0x06]) + bytes(6)      # unsupported page
    check(await send(dev, select6(params), params), 0x5, 0x26, 0x00)
    params = bytes(4) + PAGE_08[:10]                         # truncated page
    check(await send(dev, select6(params), params), 0x5, 0x1A, 0x00)
    check(await send(dev, select6(bytes(2)), bytes(2)), 0x5, 0x1A, 0x00)
    r = await send(dev, select6(bytes(4) + PAGE_08, sp=True), bytes(4) + PAGE_08)
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 1, 0)
    check(await send(dev, select6(bytes(4) + PAGE_08), bytes(4)), 0x5, 0x0E, 0x03)
    good(await send(dev, bytes([0x15, 0x10, 0, 0, 0, 0])))  # empty list: no-op
    # Nothing above changed state.
    assert good(await send(dev, ms6(0x3F, dbd=True)))[4:] == ALL


@asynctest
async def test_lun_reset_restores_mode_defaults():
    dev, _ = mem_device()
    await ready(dev)
    caching = bytearray(PAGE_08)
    caching[2] = 0
    good(await send(dev, select6(bytes(4) + bytes(caching)), bytes(4) + bytes(caching)))
    await dev.lun_reset(NX_A)
    await ready(dev)
    assert good(await send(dev, ms6(0x08, dbd=True)))[6] == 0x04
