"""The liverestore service: the one Python API behind the CLI, the shell,
Ansible and the control socket.

Owns the database, the restore engine, one SCSI device per volume and the
embedded iSCSI server. Every operation returns JSON-serialisable data and
raises ServiceError with an operator-readable message on refusal.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import stat
import time
from dataclasses import asdict
from typing import Any

from persistence.config import ConfigStore, SqliteReservationStore, VolumeRecord
from persistence.db import Database, DatabaseError
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.blockstore import BlockStoreError, FileBlockStore
from restore_core.engine import Engine, EngineError, NAME_RE
from restore_core.extentmap import DEFAULT_EXTENT_SIZE
from restore_core.pair import Pair, Throttle

from .engine_lun import EngineLunIO
from .iscsi.budget import DEFAULT_MEMORY_LIMIT, MIN_MEMORY_LIMIT
from .frontends import EmbeddedFrontend, Frontend, LioFrontend, choose_backend

log = logging.getLogger(__name__)

DEFAULT_PORTAL = ("127.0.0.1", 3260)
IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[^\s]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
SECRET = "********"


class ServiceError(Exception):
    """Refused; the message says why and, where it can, what to do."""


DB_NAME = "liverestore.db"


def _private(path: str) -> None:
    """The database holds CHAP secrets: owner-only, with its WAL and shm files."""
    for p in (path, path + "-wal", path + "-shm"):
        try:
            if stat.S_IMODE(os.stat(p).st_mode) != 0o600:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass
        except PermissionError:
            log.warning("%s is readable by others and not ours to chmod; it holds CHAP "
                        "secrets: chmod 600 it", p)


def init_state(state_dir: str) -> bool:
    """Create the state directory (0700) and an empty database (0600).

    Returns False, changing nothing but the modes, when it is already there.
    Refuses a path that exists but is not a liverestore database."""
    state_dir = os.path.abspath(state_dir)
    path = os.path.join(state_dir, DB_NAME)
    existed = os.path.exists(path)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        old = os.umask(0o077)
        try:
            Database(path, create=True).close()
        finally:
            os.umask(old)
        _private(path)
    except DatabaseError as e:
        raise ServiceError(str(e)) from e
    except OSError as e:
        raise ServiceError(f"cannot initialise {state_dir}: {e.strerror or e}") from e
    return not existed


def _size(text: Any) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise ServiceError(f"bad size {text!r}: use a number of bytes or e.g. 512M, 10G, 2T")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                              "T": 1 << 40, "P": 1 << 50}[m.group(2).upper()]


def _memory_limit(text: str | int | None) -> int:
    """serve --memory-limit: the RSS bound the embedded iSCSI target budgets for."""
    if text is None:
        return DEFAULT_MEMORY_LIMIT
    n = _size(text)
    if n < MIN_MEMORY_LIMIT:
        raise ServiceError(f"memory limit {text} is too small: at least {MIN_MEMORY_LIMIT >> 20}M")
    return n


def _throttle_knobs(knobs: dict[str, Any]) -> dict[str, int]:
    unknown = set(knobs) - set(Throttle.__dataclass_fields__)
    if unknown:
        raise ServiceError(f"unknown throttle setting(s): {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(Throttle.__dataclass_fields__)}")
    out: dict[str, int] = {}
    for k, v in knobs.items():
        if v is None:
            continue
        if k == "rate":
            out[k] = _size(v)
            continue
        try:
            out[k] = int(v)
        except (TypeError, ValueError):
            raise ServiceError(f"throttle {k} must be a whole number, not {v!r}") from None
    return out


def _identity(name: str, created_at: float):
    from .scsi import DeviceIdentity
    h = hashlib.sha256(f"{name}\0{created_at!r}".encode()).hexdigest()
    # NAA-6 with the Linux-IO OUI (001405) as LIO does, so hosts treat the
    # LU like any LIO disk; the rest is stable per volume.
    return DeviceIdentity(product_id="liverestore", revision="0001", serial=h[:24],
                          naa="6001405" + h[:25], t10_vendor_id=h[:32])


class Service:
    def __init__(self, state_dir: str, *, init: bool = False,
                 portals: list[tuple[str, int]] | None = None, backend: str = "auto",
                 memory_limit: str | int | None = None) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.memory_limit = _memory_limit(memory_limit)
        try:
            self.backend = choose_backend(backend)
        except ValueError as e:
            raise ServiceError(str(e)) from e
        self._init = init
        self._portals_override = portals
        self.db: Database | None = None
        self.config: ConfigStore | None = None
        self.engine: Engine | None = None
        self.devices: dict[str, Any] = {}        # volume -> ScsiDevice
        self.lunsets: dict[str, Any] = {}        # target iqn -> LunSet
        self.frontend: Frontend | None = None
        self.started_at = time.time()

    # -- start / stop --------------------------------------------------------------
    async def start(self) -> None:
        if self._init:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        elif not os.path.isdir(self.state_dir):
            raise ServiceError(f"state directory {self.state_dir} does not exist; "
                               "start with --init to create it")
        path = os.path.join(self.state_dir, DB_NAME)
        old = os.umask(0o077)
        try:
            self.db = Database(path, create=self._init)
        except DatabaseError as e:
            raise ServiceError(str(e)) from e
        finally:
            os.umask(old)
        _private(path)
        self.config = ConfigStore(self.db)
        self.engine = Engine(SqliteMetadataStore(self.db))
        for rec in self.config.volumes():
            try:
                store = FileBlockStore(rec.path, rec.size)
            except (OSError, BlockStoreError) as e:
                raise ServiceError(f"volume {rec.name}: cannot open {rec.path}: {e}; "
                                   "fix the path or delete the volume") from e
            self.engine.add_volume(rec.name, store)
            self._make_device(rec)
        try:
            await self.engine.start()
        except (EngineError, DatabaseError) as e:
            raise ServiceError(str(e)) from e
        portals = self._portals_override or [tuple(p) for p in
                                             self.config.get("portals", [list(DEFAULT_PORTAL)])]
        portals = [(h, int(p)) for h, p in portals]
        kind = LioFrontend if self.backend == "lio" else EmbeddedFrontend
        self.frontend = kind(self, portals)
        await self.frontend.start(self.config.targets())
        log.info("front end: %s", self.backend)

    async def stop(self) -> None:
        """Graceful: stop accepting, drain commands, stop copiers, flush, persist."""
        if self.frontend is not None:
            try:
                await self.frontend.stop()
            except Exception:  # noqa: BLE001
                log.exception("%s front end stop failed", self.backend)
        if self.engine is not None:
            await self.engine.close()
        if self.db is not None:
            self.db.close()

    # -- helpers -------------------------------------------------------------------------
    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    @property
    def cfg(self) -> ConfigStore:
        assert self.config is not None
        return self.config

    def _make_device(self, rec: VolumeRecord):
        from .scsi import ScsiDevice
        dev = ScsiDevice(EngineLunIO(self.eng.volume_io(rec.name)),
                         _identity(rec.name, rec.created_at),
                         reservations=SqliteReservationStore(self.cfg, rec.name))
        self.devices[rec.name] = dev
        return dev

    def _exported_in(self, volume: str) -> str | None:
        for iqn, t in self.cfg.targets().items():
            if volume in t.get("luns", {}).values():
                return iqn
        return None

    def _target_config(self, iqn: str, t: dict[str, Any]):
        from .iscsi.server import IscsiTargetConfig
        from .scsi import LunSet
        ls = LunSet()
        for lun, vol in sorted(t.get("luns", {}).items(), key=lambda kv: int(kv[0])):
            ls.add(int(lun), self.devices[vol])
        self.lunsets[iqn] = ls
        chap = tuple(t["chap"]) if t.get("chap") else None
        mutual = tuple(t["mutual_chap"]) if t.get("mutual_chap") else None
        acl = set(t["acl"]) if t.get("acl") else None
        return IscsiTargetConfig(iqn=iqn, scsi_target=ls, tpgt=int(t.get("tpgt", 1)), acl=acl,
                                 chap=chap, mutual_chap=mutual)

    def _wrap(self, e: Exception) -> ServiceError:
        return e if isinstance(e, ServiceError) else ServiceError(str(e))

    # -- volumes ----------------------------------------------------------------------------
    async def volume_create(self, name: str, path: str | None = None, size: Any = None,
                            extent_size: Any = DEFAULT_EXTENT_SIZE) -> dict[str, Any]:
        if not NAME_RE.match(name or ""):
            raise ServiceError(f"invalid volume name {name!r}: 1-64 of letters, digits, _ . : -")
        if self.cfg.volume(name) is not None:
            raise ServiceError(f"volume {name} already exists")
        es = _size(extent_size)
        if es < 4096 or es & (es - 1) or es > 64 << 20:
            raise ServiceError("extent size must be a power of two from 4K to 64M")
        want = _size(size) if size not in (None, "") else None
        if want is not None and (want <= 0 or want % 512):
            raise ServiceError("size must be a positive multiple of 512 bytes")
        if path is None:
            path = os.path.join(self.state_dir, "volumes", f"{name}.img")
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        path = os.path.abspath(path)
        kind = "file"
        if os.path.exists(path):
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode):
                kind = "blockdev"
            elif not stat.S_ISREG(st.st_mode):
                raise ServiceError(f"{path} is neither a regular file nor a block device")
            elif want is None and st.st_size == 0:
                raise ServiceError(f"{path} is empty: give a size")
        elif want is None:
            raise ServiceError(f"{path} does not exist: give a size to create it")
        for other in self.cfg.volumes():
            if other.path == path:
                raise ServiceError(f"{path} is already volume {other.name}")
        try:
            store = FileBlockStore(path, want, create=True)
        except (OSError, BlockStoreError) as e:
            raise ServiceError(f"cannot use {path}: {e}") from e
        rec = VolumeRecord(name, path, store.size, es, kind, time.time())
        try:
            self.eng.add_volume(name, store)
        except EngineError as e:
            store.close()
            raise self._wrap(e) from e
        self.cfg.put_volume(rec)
        self._make_device(rec)
        return self.volume_show(name)

    async def volume_delete(self, name: str) -> dict[str, Any]:
        rec = self.cfg.volume(name)
        if rec is None:
            raise ServiceError(f"no volume named {name}")
        iqn = self._exported_in(name)
        if iqn:
            raise ServiceError(f"volume {name} is exported by {iqn}; remove the export first")
        try:
            store = self.eng.remove_volume(name)
        except EngineError as e:
            raise self._wrap(e) from e
        store.close()
        self.devices.pop(name, None)
        self.cfg.delete_volume(name)
        return {"deleted": name, "path": rec.path, "note": "the image file was left in place"}

    def volume_list(self) -> list[dict[str, Any]]:
        return [self.volume_show(v.name) for v in self.cfg.volumes()]

    def volume_show(self, name: str) -> dict[str, Any]:
        rec = self.cfg.volume(name)
        if rec is None:
            raise ServiceError(f"no volume named {name}")
        vio = self.eng.volume_io(name)
        mode, why = vio.access()
        vol = self.eng.volumes[name]
        role = "clone" if vol.as_clone else ("source" if vol.as_source else "standalone")
        return {**asdict(rec), "role": role, "access": mode, "access_reason": why,
                "exported_by": self._exported_in(name),
                "pairs": [p.id for p in vol.as_source] + ([vol.as_clone.id] if vol.as_clone else [])}

    # -- pairs ------------------------------------------------------------------------------
    async def pair_create(self, source: str, clone: str, extent_size: Any = None,
                          sync: bool = True, **throttle: Any) -> dict[str, Any]:
        rec = self.cfg.volume(source)
        es = _size(extent_size) if extent_size else (rec.extent_size if rec else DEFAULT_EXTENT_SIZE)
        t = Throttle(**_throttle_knobs(throttle)) if throttle else None
        try:
            pair = await self.eng.create_pair(source, clone, extent_size=es, sync=sync, throttle=t)
        except (EngineError, ValueError, TypeError) as e:
            raise self._wrap(e) from e
        return self.pair_show(pair.id)

    def _pair(self, pair: str) -> Pair:
        """A pair by id (the clone's name) or "source/clone"."""
        try:
            if "/" in pair:
                s, c = pair.split("/", 1)
                return self.eng.find_pair(s, c)
            return self.eng.pair(pair)
        except EngineError as e:
            raise self._wrap(e) from e

    async def _do(self, coro) -> None:
        try:
            await coro
        except (EngineError, ValueError, TypeError) as e:
            raise self._wrap(e) from e

    async def pair_fracture(self, pair: str) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.fracture(p.id))
        return self.pair_show(p.id)

    async def pair_sync(self, pair: str, full: bool = False) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.sync(p.id, full=full))
        return self.pair_show(p.id)

    async def pair_restore(self, pair: str, protected: bool = True) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.restore(p.id, protected=protected))
        return self.pair_show(p.id)

    async def pair_pause(self, pair: str) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.pause(p.id))
        return self.pair_show(p.id)

    async def pair_resume(self, pair: str) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.resume(p.id))
        return self.pair_show(p.id)

    async def pair_throttle(self, pair: str, **knobs: Any) -> dict[str, Any]:
        p = self._pair(pair)
        clean = _throttle_knobs(knobs)
        await self._do(self.eng.set_throttle(p.id, **clean))
        return self.pair_show(p.id)

    async def pair_delete(self, pair: str, force: bool = False) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.delete_pair(p.id, force=force))
        return {"deleted": p.id}

    def pair_list(self) -> list[dict[str, Any]]:
        return [self.pair_show(pid) for pid in sorted(self.eng.pairs)]

    def pair_show(self, pair: str) -> dict[str, Any]:
        p = self._pair(pair)
        pr = p.progress()
        return {"id": p.id, "source": p.source, "clone": p.clone, "size": p.size,
                "extent_size": p.extent_size, "throttle": asdict(p.throttle),
                "progress": asdict(pr), **{"state": pr.state}}

    async def pair_wait(self, pair: str, timeout: float | None = None) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.wait_job(p.id, timeout))
        return self.pair_show(p.id)

    # -- exports ----------------------------------------------------------------------------
    async def export_create(self, iqn: str, luns: dict[str, str] | None = None,
                            acl: list[str] | None = None, chap_user: str | None = None,
                            chap_secret: str | None = None, mutual_user: str | None = None,
                            mutual_secret: str | None = None, tpgt: int = 1) -> dict[str, Any]:
        if not IQN_RE.match(iqn or ""):
            raise ServiceError(f"{iqn!r} is not an iSCSI name (iqn.YYYY-MM.reverse.domain[:id])")
        if iqn in self.cfg.targets():
            raise ServiceError(f"target {iqn} already exists")
        t = self._validate_target(iqn, luns or {}, acl, chap_user, chap_secret,
                                  mutual_user, mutual_secret, tpgt)
        await self.frontend.set_target(iqn, t)
        self.cfg.put_target(iqn, t)
        return self.export_show(iqn)

    def _validate_target(self, iqn, luns, acl, chap_user, chap_secret, mutual_user,
                         mutual_secret, tpgt) -> dict[str, Any]:
        out_luns: dict[str, str] = {}
        for lun, vol in luns.items():
            try:
                n = int(lun)
            except (TypeError, ValueError):
                raise ServiceError(f"LUN {lun!r} is not a number") from None
            if not 0 <= n < 16384:
                raise ServiceError(f"LUN {n} outside 0..16383")
            if self.cfg.volume(vol) is None:
                raise ServiceError(f"no volume named {vol}")
            other = self._exported_in(vol)
            if other and other != iqn:
                raise ServiceError(f"volume {vol} is already exported by {other}")
            if vol in out_luns.values():
                raise ServiceError(f"volume {vol} given twice")
            out_luns[str(n)] = vol
        for a in acl or []:
            if not IQN_RE.match(a):
                raise ServiceError(f"ACL entry {a!r} is not an initiator iSCSI name")
        if bool(chap_user) != bool(chap_secret):
            raise ServiceError("CHAP needs both a user and a secret")
        if bool(mutual_user) != bool(mutual_secret):
            raise ServiceError("mutual CHAP needs both a user and a secret")
        if mutual_user and not chap_user:
            raise ServiceError("mutual CHAP needs CHAP as well")
        for s in (chap_secret, mutual_secret):
            if s and not 12 <= len(s) <= 255:
                raise ServiceError("CHAP secrets must be 12 to 255 characters (RFC 7143)")
        if chap_secret and mutual_secret and chap_secret == mutual_secret:
            raise ServiceError("the mutual CHAP secret must differ from the initiator's")
        if not 1 <= int(tpgt) <= 65535:
            raise ServiceError("tpgt must be 1..65535")
        return {"luns": out_luns, "acl": sorted(acl) if acl else None,
                "chap": [chap_user, chap_secret] if chap_user else None,
                "mutual_chap": [mutual_user, mutual_secret] if mutual_user else None,
                "tpgt": int(tpgt)}

    async def export_update(self, iqn: str, **changes: Any) -> dict[str, Any]:
        t = self.cfg.targets().get(iqn)
        if t is None:
            raise ServiceError(f"no target {iqn}")
        cur = {"luns": t["luns"], "acl": t.get("acl"), "tpgt": t.get("tpgt", 1),
               "chap_user": (t.get("chap") or [None, None])[0],
               "chap_secret": (t.get("chap") or [None, None])[1],
               "mutual_user": (t.get("mutual_chap") or [None, None])[0],
               "mutual_secret": (t.get("mutual_chap") or [None, None])[1]}
        for k, v in changes.items():
            if k not in cur:
                raise ServiceError(f"unknown export setting {k}")
            cur[k] = v
        new = self._validate_target(iqn, cur["luns"], cur["acl"], cur["chap_user"],
                                    cur["chap_secret"], cur["mutual_user"], cur["mutual_secret"],
                                    cur["tpgt"])
        if new == t:
            return self.export_show(iqn)
        await self.frontend.set_target(iqn, new)
        self.cfg.put_target(iqn, new)
        return self.export_show(iqn)

    def _target(self, iqn: str) -> dict[str, Any]:
        t = self.cfg.targets().get(iqn)
        if t is None:
            raise ServiceError(f"no target {iqn}")
        return t

    async def export_lun_add(self, iqn: str, volume: str, lun: Any = None) -> dict[str, Any]:
        """Map one more volume; without a LUN number, the lowest free one."""
        luns = dict(self._target(iqn)["luns"])
        if volume in luns.values():
            raise ServiceError(f"volume {volume} is already a LUN of {iqn}")
        if lun is None or lun == "":
            lun = next(n for n in range(16384) if str(n) not in luns)
        try:
            key = str(int(lun))
        except (TypeError, ValueError):
            raise ServiceError(f"LUN {lun!r} is not a number") from None
        if key in luns:
            raise ServiceError(f"LUN {key} of {iqn} is already {luns[key]}")
        luns[key] = volume
        return await self.export_update(iqn, luns=luns)

    async def export_lun_delete(self, iqn: str, lun: Any) -> dict[str, Any]:
        luns = dict(self._target(iqn)["luns"])
        key = str(lun).removeprefix("lun")
        if key not in luns:
            raise ServiceError(f"target {iqn} has no LUN {key}")
        del luns[key]
        return await self.export_update(iqn, luns=luns)

    async def export_acl_add(self, iqn: str, initiator: str) -> dict[str, Any]:
        acl = list(self._target(iqn).get("acl") or [])
        if initiator in acl:
            raise ServiceError(f"{initiator} is already in the ACL of {iqn}")
        return await self.export_update(iqn, acl=acl + [initiator])

    async def export_acl_delete(self, iqn: str, initiator: str) -> dict[str, Any]:
        acl = list(self._target(iqn).get("acl") or [])
        if initiator not in acl:
            raise ServiceError(f"{initiator} is not in the ACL of {iqn}")
        acl.remove(initiator)
        # An empty ACL means "any initiator": say so rather than surprise.
        res = await self.export_update(iqn, acl=acl or None)
        if not acl:
            res = {**res, "note": "the ACL is now empty: any initiator may log in"}
        return res

    async def export_delete(self, iqn: str) -> dict[str, Any]:
        if iqn not in self.cfg.targets():
            raise ServiceError(f"no target {iqn}")
        await self.frontend.remove_target(iqn, self.cfg.targets()[iqn])
        self.lunsets.pop(iqn, None)
        self.cfg.delete_target(iqn)
        return {"deleted": iqn}

    def export_show(self, iqn: str) -> dict[str, Any]:
        t = self.cfg.targets().get(iqn)
        if t is None:
            raise ServiceError(f"no target {iqn}")
        return {"iqn": iqn, "luns": t["luns"], "acl": t.get("acl"), "tpgt": t.get("tpgt", 1),
                "chap": {"user": t["chap"][0], "secret": SECRET} if t.get("chap") else None,
                "mutual_chap": {"user": t["mutual_chap"][0], "secret": SECRET}
                if t.get("mutual_chap") else None,
                "portals": [f"{h}:{p}" for h, p in self.portals()]}

    def export_list(self) -> list[dict[str, Any]]:
        return [self.export_show(iqn) for iqn in sorted(self.cfg.targets())]

    def portals(self) -> list[tuple[str, int]]:
        if self.frontend is not None and self.frontend.addresses():
            return self.frontend.addresses()
        return [tuple(p) for p in self.cfg.get("portals", [list(DEFAULT_PORTAL)])]

    async def portal_set(self, portals: list[str]) -> dict[str, Any]:
        parsed = []
        for text in portals:
            m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
            if not m:
                raise ServiceError(f"portal must be HOST:PORT or [IPv6]:PORT, not {text!r}")
            host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            if not 1 <= int(port) <= 65535:
                raise ServiceError(f"port {port} out of range")
            parsed.append([host, int(port)])
        self.cfg.set("portals", parsed)
        return {"portals": [f"{h}:{p}" for h, p in parsed],
                "note": "takes effect when the daemon restarts"}

    # -- status / config -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        stats = {"backend": self.backend,
                 **(self.frontend.stats() if self.frontend is not None else {})}
        return {"state_dir": self.state_dir, "uptime": time.time() - self.started_at,
                "portals": [f"{h}:{p}" for h, p in self.portals()],
                "volumes": self.volume_list(), "pairs": self.pair_list(),
                "exports": self.export_list(), "iscsi": stats}

    def saveconfig(self) -> dict[str, Any]:
        """Everything needed to rebuild this configuration (secrets included:
        keep the file private, like targetcli's saveconfig.json)."""
        return {"version": 1,
                "portals": self.cfg.get("portals", [list(DEFAULT_PORTAL)]),
                "volumes": [asdict(v) for v in self.cfg.volumes()],
                "pairs": [{"source": p.source, "clone": p.clone, "extent_size": p.extent_size,
                           "throttle": asdict(p.throttle)} for p in self.eng.pairs.values()],
                "targets": self.cfg.targets()}

    async def restoreconfig(self, config: dict[str, Any]) -> dict[str, Any]:
        """Create what the saved configuration has and this one lacks.

        Pairs come back fractured with every extent in the delta map: the
        saved file does not know what changed since, so the next sync or
        restore copies everything (never less than needed)."""
        if not isinstance(config, dict) or config.get("version") != 1:
            raise ServiceError("not a liverestore saveconfig (version 1) document")
        made: dict[str, list[str]] = {"volumes": [], "pairs": [], "targets": []}
        for v in config.get("volumes", []):
            if self.cfg.volume(v["name"]) is None:
                await self.volume_create(v["name"], v["path"], v["size"], v["extent_size"])
                made["volumes"].append(v["name"])
        have = {(p.source, p.clone) for p in self.eng.pairs.values()}
        for p in config.get("pairs", []):
            if (p["source"], p["clone"]) not in have:
                await self.pair_create(p["source"], p["clone"], p["extent_size"], sync=False,
                                       **p.get("throttle", {}))
                made["pairs"].append(p["clone"])
        for iqn, t in config.get("targets", {}).items():
            if iqn not in self.cfg.targets():
                chap = t.get("chap") or [None, None]
                mutual = t.get("mutual_chap") or [None, None]
                await self.export_create(iqn, t.get("luns"), t.get("acl"), chap[0], chap[1],
                                         mutual[0], mutual[1], t.get("tpgt", 1))
                made["targets"].append(iqn)
        if "portals" in config:
            self.cfg.set("portals", config["portals"])
        return {"created": made}

    # -- dispatch table for the control socket ------------------------------------------------
    OPS = {
        "volume.create": "volume_create", "volume.delete": "volume_delete",
        "volume.list": "volume_list", "volume.show": "volume_show",
        "pair.create": "pair_create", "pair.fracture": "pair_fracture", "pair.sync": "pair_sync",
        "pair.restore": "pair_restore", "pair.pause": "pair_pause", "pair.resume": "pair_resume",
        "pair.throttle": "pair_throttle", "pair.delete": "pair_delete", "pair.list": "pair_list",
        "pair.show": "pair_show", "pair.wait": "pair_wait",
        "export.create": "export_create", "export.update": "export_update",
        "export.delete": "export_delete", "export.list": "export_list",
        "export.show": "export_show", "portal.set": "portal_set",
        "export.lun.add": "export_lun_add", "export.lun.delete": "export_lun_delete",
        "export.acl.add": "export_acl_add", "export.acl.delete": "export_acl_delete",
        "status": "status", "saveconfig": "saveconfig", "restoreconfig": "restoreconfig",
    }

    async def call(self, op: str, args: dict[str, Any]) -> Any:
        name = self.OPS.get(op)
        if name is None:
            raise ServiceError(f"unknown operation {op!r}")
        fn = getattr(self, name)
        try:
            res = fn(**args)
        except TypeError as e:
            raise ServiceError(f"{op}: bad arguments: {e}") from e
        if asyncio.iscoroutine(res):
            res = await res
        return res
