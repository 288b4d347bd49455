"""The TCMU handler: finds ``user:<subtype>`` devices and serves each one.

Like a tcmu-runner handler, it owns one subtype (``liverestore``): a uio
device named ``tcm-user/<hba>/<dev>/<subtype>/<config>`` is ours when the
subtype matches. For each, the daemon's ``open_device(config, size,
block_size)`` callback returns what serves it:

* a ScsiTarget-like object (``async execute(ScsiCommand) -> ScsiResponse``),
  used as is with LUN 0, or
* a LunIO-like object (``size``, ``async read/write/flush``... the
  tcmu-runner "read/write/flush" table), wrapped in a ScsiDevice behind a
  LunSet of the SCSI layer.

``close_device(config, obj)`` (optional) is called when the device goes away
or the handler stops.

Discovery: a scan of /sys/class/uio at start, TCM-USER generic netlink
events (added / removed / reconfigured) while running, and a slow periodic
rescan as a safety net (events can be lost when the socket buffer
overflows, or netlink may be unavailable).

Restart recovery: when we open a device we write ``1`` to its configfs
``action/reset_ring``. The kernel then completes every command still on the
ring (handed to a previous handler that died before completing it) with
SAM status BUSY and empties the ring (head = tail = 0); initiators retry
BUSY commands, so they are redone against the new handler. (Writing ``2``
would fail them with CHECK CONDITION instead.) Re-executing the old ring
entries ourselves is not safe with out-of-order completion: a dead handler
may have completed some of them already.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from target.logsafe import RateLimitedLog
from target.scsi.device import ScsiDevice
from target.scsi.identity import DeviceIdentity
from target.scsi.lunset import LunSet

from . import abi
from .device import TcmuDevice
from .netlink import TcmuNetlink

log = logging.getLogger(__name__)
# a refused device is retried at every rescan: one line per device per burst
ratelog = RateLimitedLog(log)

SYS_CLASS_UIO = "/sys/class/uio"
CONFIGFS_CORE = "/sys/kernel/config/target/core"

OpenDevice = Callable[[str, int, int], Any]


@dataclass(frozen=True)
class UioInfo:
    uio: str           # "uio3"
    name: str          # "tcm-user/<hba>/<dev>/<subtype>/<config>"
    hba: str
    dev: str
    subtype: str
    config: str
    map_size: int

    @property
    def key(self) -> str:
        return f"{self.hba}/{self.dev}"


def parse_uio_name(name: str) -> tuple[str, str, str, str] | None:
    """(hba index, device name, subtype, config) of a tcm-user uio name."""
    parts = name.split("/", 4)
    if len(parts) != 5 or parts[0] != "tcm-user":
        return None
    return parts[1], parts[2], parts[3], parts[4]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def scan_uio(sys_class_uio: str = SYS_CLASS_UIO, subtype: str | None = None) -> list[UioInfo]:
    out = []
    try:
        entries = sorted(os.listdir(sys_class_uio))
    except FileNotFoundError:
        return out
    for uio in entries:
        d = os.path.join(sys_class_uio, uio)
        try:
            name = _read(os.path.join(d, "name"))
            parsed = parse_uio_name(name)
            if parsed is None or (subtype is not None and parsed[2] != subtype):
                continue
            size = int(_read(os.path.join(d, "maps", "map0", "size")), 0)
        except (OSError, ValueError):
            continue       # vanished or not ready yet
        out.append(UioInfo(uio, name, *parsed, map_size=size))
    return out


class TcmuHandler:
    def __init__(self, open_device: OpenDevice, *, subtype: str = "liverestore",
                 close_device: Callable[[str, Any], Any] | None = None,
                 sys_class_uio: str = SYS_CLASS_UIO, dev_dir: str = "/dev",
                 configfs_core: str = CONFIGFS_CORE, use_netlink: bool = True,
                 rescan_interval: float = 10.0, reset_ring: bool = True,
                 device_factory: Callable[..., TcmuDevice] = TcmuDevice,
                 drain_timeout: float = 10.0) -> None:
        self.open_device = open_device
        self.device_factory = device_factory
        self.drain_timeout = drain_timeout
        self.close_device = close_device
        self.subtype = subtype
        self.sys_class_uio = sys_class_uio
        self.dev_dir = dev_dir
        self.configfs_core = configfs_core
        self.use_netlink = use_netlink
        self.rescan_interval = rescan_interval
        self.reset_ring = reset_ring
        self.devices: dict[str, TcmuDevice] = {}      # by uio name
        self._objs: dict[str, tuple[str, Any]] = {}
        self._uio: dict[str, str] = {}                # uio name -> "uioN" served
        self._nl = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rescan_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._event_tasks: set[asyncio.Task] = set()
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.use_netlink:
            try:
                self._nl = TcmuNetlink()
                self._loop.add_reader(self._nl.fileno(), self._on_netlink)
                log.info("listening to TCM-USER netlink events (family %d)", self._nl.family_id)
            except OSError as e:
                log.warning("TCM-USER netlink unavailable (%s); periodic rescan only", e)
                self._nl = None
        await self.rescan()
        if self.rescan_interval > 0:
            self._rescan_task = self._loop.create_task(self._rescan_loop())

    async def stop(self) -> None:
        self._stopping = True
        for t in list(self._event_tasks):
            t.cancel()
        await asyncio.gather(*self._event_tasks, return_exceptions=True)
        if self._rescan_task is not None:
            self._rescan_task.cancel()
            await asyncio.gather(self._rescan_task, return_exceptions=True)
        if self._nl is not None:
            self._loop.remove_reader(self._nl.fileno())
            self._nl.close()
            self._nl = None
        async with self._lock:
            # graceful: commands already running are finished and completed
            await asyncio.gather(*(self._remove(name, drain=self.drain_timeout) for name in list(self.devices)))

    async def __aenter__(self) -> "TcmuHandler":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- discovery -----------------------------------------------------------------
    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            try:
                await self.rescan()
            except Exception:
                log.exception("rescan failed")

    async def rescan(self, skip: list[str] = ()) -> dict[str, list[str]]:
        """Serve new devices, drop vanished ones. Returns what changed.
        ``skip``: names announced as removed whose sysfs entry may linger."""
        async with self._lock:
            found = {u.name: u for u in scan_uio(self.sys_class_uio, self.subtype) if u.name not in skip}
            added, removed = [], []
            for name in list(self.devices):
                if name not in found or found[name].uio != self._uio.get(name) or self.devices[name].gone:
                    await self._remove(name)
                    removed.append(name)
            for name, info in found.items():
                if name not in self.devices:
                    if await self._add(info):
                        added.append(name)
            return {"added": added, "removed": removed}

    def _on_netlink(self) -> None:
        events = self._nl.read_events()
        for ev in events:
            log.info("netlink: cmd %d device %s minor %d", ev.cmd, ev.device, ev.minor)
        if events:
            t = self._loop.create_task(self._handle_events(events))
            self._event_tasks.add(t)
            t.add_done_callback(self._event_tasks.discard)

    async def _handle_events(self, events) -> None:
        """REMOVED is sent before the kernel unregisters the uio device, so
        the device named in it is dropped directly (a rescan could still see
        it); RECONFIG (size, config or write-cache change) reopens the device
        so the daemon sees the new values; everything ends in a rescan."""
        try:
            async with self._lock:
                for ev in events:
                    if ev.cmd in (abi.TCMU_CMD_REMOVED_DEVICE, abi.TCMU_CMD_RECONFIG_DEVICE) \
                            and ev.device in self.devices and not self._stopping:
                        await self._remove(ev.device)
            if not self._stopping:
                await self.rescan(skip=[ev.device for ev in events if ev.cmd == abi.TCMU_CMD_REMOVED_DEVICE])
        except Exception:
            log.exception("handling netlink events failed")

    # -- one device ------------------------------------------------------------------
    def _attrib(self, info: UioInfo, attr: str) -> str:
        return _read(os.path.join(self.configfs_core, f"user_{info.hba}", info.dev, "attrib", attr))

    def _reset_ring_fn(self, info: UioInfo):
        path = os.path.join(self.configfs_core, f"user_{info.hba}", info.dev, "action", "reset_ring")

        def reset() -> None:
            with open(path, "w") as f:
                f.write("1")
            log.info("%s: ring reset (pending commands answered BUSY for retry)", info.key)
        return reset

    async def _add(self, info: UioInfo) -> bool:
        try:
            size = int(self._attrib(info, "dev_size"))
            block_size = int(self._attrib(info, "hw_block_size"))
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read size/block size: %s", info.name, e)
            return False
        try:
            obj = self.open_device(info.config, size, block_size)
            if inspect.isawaitable(obj):
                obj = await obj
        except (LookupError, ValueError) as e:
            # open_device's refusal (a backstore naming no volume of ours, a
            # size that does not match): the admin's to fix, not a bug
            ratelog.warning(f"refused {info.name}", "%s: not served: %s", info.name, e)
            return False
        except Exception:
            log.exception("%s: open_device(%r) failed", info.name, info.config)
            return False
        target = as_scsi_target(obj, block_size, info)
        dev = self.device_factory(info.key, target, uio_dev=os.path.join(self.dev_dir, info.uio),
                         map_size=info.map_size,
                         reset_ring=self._reset_ring_fn(info) if self.reset_ring else None)
        try:
            dev.open()
        except Exception:
            log.exception("%s: cannot open %s", info.name, dev.uio_dev)
            await dev.close()
            await self._call_close(info.config, obj)
            return False
        self.devices[info.name] = dev
        self._objs[info.name] = (info.config, obj)
        self._uio[info.name] = info.uio
        log.info("serving %s (%s, %d bytes, block %d)", info.name, info.uio, size, block_size)
        return True

    async def _remove(self, name: str, drain: float = 0.0) -> None:
        dev = self.devices.pop(name)
        await dev.close(drain=drain)
        log.info("%s: %s", name, " ".join(f"{k}={v}" for k, v in sorted(dev.stats.items())))
        cfg, obj = self._objs.pop(name)
        self._uio.pop(name, None)
        await self._call_close(cfg, obj)
        log.info("stopped serving %s", name)

    async def _call_close(self, cfg: str, obj: Any) -> None:
        if self.close_device is None:
            return
        try:
            r = self.close_device(cfg, obj)
            if inspect.isawaitable(r):
                await r
        except Exception:
            log.exception("close_device(%r) failed", cfg)


def as_scsi_target(obj: Any, block_size: int, info: UioInfo | None = None) -> Any:
    """A ScsiTarget as is; a LunIO wrapped in ScsiDevice + LunSet (LUN 0)."""
    if hasattr(obj, "execute"):
        return obj
    ident = identity_for(info.config if info else "lu")
    return LunSet({0: ScsiDevice(obj, ident, block_size=block_size)}, identity=ident)


def identity_for(config: str) -> DeviceIdentity:
    """A stable identity derived from the config string (volume name)."""
    h = hashlib.sha256(config.encode()).hexdigest()
    return DeviceIdentity(product_id="liverestore", revision="0001", serial=h[:16],
                          naa="5" + "001405" + h[:9], t10_vendor_id=h[:32])
