"""TCM-USER generic netlink events (device added / removed / reconfigured).

The kernel multicasts one message per event on the family's "config" group.
It waits for a reply (``*_DONE`` with ``TCMU_ATTR_CMD_STATUS`` and
``TCMU_ATTR_DEVICE_ID``; the first one for the device wins) when some daemon
has announced ``TCMU_ATTR_SUPP_KERN_CMD_REPLY`` with SET_FEATURES since the
module was loaded (tcmu-runner does at every start; the flag stays after it
exits) and the device's ``nl_reply_supported`` is > 0 (it takes that flag at
configure time unless created with ``nl_reply_supported=-1``). We never
announce it, and our own backstores are created with -1; ``reply()``
answers devices of our subtype created by others (targetcli, targetctl
restore) with replies enabled.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from . import abi

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

NLMSGHDR = struct.Struct("=IHHII")
GENLHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(kind: int, payload: bytes) -> bytes:
    return NLATTR.pack(NLATTR.size + len(payload), kind) + payload + bytes(_align(len(payload)) - len(payload))


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + NLATTR.size <= len(buf):
        ln, kind = NLATTR.unpack_from(buf, pos)
        if ln < NLATTR.size:
            break
        out[kind & 0x3FFF] = buf[pos + NLATTR.size:pos + ln]
        pos += _align(ln)
    return out


def parse_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(nlmsg_type, genl cmd, attribute bytes) per message in a datagram."""
    out = []
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        ln, typ, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if ln < NLMSGHDR.size:
            break
        body = data[pos + NLMSGHDR.size:pos + ln]
        if typ >= 0x10 and len(body) >= GENLHDR.size:
            cmd = body[0]
            out.append((typ, cmd, body[GENLHDR.size:]))
        elif typ == NLMSG_ERROR:
            out.append((typ, 0, body))
        pos += _align(ln)
    return out


@dataclass
class TcmuEvent:
    cmd: int            # abi.TCMU_CMD_*
    device: str         # uio name "tcm-user/<hba>/<dev>/<subtype>/<cfg>"
    minor: int          # uio minor (uio<minor>)
    device_id: int | None = None
    config: str | None = None       # RECONFIG: the new dev_config
    size: int | None = None         # RECONFIG: the new dev_size


def decode_event(cmd: int, attrs: bytes) -> TcmuEvent | None:
    a = parse_attrs(attrs)
    if cmd not in (abi.TCMU_CMD_ADDED_DEVICE, abi.TCMU_CMD_REMOVED_DEVICE, abi.TCMU_CMD_RECONFIG_DEVICE):
        return None
    dev = a.get(abi.TCMU_ATTR_DEVICE, b"").split(b"\0", 1)[0].decode(errors="replace")
    minor = struct.unpack("=I", a[abi.TCMU_ATTR_MINOR][:4])[0] if abi.TCMU_ATTR_MINOR in a else -1
    dev_id = struct.unpack("=I", a[abi.TCMU_ATTR_DEVICE_ID][:4])[0] if abi.TCMU_ATTR_DEVICE_ID in a else None
    # a dev_config written with echo ends in a newline: the kernel keeps it
    cfg = a[abi.TCMU_ATTR_DEV_CFG].split(b"\0", 1)[0].decode(errors="replace").rstrip("\n") \
        if abi.TCMU_ATTR_DEV_CFG in a else None
    size = struct.unpack("=Q", a[abi.TCMU_ATTR_DEV_SIZE][:8])[0] \
        if len(a.get(abi.TCMU_ATTR_DEV_SIZE, b"")) >= 8 else None
    return TcmuEvent(cmd, dev, minor, dev_id, cfg, size)


class TcmuNetlink:
    """A non-blocking socket subscribed to TCM-USER events."""

    def __init__(self, family: str = abi.TCMU_GENL_FAMILY, group: str = abi.TCMU_GENL_MCGRP) -> None:
        """Raises OSError (ENOENT) when the family is not registered, i.e.
        target_core_user is not loaded."""
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        try:
            self.sock.bind((0, 0))
            self._seq = 1
            self.family_id, groups = self._resolve(family)
            if group not in groups:
                raise OSError(f"{family} has no '{group}' multicast group: {groups}")
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[group])
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def _request(self, family: int, cmd: int, attrs: bytes) -> None:
        body = GENLHDR.pack(cmd, 2, 0) + attrs
        self._seq += 1
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), family, NLM_F_REQUEST, self._seq, 0) + body)

    def _resolve(self, name: str) -> tuple[int, dict[str, int]]:
        self.sock.settimeout(2.0)
        self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, pack_attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))
        data = self.sock.recv(65536)
        for typ, _cmd, body in parse_messages(data):
            if typ == NLMSG_ERROR:
                err = struct.unpack_from("=i", body)[0]
                raise OSError(-err, f"generic netlink family {name}: {os.strerror(-err)}")
            a = parse_attrs(body)
            fam = struct.unpack("=H", a[CTRL_ATTR_FAMILY_ID][:2])[0]
            groups: dict[str, int] = {}
            for g in parse_attrs(a.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
                ga = parse_attrs(g)
                gname = ga.get(CTRL_ATTR_MCAST_GRP_NAME, b"").split(b"\0", 1)[0].decode()
                if CTRL_ATTR_MCAST_GRP_ID in ga:
                    groups[gname] = struct.unpack("=I", ga[CTRL_ATTR_MCAST_GRP_ID][:4])[0]
            return fam, groups
        raise OSError(f"no answer resolving generic netlink family {name}")

    def read_events(self) -> list[TcmuEvent]:
        out = []
        for _ in range(64):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            for typ, cmd, body in parse_messages(data):
                if typ == self.family_id:
                    ev = decode_event(cmd, body)
                    if ev is not None:
                        out.append(ev)
        return out

    def reply(self, ev: TcmuEvent, status: int = 0) -> None:
        """Send the ``*_DONE`` reply a kernel expecting one waits for:
        ``status`` 0 or a negative errno, which the kernel hands back to the
        configfs write that caused the event (targetcli's create fails with
        it). Raises OSError when the datagram cannot be sent."""
        done = {abi.TCMU_CMD_ADDED_DEVICE: abi.TCMU_CMD_ADDED_DEVICE_DONE,
                abi.TCMU_CMD_REMOVED_DEVICE: abi.TCMU_CMD_REMOVED_DEVICE_DONE,
                abi.TCMU_CMD_RECONFIG_DEVICE: abi.TCMU_CMD_RECONFIG_DEVICE_DONE}[ev.cmd]
        attrs = pack_attr(abi.TCMU_ATTR_CMD_STATUS, struct.pack("=i", status))
        if ev.device_id is not None:
            attrs += pack_attr(abi.TCMU_ATTR_DEVICE_ID, struct.pack("=I", ev.device_id))
        self._request(self.family_id, done, attrs)

    def close(self) -> None:
        self.sock.close()
