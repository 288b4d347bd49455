"""The native READ lane (target/iscsi/_nativelane.c, lane.py) against what
is not a plain READ of a quiet LU: state changes that are not this target's
commands, task management with lane reads in flight, and hostile PDUs. Each
expects the answer the Python path gives with the lane off.

The route poll is made an hour long here: LUNs are published by calling
check() and every revocation must come from a synchronous hook (a test that
a poll could rescue would pass with the hook removed)."""
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
from .test_scsi_integration import IQN, ready, run, start  # noqa: E402

ORDERED = 2
ASC_REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
ASC_CAPACITY_CHANGED = (0x2A, 0x09)
ASC_LU_NOT_SUPPORTED = (0x25, 0x00)


@pytest.fixture(autouse=True)
def lane_on(monkeypatch):
    """The lane on whatever the default, and no route poll to rescue a
    missing hook."""
    for m in (lane_mod, datapath, session, tmf):
        monkeypatch.setattr(m, "ENABLED" if m is lane_mod else "LANE_ENABLED", True)
    monkeypatch.setattr(lane_mod, "ROUTE_CHECK_S", 3600.0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def publish(srv, *luns: int) -> None:
    """Every session's lane serves ``luns`` now (no poll waited for)."""
    for s in srv.sessions.values():
        s.lane.check()
        assert all(lun in s.lane._leases for lun in luns), (luns, s.lane._leases)


def none_published(srv) -> bool:
    """No lane answers for any LUN (checked right after a change returns:
    revocation is synchronous, not the next loop turn's)."""
    return not any(s.lane.native.published for s in srv.sessions.values())


def lane_reads(srv) -> int:
    return sum(s.lane.native.commands for s in srv.sessions.values())


def asc(r) -> tuple[int, int]:
    return r.sense[12], r.sense[13]


async def logged_in(srv, *luns: int, name: str = "iqn.2025-01.org.test:hostile") -> Initiator:
    i = Initiator(*srv.addresses[0], name=name)
    await i.login(IQN, immediate_data=True)
    for lun in luns:
        await ready(i, lun)
    return i


# -- state changes that are not commands of this target's sessions ------------------
def test_lun_removed_revokes_it_and_queues_the_inventory_ua_at_once(tmp_path):
    async def main():
        srv, _ = await start(tmp_path)
        try:
            i = await logged_in(srv, 0, 5)
            publish(srv, 0, 5)
            assert (await i.scsi(5, read10(0, 1), read_len=512)).status == 0
            assert lane_reads(srv) == 1
            srv.targets[IQN].scsi_target.remove(5)          # a control request, no command
            assert none_published(srv)
            r = await i.scsi(5, read10(0, 1), read_len=512)
            assert r.status == 2 and asc(r) == ASC_LU_NOT_SUPPORTED, r.sense.hex()
            r = await i.scsi(0, read10(0, 1), read_len=512)
            assert r.status == 2 and asc(r) == ASC_REPORTED_LUNS_CHANGED, r.sense.hex()
            assert lane_reads(srv) == 1
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_capacity_change_outside_commands_stops_the_lane_until_reported(tmp_path):
    async def main():
        srv, files = await start(tmp_path)
        try:
            i = await logged_in(srv, 0)
            publish(srv, 0)
            dev = srv.targets[IQN].scsi_target.device(0)
            dev.lunio.store.grow(files[0][1] + (1 << 20))
            dev.lunio_changed()                             # what volume resize calls
            assert none_published(srv)
            r = await i.scsi(0, read10(0, 1), read_len=512)
            assert r.status == 2 and asc(r) == ASC_CAPACITY_CHANGED, r.sense.hex()
            assert lane_reads(srv) == 0
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_reservation_made_elsewhere_conflicts_at_once(tmp_path):
    """A reservation by a nexus of another transport (TCMU, another target
    exporting the LU) reaches no HOLDS of this target: the device's hook
    must revoke the lane."""
    async def main():
        srv, _ = await start(tmp_path)
        try:
            i = await logged_in(srv, 0)
            publish(srv, 0)
            dev = srv.targets[IQN].scsi_target.device(0)
            dev.pr.reserve_spc2(("iqn.2025-01.org.test:elsewhere", "tcmu"))
            assert none_published(srv)
            assert (await i.scsi(0, read10(0, 1), read_len=512)).status == 0x18
            assert lane_reads(srv) == 0
            dev.pr.release_spc2(("iqn.2025-01.org.test:elsewhere", "tcmu"))
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_mode_change_elsewhere_takes_the_lun_back_at_once(tmp_path):
    async def main():
        srv, _ = await start(tmp_path)
        try:
            i = await logged_in(srv, 0)
            publish(srv, 0)
            dev = srv.targets[IQN].scsi_target.device(0)
            caching = bytes((0x08, 0x12)) + bytes(18)      # WCE off
            assert dev.mode.select(bytes((0x15, 0x10, 0, 0, 24, 0)), bytes(4) + caching,
                                   ten=False, block_size=512)
            assert none_published(srv)
            assert (await i.scsi(0, read10(0, 1), read_len=512)).status == 0
            assert lane_reads(srv) == 0
            await i.close()
        finally:
            await srv.stop()
    run(main())


def test_simple_read_after_an_ordered_write_waits_for_it(tmp_path):
    """SAM: a SIMPLE task does not start before an earlier ORDERED one ends.
    An ORDERED FUA write waits for its flush in Python; the READ behind it
    must see its data and be answered after it (a higher StatSN), not by
    the lane meanwhile."""
    async def main():
        srv, _ = await start(tmp_path)
        try:
            i = await logged_in(srv, 0)
            publish(srv, 0)
            for k in range(8):
                data = os.urandom(4096)
                w, r = await asyncio.gather(
                    i.scsi(0, write10(200 + 8 * k, 8, fua=True), data_out=data, attr=ORDERED),
                    i.scsi(0, read10(200 + 8 * k, 8), read_len=4096))
                assert w.status == 0 and r.status == 0
                assert r.data == data, k
                assert w.response.u32(24) < r.response.u32(24), k
                publish(srv, 0)
            await i.close()
        finally:
            await srv.stop()
    run(main())
