"""How the service's LUs reach hosts: the embedded iSCSI target, or LIO.

Both front ends serve the same ScsiDevice per volume (SCSI emulation over
the engine's volume I/O path); they differ only in who speaks iSCSI:

  EmbeddedFrontend  the pure-Python asyncio iSCSI target (any Linux host)
  LioFrontend       the kernel's LIO target, configured with rtslib-fb;
                    each exported volume is a ``user:liverestore`` TCMU
                    backstore whose commands our TCMU handler serves

``choose_backend("auto")`` takes LIO where configfs shows a kernel target.

The service makes a front end and hands it itself; a front end sees it only
as the ServedLUs below, so this module does not import the service.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any, Mapping, Protocol, TypedDict

from persistence.config import VolumeRecord

from .errors import ServiceError
from .iscsi.server import IscsiServer, IscsiTargetConfig
from .lio.rts import LioConfigurator
from .lio.spec import SUBTYPE, Description
from .scsi.device import ScsiDevice
from .tcmu import TcmuHandler
from .tcmu.tcmuservice import TcmuServiceRegistration

log = logging.getLogger(__name__)

CONFIGFS_TARGET = "/sys/kernel/config/target"
# Commands wait on the ring while the handler restarts; give it a minute.
LIO_CMD_TIME_OUT = "60"
# targetcli's help for `/backstores/user:liverestore create` (ConfigDesc on D-Bus).
CONFIG_DESC = (f"{SUBTYPE}/VOLUME: serves the liverestore volume VOLUME (it must exist: "
               "'liverestore volume create'; give its exact size). The daemon lists such a "
               "backstore as drift and never deletes it; 'liverestore export create' is the "
               "managed way to export a volume.")


def choose_backend(backend: str) -> str:
    if backend not in ("auto", "embedded", "lio"):
        raise ValueError(f"backend must be auto, embedded or lio, not {backend!r}")
    if backend == "auto":
        return "lio" if os.path.isdir(os.path.join(CONFIGFS_TARGET, "core")) else "embedded"
    return backend


class VolumeRecords(Protocol):
    def volume(self, name: str) -> VolumeRecord | None: ...


class ServedLUs(Protocol):
    """What a front end needs from the service: the device of each volume,
    the stored volumes, a stored target as the embedded target's
    configuration, and the memory the embedded target may use (bytes)."""

    @property
    def memory_limit(self) -> int: ...

    @property
    def devices(self) -> Mapping[str, ScsiDevice]: ...

    @property
    def cfg(self) -> VolumeRecords: ...

    def target_config(self, iqn: str, t: dict[str, Any]) -> IscsiTargetConfig: ...


class Frontend(Protocol):
    name: str

    async def start(self, targets: dict[str, dict[str, Any]]) -> None: ...

    async def set_target(self, iqn: str, t: dict[str, Any]) -> None: ...

    async def remove_target(self, iqn: str, t: dict[str, Any]) -> None: ...

    async def stop(self) -> None: ...

    async def set_portals(self, portals: list[tuple[str, int]]) -> None:
        """Listen on these portals from now on; sessions stay connected."""

    def addresses(self) -> list[tuple[str, int]]: ...

    def stats(self) -> dict[str, Any]: ...

    def sessions(self) -> dict[str, list[LoggedIn]]: ...


class LoggedIn(TypedDict):
    """One initiator logged in to a target (a normal session, not discovery)."""
    initiator: str
    peer: str | None        # "host:port" where the front end knows it


class EmbeddedFrontend:
    name = "embedded"

    def __init__(self, service: ServedLUs, portals: list[tuple[str, int]]) -> None:
        self.service = service
        self.portals = portals
        self.server: IscsiServer | None = None

    async def start(self, targets: dict[str, dict[str, Any]]) -> None:
        self.server = IscsiServer([], portals=self.portals, memory_limit=self.service.memory_limit)
        for iqn, t in targets.items():
            self.server.add_target(self.service.target_config(iqn, t))
        try:
            await self.server.start()
        except OSError as e:
            raise ServiceError(f"cannot listen on {self.portals}: {e.strerror or e}") from e

    async def set_target(self, iqn: str, t: dict[str, Any]) -> None:
        if iqn in self.server.targets:
            # Detach the devices from the old LunSet before building the new one.
            self.server.remove_target(iqn)
        self.server.add_target(self.service.target_config(iqn, t))

    async def remove_target(self, iqn: str, t: dict[str, Any]) -> None:
        if iqn in self.server.targets:
            self.server.remove_target(iqn)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def set_portals(self, portals: list[tuple[str, int]]) -> None:
        for p in portals:
            if p not in self.portals:
                await self.server.add_portal(*p)
        for p in self.portals:
            if p not in portals:
                await self.server.remove_portal(*p)     # its connections stay
        self.portals = self.server.portals = list(portals)

    def addresses(self) -> list[tuple[str, int]]:
        return list(self.server.addresses) if self.server is not None else []

    def stats(self) -> dict[str, Any]:
        return self.server.stats() if self.server is not None else {}

    def sessions(self) -> dict[str, list[LoggedIn]]:
        out: dict[str, list[LoggedIn]] = {}
        for s in (self.server.sessions.values() if self.server is not None else ()):
            if s.target is not None:
                out.setdefault(s.target.iqn, []).append(
                    LoggedIn(initiator=s.initiator_name, peer=s.conn.peer))
        return out


class LioFrontend:
    name = "lio"

    def __init__(self, service: ServedLUs, portals: list[tuple[str, int]]) -> None:
        self.service = service
        self.portals = portals
        self.handler: TcmuHandler | None = None
        self.lio: LioConfigurator | None = None
        self.bus: TcmuServiceRegistration | None = None
        self._targets: dict[str, dict[str, Any]] = {}
        self._applied: Description | None = None     # the description last applied
        self._drift_logged: list[str] = []

    def _description(self, targets: dict[str, dict[str, Any]]) -> Description:
        volumes = []
        tdesc = []
        for iqn, t in sorted(targets.items()):
            luns = [{"lun": int(n), "volume": v} for n, v in sorted(t.get("luns", {}).items(),
                                                                    key=lambda kv: int(kv[0]))]
            for lun in luns:
                rec = self.service.cfg.volume(lun["volume"])
                volumes.append({"name": rec.name, "size": rec.size,
                                "attributes": {"cmd_time_out": LIO_CMD_TIME_OUT}})
            chap = None
            if t.get("chap"):
                chap = {"userid": t["chap"][0], "password": t["chap"][1]}
                if t.get("mutual_chap"):
                    chap.update(mutual_userid=t["mutual_chap"][0],
                                mutual_password=t["mutual_chap"][1])
            tpg: dict[str, Any] = {"tag": int(t.get("tpgt", 1)),
                                   "portals": [f"{h}:{p}" for h, p in self.portals],
                                   "luns": luns}
            if t.get("acl"):
                tpg["acls"] = [{"initiator": i, **({"chap": chap} if chap else {})}
                               for i in t["acl"]]
            elif chap:
                tpg["chap"] = chap
            tdesc.append({"iqn": iqn, "tpgs": [tpg]})
        return Description.from_dict({"volumes": volumes, "targets": tdesc})

    async def _apply(self) -> None:
        """Bring LIO to the stored exports, changing only what this daemon
        made or now wants differently: an admin's change (an ACL added with
        targetcli, say) is left as it is and reported as drift in status."""
        desc = self._description(self._targets)
        previous = self._applied or desc      # at start: nothing we want changed yet
        report = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.lio.apply(desc, prune=True, previous=previous))
        self._applied = desc
        for line in report.lines():
            log.info("lio: %s", line)
        await self._until_served({c.args[0].backstore for c in report.changes if c.action == "create_backstore"})
        drift = [str(d) for d in report.drift]
        if drift != self._drift_logged:
            for line in drift:
                log.warning("lio drift (left as is; see 'liverestore status'): %s", line)
            self._drift_logged = drift

    async def _until_served(self, backstores: set[str], tries: int = 10, every: float = 0.2) -> None:
        """Rescan until the handler serves the backstores just created (2 s
        at most; later the handler's periodic rescan takes them). With our
        handler registered in tcmu-runner, tcmu-runner opens each new uio
        device too, then drops it (its D-Bus handlers cannot serve): our
        open in between fails busy, and must not wait for the slow rescan."""
        for _ in range(tries if backstores else 0):
            served = {name.split("/")[2] for name in self.handler.devices}
            if backstores <= served:
                return
            await asyncio.sleep(every)
            await self.handler.rescan()

    def _open(self, config: str, size: int, block_size: int) -> ScsiDevice:
        dev = self.service.devices.get(config)
        if dev is None:
            raise LookupError(f"no volume named {config} for TCMU device")
        if dev.lunio.size != size:
            raise ValueError(f"TCMU device {config} has {size} bytes, the volume "
                             f"{dev.lunio.size}")
        return dev

    async def start(self, targets: dict[str, dict[str, Any]]) -> None:
        self._targets = dict(targets)
        try:
            self.lio = LioConfigurator()
        except Exception as e:  # noqa: BLE001 - rtslib raises its own kinds
            raise ServiceError(f"LIO is not usable here ({e}); use --backend embedded") from e
        self.handler = TcmuHandler(self._open)
        await self.handler.start()
        await self._apply()
        # After a boot whose `targetctl restore` ran with tcmu-runner up, our
        # LUNs are back now but other ACLs' saved mappings onto them, and
        # admins' own targets' LUNs on our backstores, are not.
        report = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.lio.readopt_saved(self._applied))
        for c in report.changes:
            log.info("lio: %s (saved in the host's LIO configuration; targetctl restore skipped it)", c)
        self.bus = TcmuServiceRegistration(SUBTYPE, CONFIG_DESC, self.check_config)
        await self.bus.start()

    def check_config(self, config: str) -> tuple[bool, str]:
        """targetcli's check before it creates a user:liverestore backstore:
        the config must name one of our volumes (see CONFIG_DESC)."""
        subtype, _, name = config.partition("/")
        if subtype != SUBTYPE or not name:
            return False, f"the config must be {SUBTYPE}/VOLUME"
        if name not in self.service.devices:
            return False, (f"no liverestore volume named {name[:80]!r} (list them with "
                           "'liverestore volume list')")
        return True, "success"

    async def set_target(self, iqn: str, t: dict[str, Any]) -> None:
        self._targets[iqn] = t
        await self._apply()

    async def remove_target(self, iqn: str, t: dict[str, Any]) -> None:
        self._targets.pop(iqn, None)
        desc = self._description({iqn: t})
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.lio.teardown(desc))
        await self._apply()

    async def stop(self) -> None:
        # LIO's configuration stays: initiators keep their sessions and the
        # kernel holds commands on the ring until the handler is back.
        if self.bus is not None:
            await self.bus.stop()
        if self.handler is not None:
            await self.handler.stop()

    async def set_portals(self, portals: list[tuple[str, int]]) -> None:
        self.portals = list(portals)
        await self._apply()

    def addresses(self) -> list[tuple[str, int]]:
        return list(self.portals)

    def stats(self) -> dict[str, Any]:
        devs = getattr(self.handler, "devices", {}) if self.handler is not None else {}
        return {"backend": "lio", "tcmu_devices": len(devs),
                "dbroot": str(self.lio.dbroot) if self.lio is not None and self.lio.dbroot else None,
                "drift": self.drift()}

    def drift(self) -> list[str]:
        """LIO's differences from the stored exports, read now: what an admin
        changed that the daemon leaves, and what is missing (the daemon
        recreates that at its next change or start)."""
        if self.lio is None or self._applied is None:
            return []
        try:
            p = self.lio.plan_against(self._applied)
        except Exception as e:  # noqa: BLE001 - configfs read races an admin's change; say so
            return [f"cannot read LIO's configuration now: {e}"]
        return [str(d) for d in p.drift] + [f"{c.path}: liverestore will {c.action.replace('_', ' ')} "
                                            "it at its next change or start" for c in p.changes]

    def sessions(self) -> dict[str, list[LoggedIn]]:
        """From the kernel's configfs: the initiators of each TPG's
        dynamic_sessions (no ACL) and the ACLs whose info names a session."""
        out: dict[str, list[LoggedIn]] = {}
        for iqn, t in self._targets.items():
            tpg = os.path.join(CONFIGFS_TARGET, "iscsi", iqn, f"tpgt_{int(t.get('tpgt', 1))}")
            # NUL-terminated names (target_show_dynamic_sessions)
            names = re.split(r"[\0\n]", _read(os.path.join(tpg, "dynamic_sessions")))
            for ini in t.get("acl") or []:
                if "No active iSCSI Session" not in _read(os.path.join(tpg, "acls", ini, "info"),
                                                          "No active iSCSI Session"):
                    names.append(ini)
            found = [LoggedIn(initiator=n.strip(), peer=None) for n in names if n.strip()]
            if found:
                out[iqn] = found
        return out


def _read(path: str, missing: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return missing
