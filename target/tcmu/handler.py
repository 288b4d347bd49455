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
overflows, or netlink may be unavailable). A device the kernel has not
finished configuring (configfs ``enable`` 0) is left to its ADDED event.

Answering the kernel: once a daemon (tcmu-runner) announced netlink
replies in this boot, a backstore created without ``nl_reply_supported=-1``
(targetcli, ``targetctl restore``) makes the kernel wait for a ``*_DONE``
answer to its ADDED / REMOVED / RECONFIG event, and the configfs write that
caused it blocks until then. We answer for our subtype only, within
``reply_timeout``, with the outcome: 0 when served (or dropped), ENOENT when
no volume has that name, EINVAL for a size mismatch, EBUSY for a change of a
served device's volume or size. tcmu-runner answers every device it cannot
open ENOENT and the kernel takes the first answer, so while it runs such a
backstore of ours is refused: create it with ``control=nl_reply_supported=-1``
(README, "Running on LIO").

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
import errno
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
from .native_device import AVAILABLE as NATIVE_AVAILABLE
from .native_device import NativeTcmuDevice
from .netlink import TcmuEvent, TcmuNetlink

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


def read_uio(sys_class_uio: str, uio: str, subtype: str | None = None) -> UioInfo | None:
    """One tcm-user uio device (of ``subtype``, if given); None when it is
    not one, vanished or is not ready yet."""
    d = os.path.join(sys_class_uio, uio)
    try:
        name = _read(os.path.join(d, "name"))
        parsed = parse_uio_name(name)
        if parsed is None or (subtype is not None and parsed[2] != subtype):
            return None
        size = int(_read(os.path.join(d, "maps", "map0", "size")), 0)
    except (OSError, ValueError):
        return None
    return UioInfo(uio, name, *parsed, map_size=size)


def scan_uio(sys_class_uio: str = SYS_CLASS_UIO, subtype: str | None = None) -> list[UioInfo]:
    try:
        entries = sorted(os.listdir(sys_class_uio))
    except FileNotFoundError:
        return []
    return [u for u in (read_uio(sys_class_uio, e, subtype) for e in entries) if u is not None]


class TcmuHandler:
    def __init__(self, open_device: OpenDevice, *, subtype: str = "liverestore",
                 close_device: Callable[[str, Any], Any] | None = None,
                 sys_class_uio: str = SYS_CLASS_UIO, dev_dir: str = "/dev",
                 configfs_core: str = CONFIGFS_CORE, use_netlink: bool = True,
                 rescan_interval: float = 10.0, reset_ring: bool = True,
                 device_factory: Callable[..., TcmuDevice] | None = None,
                 drain_timeout: float = 10.0, reply_timeout: float = 10.0) -> None:
        self.open_device = open_device
        # the native ring loop when it was built (setup.py), else Python's
        self.device_factory = device_factory or (NativeTcmuDevice if NATIVE_AVAILABLE else TcmuDevice)
        self.drain_timeout = drain_timeout
        self.reply_timeout = reply_timeout
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
        self._sizes: dict[str, int] = {}              # uio name -> dev_size served
        self._nl_reply: dict[str, int] = {}           # uio name -> its nl_reply_supported
        self._nl = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rescan_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._event_tasks: set[asyncio.Task] = set()
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.device_factory is TcmuDevice and not NATIVE_AVAILABLE:
            log.warning("the native TCMU ring loop was not built (install gcc, libc6-dev and "
                        "python3-dev, then reinstall): serving rings in Python, at a fraction "
                        "of the IOPS")
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
            for name in list(self._nl_reply):
                if name not in found:
                    del self._nl_reply[name]
            added, removed = [], []
            for name in list(self.devices):
                if name not in found or found[name].uio != self._uio.get(name) or self.devices[name].gone:
                    await self._remove(name)
                    removed.append(name)
            for name, info in found.items():
                # one the kernel has not finished configuring waits for a
                # daemon's answer to its ADDED event: not ours to open yet
                if name not in self.devices and self._configured(info):
                    if await self._add(info) == 0:
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

    async def _handle_events(self, events: list[TcmuEvent]) -> None:
        """Events of other handlers' devices are theirs to answer; ours are
        answered when the kernel waits for it (see _answer), else: REMOVED
        is sent before the kernel unregisters the uio device, so the device
        named in it is dropped directly (a rescan could still see it);
        RECONFIG (size, config or write-cache change) reopens the device so
        the daemon sees the new values; everything ends in a rescan."""
        try:
            for ev in events:
                parsed = parse_uio_name(ev.device)
                if parsed is None or parsed[2] != self.subtype:
                    continue
                if self._expects_reply(ev):
                    await self._answer(ev)
                elif ev.cmd in (abi.TCMU_CMD_REMOVED_DEVICE, abi.TCMU_CMD_RECONFIG_DEVICE):
                    async with self._lock:
                        if ev.device in self.devices and not self._stopping:
                            await self._remove(ev.device)
            if not self._stopping:
                await self.rescan(skip=[ev.device for ev in events if ev.cmd == abi.TCMU_CMD_REMOVED_DEVICE])
        except Exception:
            log.exception("handling netlink events failed")

    # -- answering the kernel ------------------------------------------------------
    def _expects_reply(self, ev: TcmuEvent) -> bool:
        """Whether the kernel waits for our ``*_DONE`` for this event: the
        device's nl_reply_supported > 0 (the module-wide flag tcmu-runner
        set, unless the creator wrote -1). REMOVED comes after configfs
        dropped the device, so its value is the one read at add / scan
        time; unknown there, we answer (an answer nobody waits for only
        costs an ENODEV back on our socket)."""
        if ev.device_id is None:            # a v1 kernel: it never waits
            return False
        if ev.cmd == abi.TCMU_CMD_REMOVED_DEVICE:
            return self._nl_reply.pop(ev.device, 1) > 0
        parsed = parse_uio_name(ev.device)
        try:
            value = int(_read(os.path.join(self.configfs_core, f"user_{parsed[0]}", parsed[1],
                                           "attrib", "nl_reply_supported")))
        except (OSError, ValueError):
            value = 0                       # a kernel without replies has no such attribute
        self._nl_reply[ev.device] = value
        return value > 0

    async def _answer(self, ev: TcmuEvent) -> None:
        """Settle the event and tell the kernel how it went, within
        ``reply_timeout``, whatever happens: the configfs write that caused
        it (targetcli's create or delete, targetctl) blocks until then."""
        status = -errno.EIO
        try:
            status = await asyncio.wait_for(self._settle(ev), self.reply_timeout)
        except asyncio.TimeoutError:
            log.warning("%s: not settled within %.0f s; answering the kernel ETIMEDOUT",
                        ev.device, self.reply_timeout)
            status = -errno.ETIMEDOUT
        except asyncio.CancelledError:
            status = -errno.ESHUTDOWN
            raise
        except Exception:
            log.exception("%s: settling netlink cmd %d failed", ev.device, ev.cmd)
        finally:
            try:
                self._nl.reply(ev, status)
                log.info("netlink: answered cmd %d for %s: %s", ev.cmd, ev.device,
                         os.strerror(-status) if status else "ok")
            except OSError as e:
                log.error("%s: cannot answer the kernel (cmd %d): %s", ev.device, ev.cmd, e)

    async def _settle(self, ev: TcmuEvent) -> int:
        """0 or the negative errno the kernel's configfs write returns.
        ADDED: served before we answer, as tcmu-runner does, without a ring
        reset (the device is new, and the kernel refuses a reset before our
        answer completes its configuration). RECONFIG: a served device's
        volume and size are the daemon's; a change of either is refused
        (accepting it would stop the LU being served). Other changes and
        devices we do not serve are accepted."""
        async with self._lock:
            if ev.cmd == abi.TCMU_CMD_ADDED_DEVICE:
                if self._stopping:
                    return -errno.ESHUTDOWN
                if ev.device in self.devices:
                    return 0
                info = read_uio(self.sys_class_uio, f"uio{ev.minor}", self.subtype)
                if info is None or info.name != ev.device:
                    log.warning("%s: no uio%d of that name", ev.device, ev.minor)
                    return -errno.ENODEV
                return await self._add(info, reset=False)
            if ev.cmd == abi.TCMU_CMD_REMOVED_DEVICE:
                if ev.device in self.devices:
                    await self._remove(ev.device)
                return 0
            if ev.device in self.devices:
                served_config = self._objs[ev.device][0]
                size = self._sizes.get(ev.device)
                if (ev.config is not None and ev.config != f"{self.subtype}/{served_config}") \
                        or (ev.size is not None and ev.size != size):
                    log.warning("%s: refused a change to config %r size %s of a served device "
                                "(its volume and size are liverestore's)", ev.device, ev.config, ev.size)
                    return -errno.EBUSY
                await self._remove(ev.device)       # reopened by the rescan that follows
            return 0

    # -- one device ------------------------------------------------------------------
    def _attrib(self, info: UioInfo, attr: str) -> str:
        return _read(os.path.join(self.configfs_core, f"user_{info.hba}", info.dev, "attrib", attr))

    def _configured(self, info: UioInfo) -> bool:
        """configfs ``enable`` is 1 once the kernel configured the device;
        a kernel without that file says nothing: assume it is. Also notes
        the device's nl_reply_supported for the REMOVED event to come."""
        if info.name not in self._nl_reply:
            try:
                self._nl_reply[info.name] = int(self._attrib(info, "nl_reply_supported"))
            except (OSError, ValueError):
                pass
        try:
            return _read(os.path.join(self.configfs_core, f"user_{info.hba}", info.dev, "enable")) != "0"
        except OSError:
            return True

    def _reset_ring_fn(self, info: UioInfo):
        path = os.path.join(self.configfs_core, f"user_{info.hba}", info.dev, "action", "reset_ring")

        def reset() -> None:
            with open(path, "w") as f:
                f.write("1")
            log.info("%s: ring reset (pending commands answered BUSY for retry)", info.key)
        return reset

    async def _add(self, info: UioInfo, reset: bool = True) -> int:
        """Serve one device: 0, or the negative errno saying why not (the
        kernel's answer to an ADDED event). ``reset``: reset the ring first
        (restart recovery; a new device has nothing on it)."""
        try:
            size = int(self._attrib(info, "dev_size"))
            block_size = int(self._attrib(info, "hw_block_size"))
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read size/block size: %s", info.name, e)
            return -errno.EIO
        try:
            obj = self.open_device(info.config, size, block_size)
            if inspect.isawaitable(obj):
                obj = await obj
        except (LookupError, ValueError) as e:
            # open_device's refusal (a backstore naming no volume of ours, a
            # size that does not match): the admin's to fix, not a bug
            ratelog.warning(f"refused {info.name}", "%s: not served: %s", info.name, e)
            return -errno.ENOENT if isinstance(e, LookupError) else -errno.EINVAL
        except Exception:
            log.exception("%s: open_device(%r) failed", info.name, info.config)
            return -errno.EIO
        target = as_scsi_target(obj, block_size, info)
        dev = self.device_factory(info.key, target, uio_dev=os.path.join(self.dev_dir, info.uio),
                         map_size=info.map_size,
                         reset_ring=self._reset_ring_fn(info) if self.reset_ring and reset else None)
        try:
            dev.open()
        except Exception:
            log.exception("%s: cannot open %s", info.name, dev.uio_dev)
            await dev.close()
            await self._call_close(info.config, obj)
            return -errno.EIO
        self.devices[info.name] = dev
        self._objs[info.name] = (info.config, obj)
        self._uio[info.name] = info.uio
        self._sizes[info.name] = size
        log.info("serving %s (%s, %d bytes, block %d)", info.name, info.uio, size, block_size)
        return 0

    async def _remove(self, name: str, drain: float = 0.0) -> None:
        dev = self.devices.pop(name)
        await dev.close(drain=drain)
        log.info("%s: %s", name, " ".join(f"{k}={v}" for k, v in sorted(dev.stats.items())))
        cfg, obj = self._objs.pop(name)
        self._uio.pop(name, None)
        self._sizes.pop(name, None)
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
