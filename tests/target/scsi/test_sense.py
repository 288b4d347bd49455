from target.scsi import constants as c
from target.scsi.sense import CheckCondition, FieldPointer, encode_sense, invalid_cdb, invalid_param


def test_fixed_format_with_information_and_field_pointer():
    s = encode_sense(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_CDB, information=0x01020304,
                     field=FieldPointer(7, 3, True))
    assert s == bytes([0xF0, 0, 0x05, 1, 2, 3, 4, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xCB, 0, 7])


def test_fixed_format_plain():
    s = encode_sense(c.UNIT_ATTENTION, c.ASC_POWER_ON_RESET)
    assert s == bytes([0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0])


def test_fixed_format_information_too_large_is_not_valid():
    s = encode_sense(c.MEDIUM_ERROR, c.ASC_UNRECOVERED_READ_ERROR, information=1 << 33)
    assert s[0] == 0x70 and s[3:7] == bytes(4)


def test_descriptor_format():
    s = encode_sense(c.MEDIUM_ERROR, c.ASC_UNRECOVERED_READ_ERROR, descriptor=True,
                     information=1 << 33)
    assert s == bytes([0x72, 0x03, 0x11, 0x00, 0, 0, 0, 12,
                       0x00, 0x0A, 0x80, 0, 0, 0, 0, 2, 0, 0, 0, 0])


def test_descriptor_format_field_pointer_parameter_list():
    s = invalid_param(0x102, None).encode(True)
    assert s == bytes([0x72, 0x05, 0x26, 0x00, 0, 0, 0, 8, 0x02, 0x06, 0, 0, 0x80, 0x01, 0x02, 0])


def test_check_condition_shorthand():
    e = invalid_cdb(1, 4)
    assert isinstance(e, CheckCondition)
    assert e.encode(False)[15:18] == bytes([0xCC, 0, 1])
