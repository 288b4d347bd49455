"""An image deleted or replaced under a running daemon takes its volume
offline within seconds and at the next flush, loudly and once; no write is
acknowledged into the deleted file afterwards (issue 10 item 5)."""
from __future__ import annotations

import asyncio
import logging
import os

import pytest

from target.lunio import MediumError, NotReadyError
from target.scsi import constants as c
from target.scsi.lunio_access import not_ready_sense
from target.service import Service
from tests.support import free_port

MiB = 1 << 20


async def started(tmp_path) -> Service:
    s = Service(str(tmp_path / "state"), init=True, portals=[("127.0.0.1", free_port())],
                backend="embedded")
    await s.start()
    return s


def offline_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and "is offline" in r.getMessage()]


@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_image_gone_under_the_daemon_goes_offline_within_seconds(tmp_path, caplog, how):
    async def go():
        s = await started(tmp_path)
        try:
            v = await s.volume_create("v", size="1M")
            lun = s.devices["v"].lunio
            await lun.write(0, b"a" * 4096)
            if how == "unlink":
                os.unlink(v["path"])
            else:
                os.rename(v["path"], v["path"] + ".old")
                with open(v["path"], "wb") as f:
                    f.truncate(MiB)
            for _ in range(40):               # the periodic check: within seconds
                if s.volume_show("v")["access"] == "not-ready":
                    break
                await asyncio.sleep(0.1)
            show = s.volume_show("v")
            assert show["access"] == "not-ready"
            assert ("deleted" if how == "unlink" else "replaced") in show["offline"]
            sense = not_ready_sense(lun)
            assert sense is not None and sense.key == c.NOT_READY
            assert "offline" in str(sense)
            with pytest.raises(NotReadyError):
                await lun.write(0, b"b" * 4096)
            assert not lun.try_write(0, [b"b" * 4096])
            await asyncio.sleep(1.5)          # still one line, not one per check
            assert len(offline_lines(caplog)) == 1
            assert s.status()["volumes"][0]["offline"] == show["offline"]
            await s.volume_delete("v")        # and it can be removed
        finally:
            await s.stop()
    with caplog.at_level(logging.INFO):
        asyncio.run(go())


def test_flush_after_unlink_is_refused_and_takes_the_volume_offline(tmp_path, caplog):
    async def go():
        s = await started(tmp_path)
        try:
            v = await s.volume_create("v", size="1M")
            lun = s.devices["v"].lunio
            os.unlink(v["path"])
            # before the periodic check runs: the flush itself notices
            with pytest.raises(MediumError, match="deleted"):
                await lun.write(0, b"c" * 4096, fua=True)
            assert s.volume_show("v")["offline"]
            with pytest.raises(NotReadyError):
                await lun.flush()
        finally:
            await s.stop()
    with caplog.at_level(logging.INFO):
        asyncio.run(go())
    assert len(offline_lines(caplog)) == 1
