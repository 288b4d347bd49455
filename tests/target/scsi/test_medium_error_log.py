"""Reads from an image truncated under the target: every command gets a
correct MEDIUM ERROR, the log gets a few lines with counts (issue 10 item 13)."""
from __future__ import annotations

import asyncio
import logging
import os
import re

from restore_core.stores.file import FileBlockStore
from target.logsafe import RateLimitedLog
from restore_core.plain_lunio import PlainLunIO
from target.scsi import ScsiDevice
from target.scsi import device as device_mod

from .util import IDENT, cdb10, check, good, info_of, ready, send

BS = 512
BLOCKS = 2048
READS = 5000


def test_reads_past_a_truncated_image_give_medium_error_and_bounded_logs(tmp_path, caplog,
                                                                          monkeypatch):
    monkeypatch.setattr(device_mod, "ratelog", RateLimitedLog(device_mod.log, interval=60))
    caplog.set_level(logging.INFO, "target")
    path = tmp_path / "lun.img"
    path.write_bytes(b"\x5a" * (BLOCKS * BS))
    store = FileBlockStore(str(path), BLOCKS * BS)
    dev = ScsiDevice(PlainLunIO(store), IDENT, block_size=BS)

    async def main():
        await ready(dev)
        os.truncate(path, (BLOCKS // 2) * BS)            # someone shrinks the image under us
        good(await send(dev, cdb10(0x28, 0, 8)))          # the part still there reads fine
        for n in range(READS):
            lba = BLOCKS // 2 + n % (BLOCKS // 2 - 8)
            r = await send(dev, cdb10(0x28, lba, 8))
            check(r, 0x03, 0x11, 0x00)                    # MEDIUM ERROR, UNRECOVERED READ ERROR
            assert info_of(r.sense) == lba                # the first LBA that failed
    try:
        asyncio.run(main())
    finally:
        store.close()
    device_mod.ratelog.flush()
    msgs = [r.getMessage() for r in caplog.records]
    assert not any(r.exc_info for r in caplog.records)    # no traceback
    assert 1 <= len(msgs) <= 3, msgs
    more = [int(m.group(1).replace(",", "")) for m in map(re.compile(r"and ([\d,]+) more").search, msgs)
            if m]
    assert len(msgs) + sum(more) == READS
