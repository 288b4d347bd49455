"""Sense data: the CheckCondition exception command handlers raise, and its
encoding in fixed (70h) or descriptor (72h) format.

Handlers never build sense bytes themselves; they raise CheckCondition with
the key/ASC/ASCQ and optional INFORMATION and sense-key-specific field
pointer. The device turns it into bytes in whatever format the initiator
asked for (control mode page D_SENSE, or REQUEST SENSE's DESC bit).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from . import constants as c


@dataclass(frozen=True)
class FieldPointer:
    """Sense-key-specific field pointer (SPC-4 4.5.2.4.2) for ILLEGAL REQUEST."""

    byte: int
    bit: int | None = None    # None: whole byte (BPV=0)
    in_cdb: bool = True       # C/D: CDB (1) or parameter list (0)

    def encode(self) -> bytes:
        b0 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 0x7)
        return bytes((b0, (self.byte >> 8) & 0xFF, self.byte & 0xFF))


class CheckCondition(Exception):
    """Terminate the command with CHECK CONDITION and this sense data."""

    def __init__(self, key: int, asc_ascq: tuple[int, int], *,
                 information: int | None = None, field: FieldPointer | None = None,
                 message: str = "") -> None:
        super().__init__(message or f"sense {key:x}/{asc_ascq[0]:02x}/{asc_ascq[1]:02x}")
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.information = information
        self.field = field

    def encode(self, descriptor: bool) -> bytes:
        return encode_sense(self.key, (self.asc, self.ascq), descriptor=descriptor,
                            information=self.information, field=self.field)


class ReservationConflict(Exception):
    """Terminate the command with RESERVATION CONFLICT status (no sense data)."""


def encode_sense(key: int, asc_ascq: tuple[int, int], *, descriptor: bool = False,
                 information: int | None = None, field: FieldPointer | None = None) -> bytes:
    asc, ascq = asc_ascq
    if descriptor:
        descs = bytearray()
        if information is not None:
            # Information descriptor (type 00h), VALID=1, 8-byte field.
            descs += struct.pack(">BBBxQ", 0x00, 0x0A, 0x80, information & 0xFFFFFFFFFFFFFFFF)
        if field is not None:
            # Sense key specific descriptor (type 02h).
            descs += bytes((0x02, 0x06, 0, 0)) + field.encode() + b"\x00"
        return bytes((0x72, key & 0xF, asc, ascq, 0, 0, 0, len(descs))) + bytes(descs)
    buf = bytearray(18)
    buf[0] = 0x70
    buf[2] = key & 0xF
    # The fixed format has only 32 bits of INFORMATION: VALID only if it fits
    # (SPC-4 4.5.3); larger LBAs need descriptor sense to be reported.
    if information is not None and 0 <= information <= 0xFFFFFFFF:
        buf[0] |= 0x80
        struct.pack_into(">I", buf, 3, information)
    buf[7] = 10
    buf[12] = asc
    buf[13] = ascq
    if field is not None:
        buf[15:18] = field.encode()
    return bytes(buf)


# -- shorthands for the common conditions -----------------------------------

def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_CDB,
                          field=FieldPointer(byte, bit, True))


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_PARAMETER_LIST,
                          field=FieldPointer(byte, bit, False))


def invalid_opcode() -> CheckCondition:
    return CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_OPCODE,
                          field=FieldPointer(0, None, True))


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(c.ILLEGAL_REQUEST, c.ASC_LBA_OUT_OF_RANGE)


def param_list_length_error() -> CheckCondition:
    return CheckCondition(c.ILLEGAL_REQUEST, c.ASC_PARAMETER_LIST_LENGTH_ERROR)


def short_data_out() -> CheckCondition:
    """Data-Out holds fewer bytes than the CDB says: the command IU is
    inconsistent with itself (as LIO reports an under-length WRITE)."""
    return CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_COMMAND_IU)
