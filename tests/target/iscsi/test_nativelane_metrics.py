"""The native READ lane's reads in the LU's metrics (LuStats: what the
Prometheus exporter and the views show): counted once, with their bytes
and a latency, folded while the session runs and at its close."""
from __future__ import annotations

import asyncio
import os

import pytest

from target.iscsi import lane as lane_mod
from target.scsi.lustats import LATENCY_BUCKETS, READ

if lane_mod.Lane is None:
    pytest.skip("the native lane is not built", allow_module_level=True)

from target.iscsi import datapath, session, tmf  # noqa: E402

from .initiator import Initiator  # noqa: E402
from .test_nativelane import lane_reads, published  # noqa: E402
from .test_scsi_integration import IQN, ready, run, start  # noqa: E402

READS = 24


@pytest.fixture(autouse=True)
def lane_on(monkeypatch):
    for m in (lane_mod, datapath, session, tmf):
        monkeypatch.setattr(m, "ENABLED" if m is lane_mod else "LANE_ENABLED", True)


def read_counts(dev) -> tuple[int, int, float, int]:
    st = dev.stats
    return st.commands[READ], st.bytes[READ], st.seconds[READ], sum(st.buckets[READ])


async def lane_read_burst(srv) -> tuple[Initiator, tuple]:
    """A session that read READS 4 KiB blocks, every one answered by the
    lane; the LU's read counters before them."""
    dev = srv.targets[IQN].scsi_target.device(0)
    i = Initiator(*srv.addresses[0])
    await i.login(IQN, immediate_data=True)
    await ready(i, 0)
    data = os.urandom(READS * 4096)
    assert (await i.write(0, 0, data)).status == 0
    before = read_counts(dev)
    await published(srv, 0)
    lane_before = lane_reads(srv)
    got = await asyncio.gather(*(i.read(0, 8 * k, 8) for k in range(READS)))
    assert b"".join(got) == data
    assert lane_reads(srv) - lane_before == READS
    return i, before


def test_lane_reads_are_folded_into_the_lus_counters(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        dev = srv.targets[IQN].scsi_target.device(0)
        try:
            i, before = await lane_read_burst(srv)
            for _ in range(100):            # the fold runs every FOLD_S
                if read_counts(dev)[0] - before[0] >= READS:
                    break
                await asyncio.sleep(0.02)
            cmds, nbytes, secs, bucketed = (a - b for a, b in zip(read_counts(dev), before))
            assert cmds == READS and bucketed == READS, (cmds, bucketed)
            assert nbytes == READS * 4096
            # each read's time in the target, a few microseconds here
            assert 0 < secs < READS * LATENCY_BUCKETS[-1]
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_closing_the_session_folds_what_the_timer_has_not(tmp_path, monkeypatch):
    monkeypatch.setattr(lane_mod, "FOLD_S", 3600.0)
    async def main():
        srv, files = await start(tmp_path)
        dev = srv.targets[IQN].scsi_target.device(0)
        try:
            i, before = await lane_read_burst(srv)
            assert read_counts(dev) == before           # no fold yet
            await i.close()
            for _ in range(100):
                if not srv.sessions:
                    break
                await asyncio.sleep(0.02)
            cmds, nbytes, _, bucketed = (a - b for a, b in zip(read_counts(dev), before))
            assert (cmds, nbytes, bucketed) == (READS, READS * 4096, READS)
        finally:
            await srv.stop()
    run(main())


def test_bucket_bounds_are_checked():
    lane = lane_mod.Lane()
    with pytest.raises(ValueError):
        lane.set_buckets([1e-3, 1e-4])
    with pytest.raises(ValueError):
        lane.set_buckets([0.1] * 33)
    lane.set_buckets(LATENCY_BUCKETS)
    assert lane.take_counts() == []
