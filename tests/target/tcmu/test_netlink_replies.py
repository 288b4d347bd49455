"""Answering the kernel's TCM-USER netlink events (issue 15): once tcmu-runner
has announced replies in a boot, a user:liverestore backstore created by
targetcli (no nl_reply_supported=-1) makes the kernel wait for our *_DONE;
without it `targetcli create` and `targetctl clear` hang. The handler runs
over a fake /sys/class/uio + configfs tree and a fake netlink socket that
records the answers; the wire format of an answer is checked on a datagram
socket pair."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import struct

from restore_core.blockstore import MemoryBlockStore
from restore_core.plain_lunio import PlainLunIO
from target.tcmu import abi
from target.tcmu.device import TcmuDevice
from target.tcmu.handler import TcmuHandler
from target.tcmu.netlink import (GENLHDR, NLMSGHDR, TcmuEvent, TcmuNetlink, decode_event, pack_attr,
                                 parse_attrs, parse_messages)

from .fake_kernel import FakeKernel
from .test_handler import make_uio
from .test_ring import run

OURS = "tcm-user/0/adm_b/liverestore/vol-b"
QCOW = "tcm-user/0/adm_q/qcow//tmp/q.qcow2"
VOLUMES = {"vol-b": 4 << 20}


class RecordingNetlink:
    """Stands in for TcmuNetlink: what the kernel would receive, and which
    devices were served at the moment of each answer."""

    def __init__(self, handler: TcmuHandler) -> None:
        self.handler = handler
        self.answers: list[tuple[int, int, int, list[str]]] = []
        self._socks = socket.socketpair()

    def fileno(self) -> int:
        return self._socks[0].fileno()

    def close(self) -> None:
        for s in self._socks:
            s.close()

    def reply(self, ev: TcmuEvent, status: int = 0) -> None:
        self.answers.append((ev.cmd, ev.device_id, status, sorted(self.handler.devices)))


def add_device(root, uio: str, name: str, kernel: FakeKernel, *, nl_reply: int, configured: bool,
               size: int = 4 << 20):
    c = make_uio(root, uio, name, kernel, size=size)
    (c / "attrib" / "nl_reply_supported").write_text(f"{nl_reply}\n")
    (c / "enable").write_text("1\n" if configured else "0\n")
    return c


def make_handler(tmp_path, kernels: dict[str, FakeKernel], open_device=None, **kw):
    """A handler opening VOLUMES (unless given ``open_device``) on the
    kernels' rings, with a RecordingNetlink in place of its socket."""
    def open_volume(config: str, size: int, block_size: int):
        if config not in VOLUMES:
            raise LookupError(f"no volume named {config}")
        if VOLUMES[config] != size:
            raise ValueError(f"{config} has {size} bytes, the volume {VOLUMES[config]}")
        return PlainLunIO(MemoryBlockStore(size))

    def factory(name, target, *, uio_dev, map_size, reset_ring):
        k = kernels[os.path.basename(uio_dev)]
        return TcmuDevice(name, target, fd=k.user_sock.fileno(), buf=k.map, reset_ring=reset_ring)

    h = TcmuHandler(open_device or open_volume, sys_class_uio=str(tmp_path / "sys"),
                    configfs_core=str(tmp_path / "cfg"), use_netlink=False, rescan_interval=0,
                    device_factory=factory, **kw)
    nl = RecordingNetlink(h)
    h._nl = nl
    return h, nl


@contextlib.asynccontextmanager
async def started(tmp_path, uios: int = 1, open_device=None, **kw):
    """A started handler over an empty uio tree, its recording netlink and
    one FakeKernel per uio ("uio0"...); stopped and closed afterwards."""
    (tmp_path / "sys").mkdir()
    kernels = {f"uio{i}": FakeKernel() for i in range(uios)}
    h, nl = make_handler(tmp_path, kernels, open_device, **kw)
    await h.start()
    try:
        yield h, nl, kernels
    finally:
        await h.stop()
        for k in kernels.values():
            k.close()


def added(name: str, minor: int, dev_id: int) -> TcmuEvent:
    return TcmuEvent(abi.TCMU_CMD_ADDED_DEVICE, name, minor, dev_id)


def test_added_device_of_ours_is_served_then_answered_ok_without_a_ring_reset(tmp_path):
    """The hang: the kernel waits for ADDED_DONE before it finishes
    configuring the device (enable 0), and refuses a ring reset until then."""
    async def main():
        async with started(tmp_path) as (h, nl, ks):
            cfg = add_device(tmp_path, "uio0", OURS, ks["uio0"], nl_reply=1, configured=False)
            assert await h.rescan() == {"added": [], "removed": []}     # half-added: left to its event
            await h._handle_events([added(OURS, 0, 41)])
            assert nl.answers == [(abi.TCMU_CMD_ADDED_DEVICE, 41, 0, [OURS])]
            assert (cfg / "action" / "reset_ring").read_text() == ""
    run(main())


def test_refused_added_device_gets_an_error_answer_not_a_hang(tmp_path):
    async def main():
        async with started(tmp_path, 2) as (h, nl, ks):
            nosuch = "tcm-user/0/bogus/liverestore/nope"
            add_device(tmp_path, "uio0", nosuch, ks["uio0"], nl_reply=1, configured=False)
            wrong_size = "tcm-user/0/adm_w/liverestore/vol-b"
            add_device(tmp_path, "uio1", wrong_size, ks["uio1"], nl_reply=1, configured=False, size=1 << 20)
            await h._handle_events([added(nosuch, 0, 7), added(wrong_size, 1, 8)])
            assert nl.answers == [(abi.TCMU_CMD_ADDED_DEVICE, 7, -errno.ENOENT, []),
                                  (abi.TCMU_CMD_ADDED_DEVICE, 8, -errno.EINVAL, [])]
            assert h.devices == {}
    run(main())


def test_no_answer_for_other_handlers_devices_nor_when_the_kernel_does_not_wait(tmp_path):
    """tcmu-runner answers its user:qcow devices (a second answer could
    complete a later command of theirs); a device made with
    nl_reply_supported=-1 (the daemon's own) or before any daemon announced
    replies (0) is not waited for."""
    async def main():
        async with started(tmp_path, 2) as (h, nl, ks):
            add_device(tmp_path, "uio0", QCOW, ks["uio0"], nl_reply=1, configured=False)
            own = "tcm-user/0/vol-b/liverestore/vol-b"
            add_device(tmp_path, "uio1", own, ks["uio1"], nl_reply=-1, configured=True)
            await h._handle_events([added(QCOW, 0, 1), added(own, 1, 2),
                                    TcmuEvent(abi.TCMU_CMD_REMOVED_DEVICE, QCOW, 0, 1)])
            assert nl.answers == [] and sorted(h.devices) == [own]       # ours served by the rescan
            await h._handle_events([TcmuEvent(abi.TCMU_CMD_REMOVED_DEVICE, own, 1, 2)])
            assert nl.answers == [] and h.devices == {}
    run(main())


def test_removed_and_reconfig_of_a_served_device(tmp_path):
    """REMOVED: the device is dropped before the answer (the kernel frees
    the ring after it). RECONFIG: a change of a served device's volume or
    size is refused (EBUSY) and it stays served; a write-cache change is
    accepted. The REMOVED answer comes even though configfs is gone by then."""
    async def main():
        async with started(tmp_path) as (h, nl, ks):
            cfg = add_device(tmp_path, "uio0", OURS, ks["uio0"], nl_reply=1, configured=False)
            await h._handle_events([added(OURS, 0, 5)])
            (cfg / "enable").write_text("1\n")
            reconf = abi.TCMU_CMD_RECONFIG_DEVICE
            await h._handle_events([TcmuEvent(reconf, OURS, 0, 5, size=8 << 20),
                                    TcmuEvent(reconf, OURS, 0, 5, config="liverestore/other"),
                                    TcmuEvent(reconf, OURS, 0, 5)])
            assert nl.answers[1:] == [(reconf, 5, -errno.EBUSY, [OURS]), (reconf, 5, -errno.EBUSY, [OURS]),
                                      (reconf, 5, 0, [])]
            assert OURS in h.devices                      # reopened by the rescan after the accepted one
            shutil.rmtree(cfg)
            await h._handle_events([TcmuEvent(abi.TCMU_CMD_REMOVED_DEVICE, OURS, 0, 5)])
            assert nl.answers[-1] == (abi.TCMU_CMD_REMOVED_DEVICE, 5, 0, [])
    run(main())


def test_an_answer_comes_within_the_reply_timeout_whatever_happens(tmp_path):
    async def main():
        never = asyncio.Event()

        async def open_device(config, size, block_size):
            await never.wait()

        async with started(tmp_path, open_device=open_device, reply_timeout=0.2) as (h, nl, ks):
            add_device(tmp_path, "uio0", OURS, ks["uio0"], nl_reply=1, configured=False)
            await asyncio.wait_for(h._handle_events([added(OURS, 0, 9)]), 2)
            assert nl.answers == [(abi.TCMU_CMD_ADDED_DEVICE, 9, -errno.ETIMEDOUT, [])]
    run(main())


def test_answer_wire_format():
    """What the kernel's tcmu_genl_cmd_done reads: the *_DONE command of the
    event, TCMU_ATTR_CMD_STATUS (s32) and TCMU_ATTR_DEVICE_ID (u32)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    nl = TcmuNetlink.__new__(TcmuNetlink)
    nl.sock, nl._seq, nl.family_id = ours, 1, 0x1B
    try:
        for cmd, done in ((abi.TCMU_CMD_ADDED_DEVICE, abi.TCMU_CMD_ADDED_DEVICE_DONE),
                          (abi.TCMU_CMD_REMOVED_DEVICE, abi.TCMU_CMD_REMOVED_DEVICE_DONE),
                          (abi.TCMU_CMD_RECONFIG_DEVICE, abi.TCMU_CMD_RECONFIG_DEVICE_DONE)):
            nl.reply(TcmuEvent(cmd, OURS, 0, 1234), -errno.ENOENT)
            data = kernel.recv(4096)
            _ln, _typ, flags, _seq, _pid = NLMSGHDR.unpack_from(data)
            [(typ, got, body)] = parse_messages(data)
            a = parse_attrs(body)
            assert (typ, got, flags & 1) == (0x1B, done, 1)
            assert struct.unpack("=i", a[abi.TCMU_ATTR_CMD_STATUS])[0] == -errno.ENOENT
            assert struct.unpack("=I", a[abi.TCMU_ATTR_DEVICE_ID])[0] == 1234
    finally:
        ours.close()
        kernel.close()


def test_reconfig_event_carries_the_new_config_and_size():
    attrs = (pack_attr(abi.TCMU_ATTR_DEVICE, OURS.encode() + b"\0")
             + pack_attr(abi.TCMU_ATTR_MINOR, struct.pack("=I", 0))
             + pack_attr(abi.TCMU_ATTR_DEVICE_ID, struct.pack("=I", 3))
             + pack_attr(abi.TCMU_ATTR_DEV_CFG, b"liverestore/other\n\0")
             + pack_attr(abi.TCMU_ATTR_DEV_SIZE, struct.pack("=Q", 8 << 20)))
    ev = decode_event(abi.TCMU_CMD_RECONFIG_DEVICE, GENLHDR.pack(0, 2, 0)[GENLHDR.size:] + attrs)
    assert (ev.config, ev.size, ev.device_id) == ("liverestore/other", 8 << 20, 3)
