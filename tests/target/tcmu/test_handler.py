"""TcmuHandler discovery over a fake /sys/class/uio + configfs tree, the
real SCSI layer behind a device, and TCM-USER netlink message decoding."""
from __future__ import annotations

import asyncio
import mmap
import logging
import os
import struct

from restore_core.blockstore import MemoryBlockStore
from restore_core.plain_lunio import PlainLunIO
from target.scsi.api import GOOD
from target.tcmu import abi
from target.tcmu.device import TcmuDevice
from target.tcmu.handler import TcmuHandler, parse_uio_name, scan_uio
from target.tcmu.netlink import NLMSGHDR, GENLHDR, decode_event, pack_attr, parse_messages

from .fake_kernel import FakeKernel
from .test_ring import rw10, run


def make_uio(root, uio: str, name: str, kernel: FakeKernel, *, size=8 << 20, bs=512):
    d = root / "sys" / uio
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "maps" / "map0" / "size").write_text(hex(kernel.size) + "\n")
    _, hba, dev, _, _ = name.split("/", 4)
    c = root / "cfg" / f"user_{hba}" / dev
    (c / "attrib").mkdir(parents=True)
    (c / "action").mkdir()
    (c / "attrib" / "dev_size").write_text(f"{size}\n")
    (c / "attrib" / "hw_block_size").write_text(f"{bs}\n")
    (c / "action" / "reset_ring").write_text("")
    return c


def test_parse_uio_name():
    assert parse_uio_name("tcm-user/3/vol_a/liverestore/vol/a") == ("3", "vol_a", "liverestore", "vol/a")
    assert parse_uio_name("uio_pdrv") is None


def test_handler_discovers_serves_and_drops_devices(tmp_path):
    async def main():
        kernels = {"uio0": FakeKernel(), "uio1": FakeKernel(), "uio2": FakeKernel()}
        cfg0 = make_uio(tmp_path, "uio0", "tcm-user/0/lr_a/liverestore/a", kernels["uio0"])
        make_uio(tmp_path, "uio1", "tcm-user/0/other/glfs/x", kernels["uio1"])   # not our subtype
        cfg2 = make_uio(tmp_path, "uio2", "tcm-user/1/lr_b/liverestore/b", kernels["uio2"], size=4 << 20)
        assert [u.config for u in scan_uio(str(tmp_path / "sys"), "liverestore")] == ["a", "b"]
        opened, closed = [], []

        def open_device(config, size, block_size):
            opened.append((config, size, block_size))
            return PlainLunIO(MemoryBlockStore(size))      # LunIO: wrapped in the SCSI layer

        def factory(name, target, *, uio_dev, map_size, reset_ring):
            k = kernels[os.path.basename(uio_dev)]
            assert map_size == k.size
            return TcmuDevice(name, target, fd=k.user_sock.fileno(), buf=k.map, reset_ring=reset_ring)

        h = TcmuHandler(open_device, close_device=lambda c, o: closed.append(c),
                        sys_class_uio=str(tmp_path / "sys"), configfs_core=str(tmp_path / "cfg"),
                        use_netlink=False, rescan_interval=0, device_factory=factory)
        await h.start()
        assert sorted(opened) == [("a", 8 << 20, 512), ("b", 4 << 20, 512)]
        assert sorted(h.devices) == ["tcm-user/0/lr_a/liverestore/a", "tcm-user/1/lr_b/liverestore/b"]
        assert (cfg0 / "action" / "reset_ring").read_text() == "1"
        assert (cfg2 / "action" / "reset_ring").read_text() == "1"

        # the real SCSI layer answers through the ring: INQUIRY, READ CAPACITY, WRITE, READ
        k = kernels["uio0"]
        k.submit(bytes([0x12, 0, 0, 0, 96, 0]), data_in=96)
        [c] = await k.wait_completions(1)
        assert c.status == GOOD and c.data_in[0] == 0 and c.data_in[8:16].rstrip() == b"LIVERST"
        k.submit(bytes(6))                                   # TEST UNIT READY: power-on UA first
        [c] = await k.wait_completions(1)
        assert c.status == 0x02 and c.sense[2] & 0x0F == 0x06 and c.sense[12] == 0x29
        k.submit(bytes([0x25]) + bytes(9), data_in=8)
        [c] = await k.wait_completions(1)
        assert c.status == GOOD
        assert struct.unpack(">II", c.data_in) == ((8 << 20) // 512 - 1, 512)
        k.submit(rw10(0x2A, 10, 2), data_out=b"q" * 1024, pieces=2)
        [c] = await k.wait_completions(1)
        assert c.status == GOOD
        k.submit(rw10(0x28, 10, 2), data_in=1024, pieces=3)
        [c] = await k.wait_completions(1)
        assert c.status == GOOD and c.data_in == b"q" * 1024
        k.submit(rw10(0x28, (8 << 20) // 512, 1), data_in=512)          # past the end
        [c] = await k.wait_completions(1)
        assert c.status == 0x02 and c.sense[2] & 0x0F == 0x05

        # device b disappears: the next rescan drops it
        import shutil
        shutil.rmtree(tmp_path / "sys" / "uio2")
        changed = await h.rescan()
        assert changed == {"added": [], "removed": ["tcm-user/1/lr_b/liverestore/b"]}
        assert closed == ["b"]
        assert await h.rescan() == {"added": [], "removed": []}
        await h.stop()
        assert sorted(closed) == ["a", "b"] and h.devices == {}
        for k in kernels.values():
            k.close()
    run(main())


def test_netlink_event_decoding():
    attrs = (pack_attr(abi.TCMU_ATTR_DEVICE, b"tcm-user/0/lr_a/liverestore/a\0")
             + pack_attr(abi.TCMU_ATTR_MINOR, struct.pack("=I", 4))
             + pack_attr(abi.TCMU_ATTR_DEVICE_ID, struct.pack("=I", 77)))
    body = GENLHDR.pack(abi.TCMU_CMD_ADDED_DEVICE, 2, 0) + attrs
    fam = 0x1B
    msg = NLMSGHDR.pack(NLMSGHDR.size + len(body), fam, 0, 0, 0) + body
    [(typ, cmd, a)] = parse_messages(msg + msg[:3])       # trailing junk is ignored
    assert (typ, cmd) == (fam, abi.TCMU_CMD_ADDED_DEVICE)
    ev = decode_event(cmd, a)
    assert (ev.device, ev.minor, ev.device_id) == ("tcm-user/0/lr_a/liverestore/a", 4, 77)
    assert decode_event(abi.TCMU_CMD_SET_FEATURES, a) is None


def test_generic_netlink_resolution_and_subscription():
    import errno
    import pytest
    from target.tcmu.netlink import TcmuNetlink
    # the controller family is always there: resolve, join its group, read nothing
    nl = TcmuNetlink("nlctrl", "notify")
    assert nl.family_id == 0x10 and nl.read_events() == []
    nl.close()
    with pytest.raises(OSError) as e:
        TcmuNetlink("nosuchfamily")
    assert e.value.errno == errno.ENOENT


def test_handler_without_tcmu_netlink_falls_back_to_scanning(tmp_path):
    async def main():
        (tmp_path / "sys").mkdir()
        h = TcmuHandler(lambda *a: None, sys_class_uio=str(tmp_path / "sys"),
                        configfs_core=str(tmp_path / "cfg"), use_netlink=True, rescan_interval=0)
        await h.start()           # on a host without target_core_user: warning, no netlink
        assert h.devices == {}
        await h.stop()
    run(main())


def test_netlink_events_drive_add_remove_and_reconfig(tmp_path):
    from target.tcmu.netlink import TcmuEvent

    async def main():
        kernels = {"uio0": FakeKernel(), "uio1": FakeKernel()}
        make_uio(tmp_path, "uio0", "tcm-user/0/lr_a/liverestore/a", kernels["uio0"])
        opened, closed = [], []

        def open_device(config, size, block_size):
            opened.append((config, size))
            return PlainLunIO(MemoryBlockStore(size))

        def factory(name, target, *, uio_dev, map_size, reset_ring):
            k = kernels[os.path.basename(uio_dev)]
            return TcmuDevice(name, target, fd=k.user_sock.fileno(), buf=k.map, reset_ring=reset_ring)

        h = TcmuHandler(open_device, close_device=lambda c, o: closed.append(c),
                        sys_class_uio=str(tmp_path / "sys"), configfs_core=str(tmp_path / "cfg"),
                        use_netlink=False, rescan_interval=0, device_factory=factory)
        await h.start()
        a, b = "tcm-user/0/lr_a/liverestore/a", "tcm-user/0/lr_b/liverestore/b"
        # ADDED: the new device is picked up
        cfg_b = make_uio(tmp_path, "uio1", b, kernels["uio1"], size=2 << 20)
        await h._handle_events([TcmuEvent(abi.TCMU_CMD_ADDED_DEVICE, b, 1)])
        assert sorted(h.devices) == [a, b] and opened == [("a", 8 << 20), ("b", 2 << 20)]
        # RECONFIG: reopened with the new size
        (cfg_b / "attrib" / "dev_size").write_text(f"{4 << 20}\n")
        await h._handle_events([TcmuEvent(abi.TCMU_CMD_RECONFIG_DEVICE, b, 1)])
        assert opened[-1] == ("b", 4 << 20) and closed == ["b"] and b in h.devices
        # REMOVED arrives while the uio entry still exists: dropped anyway
        await h._handle_events([TcmuEvent(abi.TCMU_CMD_REMOVED_DEVICE, b, 1)])
        assert sorted(h.devices) == [a] and closed == ["b", "b"]
        await h.stop()
        for k in kernels.values():
            k.close()
    run(main())


def test_a_refused_device_is_one_line_per_burst_never_a_traceback(tmp_path, caplog):
    """A user:liverestore backstore naming no volume of ours (e.g. made with
    targetcli) is refused at every rescan: the admin sees one WARNING saying
    why, not a traceback every 10 s."""
    async def main():
        k = FakeKernel()
        make_uio(tmp_path, "uio0", "tcm-user/0/lr_x/liverestore/nosuch", k)

        def open_device(config, size, block_size):
            raise LookupError(f"no volume named {config} for TCMU device")

        h = TcmuHandler(open_device, sys_class_uio=str(tmp_path / "sys"),
                        configfs_core=str(tmp_path / "cfg"), use_netlink=False,
                        rescan_interval=0)
        with caplog.at_level(logging.WARNING, logger="target.tcmu.handler"):
            await h.start()
            for _ in range(5):
                assert (await h.rescan())["added"] == []
            await h.stop()
        k.close()
        lines = [r for r in caplog.records if r.name == "target.tcmu.handler"]
        assert len(lines) == 1 and lines[0].exc_info is None, lines
        assert "no volume named nosuch" in lines[0].getMessage()
    run(main())
