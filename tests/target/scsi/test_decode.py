"""commands.decode: each CDB decoded once; the one place that knows where
the LBA and transfer length sit and how many Data-Out bytes a command
carries (the transports' residuals and TCMU's buffer direction ask it)."""
from __future__ import annotations

import struct

import pytest

from target.scsi.commands import decode, returns_data_in


@pytest.mark.parametrize("cdb,bs,want", [
    (bytes((0x0A, 0, 0, 0, 0, 0)), 512, 256 * 512),                     # WRITE(6): 0 = 256 blocks
    (bytes((0x0A, 0, 0, 0, 3, 0)), 4096, 3 * 4096),
    (struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 7, 0), 512, 7 * 512),         # WRITE(10)
    (struct.pack(">BBIBHB", 0x2E, 0, 0, 0, 2, 0), 512, 1024),           # WRITE AND VERIFY(10)
    (struct.pack(">BBIIBB", 0xAA, 0, 0, 9, 0, 0), 512, 9 * 512),         # WRITE(12)
    (struct.pack(">BBQIBB", 0x8A, 0, 0, 70000, 0, 0), 512, 70000 * 512),  # WRITE(16)
    (struct.pack(">BBQIBB", 0x93, 0, 0, 100, 0, 0), 512, 512),           # WRITE SAME(16): one block
    (struct.pack(">BBQIBB", 0x93, 1, 0, 100, 0, 0), 512, 0),             # ... NDOB
    (struct.pack(">BBIBHB", 0x41, 0, 0, 0, 9, 0), 512, 512),             # WRITE SAME(10)
    (bytes((0x89,) + (0,) * 12 + (1, 0, 0)), 512, 1024),               # COMPARE AND WRITE, NLB 1
    (struct.pack(">BBIBHB", 0x2F, 0x02, 0, 0, 3, 0), 512, 3 * 512),     # VERIFY(10) BYTCHK 1
    (struct.pack(">BBIBHB", 0x2F, 0x06, 0, 0, 3, 0), 512, 512),         # ... BYTCHK 3: one block
    (struct.pack(">BBIBHB", 0x2F, 0x00, 0, 0, 3, 0), 512, 0),           # ... BYTCHK 0: none
    (struct.pack(">BBBHIB", 0x5F, 0, 0, 0, 24, 0), 512, 24),             # PR OUT: bytes
    (bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0)), 512, 24),               # UNMAP
    (bytes((0x15, 0x10, 0, 0, 28, 0)), 512, 28),                        # MODE SELECT(6)
    (bytes((0x15, 0x10, 0, 0, 0, 0)), 512, 0),                          # ... 0 is 0, not 256
    (bytes((0x55, 0x10, 0, 0, 0, 0, 0, 0, 40, 0)), 512, 40),            # MODE SELECT(10)
    (bytes((0x28,) + (0,) * 9), 512, None),                             # READ: no Data-Out
    (b"", 512, None),
    (bytes((0x8A, 0)), 512, None),                                      # truncated CDB
    (bytes((0x3B,) + (0,) * 9), 512, None),                             # WRITE BUFFER: unsupported
])
def test_data_out_length(cdb, bs, want):
    assert decode(cdb, bs).data_out == want


@pytest.mark.parametrize("cdb,lba,count,at", [
    (bytes((0x08, 0xFF, 0x12, 0x34, 0, 0)), 0x1F1234, 256, 4),          # READ(6): 21-bit LBA, 0 = 256
    (struct.pack(">BBIBHB", 0x28, 0, 0x01020304, 0, 5, 0), 0x01020304, 5, 7),
    (struct.pack(">BBIIBB", 0xA8, 0, 7, 9, 0, 0), 7, 9, 6),
    (struct.pack(">BBQIBB", 0x88, 0, 1 << 40, 3, 0, 0), 1 << 40, 3, 10),
    (struct.pack(">BBQIBB", 0x91, 0, 8, 2, 0, 0), 8, 2, 10),            # SYNCHRONIZE CACHE(16)
    (bytes((0x89, 0) + (0,) * 7 + (6, 0, 0, 0, 2, 0, 0)), 6, 2, 13),    # COMPARE AND WRITE
])
def test_lba_and_count(cdb, lba, count, at):
    d = decode(cdb, 512)
    assert (d.lba, d.count, d.count_at) == (lba, count, at)


def test_data_in_direction():
    assert returns_data_in(bytes((0x28,) + (0,) * 9))                 # READ(10)
    assert returns_data_in(bytes((0x12, 0, 0, 0, 36, 0)))              # INQUIRY
    assert returns_data_in(bytes((0x9E, 0x10) + (0,) * 14))            # READ CAPACITY(16)
    assert not returns_data_in(bytes((0x2A,) + (0,) * 9))             # WRITE(10)
    assert not returns_data_in(bytes((0x00,) * 6))                    # TEST UNIT READY
    assert not returns_data_in(bytes((0x3B,) + (0,) * 9))             # unknown: treated as Data-Out
    assert not returns_data_in(b"")
