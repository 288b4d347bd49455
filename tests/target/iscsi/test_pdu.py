"""PDU codec: exact bytes of BHS fields, AHS, padding and CRC32C digests."""
import pytest

from target.iscsi import pdu as P

# RFC 3720 B.4 / RFC 7143 Appendix: CRC32C examples, as sent on the wire.
CRC_VECTORS = [
    (bytes(32), "aa36918a"),
    (b"\xff" * 32, "43aba862"),
    (bytes(range(32)), "4e79dd46"),
    (bytes(range(31, -1, -1)), "5cdb3f11"),
]
# The SCSI READ(10) command PDU of the same appendix.
READ10_BHS = bytes.fromhex(
    "01c00000" "00000000" "00000000" "00000000" "14000000" "00000400"
    "00000014" "00000018" "28000000" "00000000" "02000000" "00000000")


@pytest.mark.parametrize("data,crc", CRC_VECTORS)
def test_crc32c_known_answers(data, crc):
    assert P.digest_bytes(data).hex() == crc
    # digests may be computed over pieces
    assert P.digest_bytes(data[:7], data[7:]).hex() == crc


def test_header_digest_of_rfc_read10_pdu():
    enc = P.encode_bytes(bytearray(READ10_BHS), header_digest=True)
    assert enc == READ10_BHS + bytes.fromhex("563a96d9")
    pdu, used = P.decode_pdu(enc, header_digest=True)
    assert used == 52
    assert pdu.opcode == P.OP_SCSI_CMD and not pdu.immediate
    assert pdu.flags == 0xC0 and pdu.itt == 0x14000000
    assert pdu.u32(20) == 0x400 and pdu.cmdsn == 0x14 and pdu.exp_statsn == 0x18
    assert pdu.bhs[32] == 0x28


def test_build_scsi_response_exact_bytes():
    bhs = P.build_bhs(P.OP_SCSI_RSP, P.FLAG_FINAL | P.RSP_UNDERFLOW, b2=0, b3=0x02, itt=0x11223344,
                      fields={24: 7, 28: 8, 32: 135, 36: 2, 44: 512})
    sense = bytes(18)
    out = P.encode_bytes(bhs, len(sense).to_bytes(2, "big") + sense)
    expect = bytearray(48)
    expect[0] = 0x21
    expect[1] = 0x82
    expect[3] = 0x02
    expect[5:8] = (20).to_bytes(3, "big")
    expect[16:20] = bytes.fromhex("11223344")
    expect[24:28] = (7).to_bytes(4, "big")
    expect[28:32] = (8).to_bytes(4, "big")
    expect[32:36] = (135).to_bytes(4, "big")
    expect[36:40] = (2).to_bytes(4, "big")
    expect[44:48] = (512).to_bytes(4, "big")
    assert out == bytes(expect) + b"\x00\x12" + sense   # 20 bytes: no padding


def test_padding_and_data_digest():
    bhs = P.build_bhs(P.OP_NOP_IN, P.FLAG_FINAL, itt=1)
    out = P.encode_bytes(bhs, b"hello", header_digest=True, data_digest=True)
    assert len(out) == 48 + 4 + 5 + 3 + 4
    assert out[52:57] == b"hello" and out[57:60] == b"\0\0\0"
    assert out[60:64] == P.digest_bytes(b"hello\0\0\0")
    assert out[48:52] == P.digest_bytes(out[:48])
    assert out[5:8] == b"\x00\x00\x05"      # DataSegmentLength excludes padding
    pdu, used = P.decode_pdu(out, header_digest=True, data_digest=True)
    assert used == len(out) and bytes(pdu.data) == b"hello"


def test_no_data_digest_without_data():
    bhs = P.build_bhs(P.OP_NOP_IN, P.FLAG_FINAL, itt=1)
    assert len(P.encode_bytes(bhs, b"", header_digest=True, data_digest=True)) == 52


def test_digest_errors_detected():
    bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, itt=5)
    out = bytearray(P.encode_bytes(bhs, b"abcd", header_digest=True, data_digest=True))
    bad = bytearray(out)
    bad[20] ^= 1
    with pytest.raises(P.DigestError):
        P.decode_pdu(bad, header_digest=True, data_digest=True)
    bad = bytearray(out)
    bad[53] ^= 1
    with pytest.raises(P.DigestError) as ei:
        P.decode_pdu(bad, header_digest=True, data_digest=True)
    assert ei.value.reason == P.REJECT_DATA_DIGEST and not ei.value.fatal


def test_truncated_and_oversized():
    bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, itt=5)
    out = P.encode_bytes(bhs, b"x" * 10)
    for cut in (0, 47, 48, 57):
        with pytest.raises(P.PduError):
            P.decode_pdu(out[:cut])
    with pytest.raises(P.PduError):
        P.decode_pdu(out, max_data=8)


def test_ahs_extended_cdb_round_trip():
    ext = bytes(range(16, 32))
    ahs = P.build_ahs(P.AHS_EXTENDED_CDB, b"\0" + ext)
    # AHSLength = CDB length - 15 = 17: type 1, reserved byte, 16 CDB bytes, no pad
    assert ahs[:4] == bytes((0, 17, 1, 0)) and len(ahs) == 20 and ahs[4:] == ext
    odd = P.build_ahs(P.AHS_EXTENDED_CDB, b"\0" + ext[:5])      # 3+6 bytes -> 3 pad
    assert odd == bytes((0, 6, 1, 0)) + ext[:5] + b"\0\0\0"
    bhs = P.build_bhs(P.OP_SCSI_CMD, 0x80, itt=9)
    out = P.encode_bytes(bhs, b"", ahs=ahs)
    assert out[4] == 5                       # TotalAHSLength in words
    pdu, _ = P.decode_pdu(out)
    assert list(P.iter_ahs(pdu.ahs)) == [(1, b"\0" + ext)]


def test_ahs_overrun_rejected():
    with pytest.raises(P.PduError):
        list(P.iter_ahs(bytes((0, 40, 1, 0))))


@pytest.mark.parametrize("lun,raw", [(0, "0000000000000000"), (5, "0005000000000000"),
                                     (255, "00ff000000000000"), (300, "412c000000000000"),
                                     (16383, "7fff000000000000")])
def test_lun_encoding(lun, raw):
    assert P.encode_lun(lun).hex() == raw
    assert P.decode_lun(bytes.fromhex(raw)) == lun


def test_bad_lun_methods():
    assert P.decode_lun(bytes.fromhex("c000000000000000")) == -1
    assert P.decode_lun(bytes.fromhex("0105000000000000")) == -1     # bus 1
    with pytest.raises(ValueError):
        P.encode_lun(20000)


def test_login_response_fields():
    bhs = P.build_bhs(P.OP_LOGIN_RSP, P.FLAG_TRANSIT | (1 << 2) | 3, itt=0xABCDEF01,
                      raw={8: bytes.fromhex("400001370000") + (9).to_bytes(2, "big"), 36: bytes((2, 1))},
                      fields={24: 100, 28: 5, 32: 132})
    assert bhs[0] == 0x23 and bhs[1] == 0x87
    assert bhs[8:14].hex() == "400001370000" and bhs[14:16] == b"\x00\x09"
    assert bhs[36] == 2 and bhs[37] == 1
    pdu = P.Pdu(bytes(bhs))
    assert pdu.u32(24) == 100 and pdu.u16(14) == 9 and pdu.itt == 0xABCDEF01


def test_pack_bhs_matches_build_bhs():
    fast = P.pack_bhs(P.OP_DATA_IN, 0x81, 0, 2, P.encode_lun(3), 0x01020304, P.ALL_ONES, 5, 6, 7, 8,
                      9, 10)
    slow = P.build_bhs(P.OP_DATA_IN, 0x81, b3=2, lun=3, itt=0x01020304,
                       fields={20: P.ALL_ONES, 24: 5, 28: 6, 32: 7, 36: 8, 40: 9, 44: 10})
    assert fast == slow and len(fast) == 48
    assert P.encode_bytes(fast, b"ab")[5:8] == b"\x00\x00\x02"
