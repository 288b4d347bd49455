"""LunSet: routing, absent LUNs, inventory changes, task management."""
import struct

from target.scsi import LunSet, ScsiTarget

from .util import NX_A, NX_B, asynctest, check, good, mem_device, ready, send

REPORT_LUNS = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
TUR = [0, 0, 0, 0, 0, 0]


def test_lunset_is_a_scsi_target():
    ls: ScsiTarget = LunSet()
    assert ls.luns() == []


@asynctest
async def test_absent_luns():
    dev, _ = mem_device()
    ls = LunSet({2: dev})
    data = good(await send(ls, [0x12, 0, 0, 0, 96, 0], lun=5))
    assert data[0] == 0x7F and data[8:16] == b"LIVERST " and len(data) == 74
    check(await send(ls, [0x12, 1, 0x80, 0, 96, 0], lun=5), 0x5, 0x25, 0x00)
    check(await send(ls, TUR, lun=5), 0x5, 0x25, 0x00)
    check(await send(ls, [0x28] + [0] * 9, lun=5), 0x5, 0x25, 0x00)
    check(await send(ls, b"", lun=5), 0x5, 0x25, 0x00)
    data = good(await send(ls, [0x03, 0, 0, 0, 18, 0], lun=5))
    assert data[2] == 0x05 and data[12:14] == bytes([0x25, 0x00])
    # REPORT LUNS: answered at LUN 0 even though there is no LU 0.
    assert good(await send(ls, REPORT_LUNS, lun=0)) == bytes([0, 0, 0, 8, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0])
    check(await send(ls, REPORT_LUNS, lun=7), 0x5, 0x25, 0x00)


@asynctest
async def test_report_luns_addressing_and_order():
    luns = {300: mem_device()[0], 0: mem_device()[0], 17: mem_device()[0]}
    ls = LunSet(luns)
    assert ls.luns() == [0, 17, 300]
    data = good(await send(ls, REPORT_LUNS, lun=17))
    assert struct.unpack_from(">I", data)[0] == 24
    assert data[8:] == (bytes([0, 0]) + bytes(6) + bytes([0, 17]) + bytes(6)
                        + bytes([0x41, 0x2C]) + bytes(6))


@asynctest
async def test_inventory_change_ua_cleared_by_report_luns():
    dev0, _ = mem_device()
    ls = LunSet({0: dev0})
    await ready(ls, NX_A, NX_B)
    ls.add(1, mem_device()[0])
    check(await send(ls, TUR, nexus=NX_A), 0x6, 0x3F, 0x0E)
    good(await send(ls, TUR, nexus=NX_A))
    # NX_B learns by REPORT LUNS, which clears the pending UA.
    data = good(await send(ls, REPORT_LUNS, nexus=NX_B))
    assert struct.unpack_from(">I", data)[0] == 16
    good(await send(ls, TUR, nexus=NX_B))
    ls.remove(1)
    check(await send(ls, TUR, nexus=NX_B), 0x6, 0x3F, 0x0E)
    check(await send(ls, TUR, lun=1), 0x5, 0x25, 0x00)


def test_add_validation():
    import pytest
    ls = LunSet({0: mem_device()[0]})
    with pytest.raises(ValueError):
        ls.add(0, mem_device()[0])
    with pytest.raises(ValueError):
        ls.add(16384, mem_device()[0])


@asynctest
async def test_task_management_routes():
    d0, _ = mem_device()
    d1, _ = mem_device()
    ls = LunSet({0: d0, 1: d1})
    for lun in (0, 1):
        await ready(ls, NX_A, NX_B, lun=lun)
    await ls.lun_reset(1, NX_A)
    good(await send(ls, TUR, nexus=NX_B, lun=0))
    check(await send(ls, TUR, nexus=NX_B, lun=1), 0x6, 0x29, 0x03)
    await ls.lun_reset(9, NX_A)                 # absent LUN: nothing to do
    await ls.target_reset(NX_A)
    for lun in (0, 1):
        for nx in (NX_A, NX_B):
            check(await send(ls, TUR, nexus=nx, lun=lun), 0x6, 0x29, 0x00)
            good(await send(ls, TUR, nexus=nx, lun=lun))
    ls.nexus_lost(NX_A)
    check(await send(ls, TUR, nexus=NX_A, lun=1), 0x6, 0x29, 0x00)


@asynctest
async def test_devices_share_the_target_port_numbers():
    from target.scsi import Nexus, TargetPorts
    ls = LunSet({0: mem_device()[0], 1: mem_device()[0]},
                ports=TargetPorts({"port-b": 7}))
    nx = Nexus("init,i,0x1", "port-b")
    for lun in (0, 1):
        page = good(await send(ls, [0x12, 1, 0x83, 0, 255, 0], nexus=nx, lun=lun))
        assert bytes([0x01, 0x14, 0, 4, 0, 0, 0, 7]) in page
