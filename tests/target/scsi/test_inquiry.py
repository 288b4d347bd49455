"""INQUIRY: standard data and VPD pages, byte for byte."""
import struct

from target.scsi import DeviceOptions

from .util import (IDENT, NX_A, TPORT, asynctest, check, field_pointer, good, mem_device,
                   send)


def _standard_expected() -> bytes:
    buf = bytearray(74)
    buf[0:8] = bytes([0x00, 0x00, 0x06, 0x12, 69, 0x00, 0x00, 0x02])
    buf[8:16] = b"LIVERST "
    buf[16:32] = b"lr-disk".ljust(16)
    buf[32:36] = b"0001"
    buf[58:64] = bytes([0x00, 0xA0, 0x04, 0x60, 0x04, 0xC0])
    return bytes(buf)


@asynctest
async def test_standard_inquiry_exact():
    dev, _ = mem_device()
    data = good(await send(dev, [0x12, 0, 0, 0, 255, 0]))
    assert data == _standard_expected()


@asynctest
async def test_standard_inquiry_truncated_to_allocation_length_and_no_ua_consumed():
    dev, _ = mem_device()
    assert good(await send(dev, [0x12, 0, 0, 0, 36, 0])) == _standard_expected()[:36]
    assert good(await send(dev, [0x12, 0, 0, 0, 0, 0])) == b""
    # INQUIRY did not consume the power-on unit attention.
    check(await send(dev, [0, 0, 0, 0, 0, 0]), 0x6, 0x29, 0x00)


@asynctest
async def test_inquiry_invalid_fields():
    dev, _ = mem_device()
    r = await send(dev, [0x12, 0x02, 0, 0, 255, 0])     # CMDDT
    check(r, 0x5, 0x24, 0x00)
    assert bytes(r.sense)[15:18] == bytes([0xC9, 0x00, 0x01])
    r = await send(dev, [0x12, 0x00, 0x80, 0, 255, 0])  # page code without EVPD
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 2, None)
    r = await send(dev, [0x12, 0x01, 0xC7, 0, 255, 0])  # unsupported VPD page
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 2, None)


@asynctest
async def test_vpd_supported_pages_and_serial():
    dev, _ = mem_device()
    assert good(await send(dev, [0x12, 1, 0x00, 0, 255, 0])) == bytes(
        [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    assert good(await send(dev, [0x12, 1, 0x80, 0, 255, 0])) == b"\x00\x80\x00\x06LR0001"


def _designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 4
    assert struct.unpack_from(">H", page, 2)[0] == len(page) - 4
    while pos < len(page):
        code_set, b1, _, n = page[pos:pos + 4]
        out.append((code_set & 0xF, (b1 >> 4) & 0x3, b1 & 0xF, page[pos + 4:pos + 4 + n]))
        pos += 4 + n
    assert pos == len(page)
    return out


@asynctest
async def test_vpd_device_identification():
    dev, _ = mem_device()
    page = good(await send(dev, [0x12, 1, 0x83, 0, 255, 0], nexus=NX_A))
    assert page[:2] == b"\x00\x83"
    des = _designators(page)
    assert des[0] == (1, 0, 3, bytes.fromhex("6001405aabbccdd00112233445566778"))
    assert des[1] == (2, 0, 1, b"LIVERST LR0001")
    assert des[2] == (1, 1, 4, bytes([0, 0, 0, 1]))      # relative target port 1
    assert des[3][:3] == (3, 1, 8)
    assert des[3][3].rstrip(b"\x00") == TPORT.encode() and len(des[3][3]) % 4 == 0


def test_naa5_identity_accepted_and_bad_naa_refused():
    import pytest
    from target.scsi import DeviceIdentity
    ok = DeviceIdentity("p", "1", "s", "naa.5001405abcdef012", "s")
    assert ok.naa_bytes() == bytes.fromhex("5001405abcdef012")
    for bad in ("7001405abcdef012", "6001405abcdef012", "zz", "5001405abcdef01"):
        with pytest.raises(ValueError):
            DeviceIdentity("p", "1", "s", bad, "s")


@asynctest
async def test_vpd_block_limits():
    dev, _ = mem_device()
    page = good(await send(dev, [0x12, 1, 0xB0, 0, 255, 0]))
    assert page[:4] == bytes([0, 0xB0, 0, 0x3C]) and len(page) == 64
    assert page[4] == 0x01                                   # WSNZ
    assert page[5] == 1                                      # max COMPARE AND WRITE
    assert struct.unpack_from(">H", page, 6)[0] == 8         # 4 KiB granularity
    assert struct.unpack_from(">I", page, 8)[0] == 65536     # 32 MiB max transfer
    assert struct.unpack_from(">I", page, 12)[0] == 16384    # 8 MiB optimal
    assert struct.unpack_from(">I", page, 20)[0] == 1 << 20  # max unmap LBAs (512 MiB)
    assert struct.unpack_from(">I", page, 24)[0] == 64       # max unmap descriptors
    assert struct.unpack_from(">I", page, 28)[0] == 1
    assert struct.unpack_from(">I", page, 32)[0] == 0x80000000
    assert struct.unpack_from(">Q", page, 36)[0] == (1 << 30) // 512   # max WRITE SAME


@asynctest
async def test_vpd_block_limits_honours_options_and_4k_blocks():
    dev, _ = mem_device(block_size=4096, options=DeviceOptions(
        max_transfer_blocks=128, max_compare_and_write_blocks=4))
    page = good(await send(dev, [0x12, 1, 0xB0, 0, 255, 0]))
    assert page[5] == 4
    assert struct.unpack_from(">H", page, 6)[0] == 1
    assert struct.unpack_from(">I", page, 8)[0] == 128


@asynctest
async def test_vpd_characteristics_and_provisioning():
    dev, _ = mem_device()
    b1 = good(await send(dev, [0x12, 1, 0xB1, 0, 255, 0]))
    assert b1[:6] == bytes([0, 0xB1, 0, 0x3C, 0, 1]) and len(b1) == 64
    b2 = good(await send(dev, [0x12, 1, 0xB2, 0, 255, 0]))
    assert b2 == bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0])


@asynctest
async def test_thick_device_reports_no_provisioning():
    dev, _ = mem_device(options=DeviceOptions(thin_provisioning=False))
    b2 = good(await send(dev, [0x12, 1, 0xB2, 0, 255, 0]))
    assert b2 == bytes([0, 0xB2, 0, 4, 0, 0, 0, 0])
    b0 = good(await send(dev, [0x12, 1, 0xB0, 0, 255, 0]))
    assert b0[20:36] == bytes(16)


def test_identity_validation():
    import pytest
    from target.scsi import DeviceIdentity
    with pytest.raises(ValueError):
        DeviceIdentity("p" * 17, "1", "s", IDENT.naa, "s")
    with pytest.raises(ValueError):
        DeviceIdentity("p", "12345", "s", IDENT.naa, "s")
