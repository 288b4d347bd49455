"""Residual counts (RFC 7143 11.4.5).

The SCSI transfer length they are computed from comes from the SCSI layer:
``len(data_in)`` for reads, ``ScsiResponse.transfer_length`` (decoded from
the CDB by target.scsi.commands) for Data-Out commands.
"""
from __future__ import annotations

from . import pdu as P

RESIDUAL_MAX = P.ALL_ONES      # the Residual Count field is 32 bits wide


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
