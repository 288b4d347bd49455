"""SPC commands other than INQUIRY, mode pages and reservations."""
import struct

from target.scsi.commands import COMMANDS

from .util import (NX_A, NX_B, asynctest, check, field_pointer, good, mem_device, ready,
                   send)

TUR = [0, 0, 0, 0, 0, 0]
NO_SENSE_FIXED = bytes([0x70, 0, 0, 0, 0, 0, 0, 10] + [0] * 10)


@asynctest
async def test_first_command_gets_power_on_ua_then_good():
    dev, _ = mem_device()
    r = await send(dev, TUR)
    assert bytes(r.sense) == bytes([0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0])
    good(await send(dev, TUR))


@asynctest
async def test_request_sense_reports_and_clears_ua():
    dev, _ = mem_device()
    data = good(await send(dev, [0x03, 0, 0, 0, 252, 0]))
    assert data[:14] == bytes([0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0])
    assert good(await send(dev, [0x03, 0, 0, 0, 252, 0])) == NO_SENSE_FIXED
    good(await send(dev, TUR))     # nothing pending any more


@asynctest
async def test_request_sense_descriptor_and_truncation():
    dev, _ = mem_device()
    await ready(dev)
    assert good(await send(dev, [0x03, 1, 0, 0, 252, 0])) == bytes([0x72, 0, 0, 0, 0, 0, 0, 0])
    assert good(await send(dev, [0x03, 0, 0, 0, 4, 0])) == NO_SENSE_FIXED[:4]


@asynctest
async def test_report_luns():
    dev, _ = mem_device()
    data = good(await send(dev, [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
    assert data == bytes([0, 0, 0, 8, 0, 0, 0, 0] + [0] * 8)
    assert good(await send(dev, [0xA0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0])) == bytes(8)
    r = await send(dev, [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0])
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 6, None)
    r = await send(dev, [0xA0, 0, 0x05, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    check(r, 0x5, 0x24, 0x00)


@asynctest
async def test_start_stop_unit_accepted():
    dev, _ = mem_device()
    await ready(dev)
    good(await send(dev, [0x1B, 0, 0, 0, 0x01, 0]))
    good(await send(dev, [0x1B, 1, 0, 0, 0x00, 0]))


@asynctest
async def test_invalid_opcode_and_service_action():
    dev, _ = mem_device()
    await ready(dev)
    r = await send(dev, [0xC5] + [0] * 15)
    assert bytes(r.sense) == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0,
                                    0xC0, 0, 0])
    r = await send(dev, [0x9E, 0x1F] + [0] * 14)
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 1, 4)
    r = await send(dev, [0xA3, 0x05] + [0] * 10)     # REPORT ... other MAINTENANCE IN
    check(r, 0x5, 0x24, 0x00)


@asynctest
async def test_naca_and_short_cdbs_refused():
    dev, _ = mem_device()
    await ready(dev)
    r = await send(dev, [0, 0, 0, 0, 0, 0x04])
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 5, 2)
    check(await send(dev, [0x28, 0, 0, 0]), 0x5, 0x24, 0x00)
    check(await send(dev, b""), 0x5, 0x20, 0x00)
    check(await send(dev, [0x9E]), 0x5, 0x24, 0x00)


def _rsoc(options: int, opcode: int = 0, sa: int = 0, alloc: int = 0x10000, rctd: bool = False):
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, options | (0x80 if rctd else 0), opcode, sa,
                       alloc, 0, 0)


@asynctest
async def test_rsoc_all_commands():
    dev, _ = mem_device()
    await ready(dev)
    data = good(await send(dev, _rsoc(0)))
    n = struct.unpack_from(">I", data)[0]
    assert n == 8 * len(COMMANDS) == len(data) - 4
    listed = set()
    for i in range(len(COMMANDS)):
        op, _, sa, _, flags, cdblen = struct.unpack_from(">BBHBBH", data, 4 + 8 * i)
        listed.add((op, sa if flags & 1 else None, cdblen))
    assert (0x28, None, 10) in listed and (0x9E, 0x10, 16) in listed
    assert (0x89, None, 16) in listed and (0x5F, 0x06, 10) in listed and (0xA0, None, 12) in listed
    assert listed == {(s.opcode, s.sa, len(s.usage)) for s in COMMANDS}
    with_timeouts = good(await send(dev, _rsoc(0, rctd=True)))
    assert struct.unpack_from(">I", with_timeouts)[0] == 20 * len(COMMANDS)
    assert with_timeouts[4 + 5] & 0x02                      # CTDP
    assert with_timeouts[4 + 8:4 + 20] == bytes([0, 0x0A] + [0] * 10)


@asynctest
async def test_rsoc_one_command():
    dev, _ = mem_device()
    await ready(dev)
    data = good(await send(dev, _rsoc(1, 0x28)))
    assert data == bytes([0, 0x03, 0, 10, 0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04])
    data = good(await send(dev, _rsoc(2, 0x9E, 0x10)))
    assert data[:6] == bytes([0, 0x03, 0, 16, 0x9E, 0x10])
    data = good(await send(dev, _rsoc(3, 0x89)))
    assert data[:4] == bytes([0, 0x03, 0, 16]) and data[4 + 13] == 0xFF and data[19] == 0x04
    assert good(await send(dev, _rsoc(1, 0xC5))) == bytes([0, 0x01, 0, 0])
    assert good(await send(dev, _rsoc(2, 0x9E, 0x11))) == bytes([0, 0x01, 0, 0])
    check(await send(dev, _rsoc(1, 0x9E)), 0x5, 0x24, 0x00)     # has service actions
    check(await send(dev, _rsoc(2, 0x28)), 0x5, 0x24, 0x00)     # has none
    check(await send(dev, _rsoc(5)), 0x5, 0x24, 0x00)
    data = good(await send(dev, _rsoc(1, 0x00, rctd=True)))
    assert data[1] == 0x83 and len(data) == 4 + 6 + 12
    assert good(await send(dev, _rsoc(0, alloc=6)))[:4] == struct.pack(">I", 8 * len(COMMANDS))


@asynctest
async def test_usage_masks_match_the_opcode():
    for s in COMMANDS:
        assert s.usage[0] == s.opcode
        if s.sa is not None:
            assert s.usage[1] & 0x1F == s.sa
        assert s.usage[-1] == 0x04


@asynctest
async def test_ua_is_per_nexus():
    dev, _ = mem_device()
    await ready(dev, NX_A)
    check(await send(dev, TUR, nexus=NX_B), 0x6, 0x29, 0x00)
    good(await send(dev, TUR, nexus=NX_A))
    good(await send(dev, TUR, nexus=NX_B))
