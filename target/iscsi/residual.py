"""How many Data-Out bytes a CDB asks for, so the transport can report
write residuals (RFC 7143 11.4.5) when the SCSI layer does not say
(``ScsiResponse.transfer_length`` wins when present).

Block-counted commands need the LU's block size; parameter-list commands
carry a byte count in the CDB. Unknown opcodes return None (no residual).
"""
from __future__ import annotations

from . import pdu as P

RESIDUAL_MAX = P.ALL_ONES      # the Residual Count field is 32 bits wide


def _be(b: bytes, start: int, end: int) -> int:
    return int.from_bytes(b[start:end], "big")


# opcode -> (offset, end) of the transfer length in blocks
_BLOCKS = {
    0x2A: (7, 9),     # WRITE(10)
    0x2E: (7, 9),     # WRITE AND VERIFY(10)
    0xAA: (6, 10),    # WRITE(12)
    0xAE: (6, 10),    # WRITE AND VERIFY(12)
    0x8A: (10, 14),   # WRITE(16)
    0x8E: (10, 14),   # WRITE AND VERIFY(16)
}
# opcode -> (offset, end) of a parameter list length in bytes
_BYTES = {
    0x15: (4, 5),     # MODE SELECT(6)
    0x55: (7, 9),     # MODE SELECT(10)
    0x5F: (5, 9),     # PERSISTENT RESERVE OUT
    0x42: (7, 9),     # UNMAP
    0x3B: (6, 9),     # WRITE BUFFER
    0x83: (10, 14),   # EXTENDED COPY
    0x1D: (3, 5),     # SEND DIAGNOSTIC
}


def data_out_length(cdb: bytes, block_size: int | None) -> int | None:
    if not cdb:
        return None
    op = cdb[0]
    try:
        if op == 0x0A and len(cdb) >= 6:                       # WRITE(6): 0 means 256
            return (cdb[4] or 256) * block_size if block_size else None
        if op in _BLOCKS:
            s, e = _BLOCKS[op]
            if len(cdb) < e or not block_size:
                return None
            return _be(cdb, s, e) * block_size
        if op in (0x41, 0x93) and block_size:                  # WRITE SAME(10/16): one block
            return 0 if cdb[1] & 0x01 else block_size           # NDOB: no data
        if op == 0x89 and len(cdb) >= 14 and block_size:      # COMPARE AND WRITE
            return 2 * cdb[13] * block_size
        if op in _BYTES:
            s, e = _BYTES[op]
            if len(cdb) < e:
                return None
            return _be(cdb, s, e)
    except (IndexError, TypeError):
        return None
    return None


def block_size_of(scsi_target, lun: int) -> int | None:
    """Block size of an LU if the SCSI target exposes it (LunSet.device(lun).block_size)."""
    dev_of = getattr(scsi_target, "device", None)
    if dev_of is None:
        return getattr(scsi_target, "block_size", None)
    try:
        dev = dev_of(lun)
    except Exception:
        return None
    return getattr(dev, "block_size", None)


def residual_count(xfer: int, edtl: int) -> tuple[int, int]:
    """(O/U flag, Residual Count) of a command whose SCSI transfer length is
    ``xfer`` bytes and whose Expected Data Transfer Length is ``edtl``
    (RFC 7143 11.4.5). ``xfer`` comes from the CDB (up to 2^32 blocks times
    the block size), so an overflow can exceed the 32-bit field: it is then
    reported as the largest count the field holds, still with the O bit."""
    if xfer > edtl:
        return P.RSP_OVERFLOW, min(xfer - edtl, RESIDUAL_MAX)
    if xfer < edtl:
        return P.RSP_UNDERFLOW, edtl - xfer
    return 0, 0
