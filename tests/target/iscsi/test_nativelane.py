"""SPIKE: the native READ lane (target/iscsi/_nativelane.c, lane.py) over
the real SCSI emulation on file stores: it answers plain READs with the
file's bytes, leaves to Python what Python must answer, and stops at once
when another nexus changes what this one may do."""
from __future__ import annotations

import asyncio
import os
import struct

import pytest

from target.iscsi import lane as lane_mod

if lane_mod.Lane is None:
    pytest.skip("the native lane is not built", allow_module_level=True)

from target.iscsi import datapath, session, tmf  # noqa: E402

from .initiator import Initiator  # noqa: E402
from .test_scsi_integration import IQN, pr_out, ready, run, start  # noqa: E402


@pytest.fixture(autouse=True)
def lane_on(monkeypatch):
    for m in (lane_mod, datapath, session, tmf):
        monkeypatch.setattr(m, "ENABLED" if m is lane_mod else "LANE_ENABLED", True)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


async def published(srv, lun: int) -> None:
    """Until every session's lane serves ``lun`` (the route poll)."""
    for _ in range(100):
        if all(s.lane._leases.get(lun) for s in srv.sessions.values()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the lane never published the LUN")


def lane_reads(srv) -> int:
    return sum(s.lane.native.commands for s in srv.sessions.values())


def test_lane_answers_plain_reads_with_the_files_bytes(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        try:
            i = Initiator(*srv.addresses[0])
            await i.login(IQN, immediate_data=True)
            await ready(i, 0)
            data = os.urandom(64 << 10)
            assert (await i.write(0, 100, data)).status == 0
            await published(srv, 0)
            before = lane_reads(srv)
            got = await asyncio.gather(*(i.read(0, 100 + 8 * k, 8) for k in range(16)))
            assert b"".join(got) == data
            assert lane_reads(srv) - before == 16
            # EDTL not the transfer: Python answers it, with its residual
            r = await i.scsi(0, read10(100, 8), read_len=2048)
            assert r.status == 0 and r.data == data[:2048] and r.residual == 2048
            assert lane_reads(srv) - before == 16
            # past the end: Python's sense, not the lane's
            r = await i.scsi(0, read10((32 << 20) // 512 - 1, 2), read_len=1024)
            assert r.status == 2 and (r.sense[2] & 0x0F) == 5
            assert lane_reads(srv) - before == 16
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_another_nexus_reservation_stops_the_lane_at_once(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        try:
            a, b = (Initiator(*srv.addresses[0], name=f"iqn.2025-01.org.test:lane-{x}") for x in "ab")
            for i in (a, b):
                await i.login(IQN)
                await ready(i, 0)
            await published(srv, 0)
            assert (await b.scsi(0, read10(0, 1), read_len=512)).status == 0
            assert lane_reads(srv) == 1
            cdb, params = pr_out(0x00, 0, 0, 0xAAAA)        # REGISTER
            assert (await a.scsi(0, cdb, data_out=params)).status == 0
            cdb, params = pr_out(0x01, 0x03, 0xAAAA, 0)     # RESERVE, Exclusive Access
            assert (await a.scsi(0, cdb, data_out=params)).status == 0
            # b is not the holder: its read conflicts, with no route poll between
            assert (await b.scsi(0, read10(0, 1), read_len=512)).status == 0x18
            assert lane_reads(srv) == 1
            await a.close()
            await b.close()
        finally:
            await srv.stop()
    run(main())
