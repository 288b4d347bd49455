"""Small CDB decoding helpers shared by the command handlers."""
from __future__ import annotations

from .sense import short_data_out

Data = bytes | bytearray | memoryview


def be(buf: bytes, start: int, end: int) -> int:
    return int.from_bytes(buf[start:end], "big")


def data_len(data: Data | None) -> int:
    """Size in bytes of a Data-Out buffer (whatever its memoryview format)."""
    return 0 if data is None else memoryview(data).nbytes


def data_out_view(data_out: Data | None, nbytes: int) -> memoryview:
    """The first ``nbytes`` of Data-Out as a byte memoryview (no copy).

    The CDB decides how much data the command carries; extra bytes are
    ignored (the transport reports the residual), missing ones make the
    command fail rather than write short.
    """
    if nbytes == 0:
        return memoryview(b"")
    if data_out is None:
        raise short_data_out()
    mv = memoryview(data_out)
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format != "B":
        try:
            mv = mv.cast("B")
        except TypeError:
            mv = memoryview(mv.tobytes())
    if len(mv) < nbytes:
        raise short_data_out()
    return mv[:nbytes]


def first_difference(a: Data, b: Data) -> int:
    """Index of the first byte where equal-length a and b differ (-1 if none).

    XOR of two big integers runs in C; the highest set bit of the result
    locates the first differing byte without a Python loop per byte.
    """
    if a == b:
        return -1
    n = len(a)
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return n - 1 - (x.bit_length() - 1) // 8


def encode_lun(lun: int) -> bytes:
    """SAM-5 single-level LUN: peripheral (<256) or flat space addressing."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | ((lun >> 8) & 0x3F), lun & 0xFF)) + bytes(6)
