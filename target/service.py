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
from fractions import Fraction
from dataclasses import asdict
from typing import Any

from persistence.config import (ConfigStore, SqliteReservationStore, StoredValueError,
                                VolumeRecord)
from persistence.db import Database, DatabaseError
from persistence.group_store import SqliteGroupStore
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.blockstore import BlockStore, BlockStoreError
from restore_core.stores import open_store
from restore_core.stores.file import FileBlockStore
from restore_core.stores.missing import MissingBlockStore
from restore_core.stores.owners import forget_owner, read_owner, write_owner
from restore_core.stores.rbd import RbdStore, remove_image
from restore_core.stores.spec import RBD_KIND, FileSpec, RbdSpec, SpecError, StoreSpec, spec_of_record
from restore_core.stores.undo_images import StoreUndoImages
from restore_core.engine import NAME_HELP, Engine, EngineError, valid_volume_name
from restore_core.extentmap import DEFAULT_EXTENT_SIZE
from restore_core.groups import Groups
from restore_core.pair import Pair
from restore_core.throttle import KNOB, RETIRED_THROTTLE_KNOBS, Throttle

from .arguments import ArgumentError, Signature
from .configdoc import (CONFIG_VERSION, LUN_LIMIT, SECRET_MAX, SECRET_MIN, TPGT_MAX, TPGT_MIN, InvalidConfig,
                        check_document, check_setting, check_target)
from .errors import ServiceError, clip
from .fmt import SECRET, human, plural
from .iscsi.budget import DEFAULT_MEMORY_LIMIT, MIN_MEMORY_LIMIT
from .group_ops import GROUP_OPS, GroupOps
from .frontends import EmbeddedFrontend, Frontend, LioFrontend, choose_backend
from .iscsi.names import ISCSI_NAME_HELP, valid_chap_name, valid_iscsi_name
from .iscsi.server import IscsiTargetConfig
from .pairjournal import PairJournal
from .peer import Peer, PeerDenied, Probe, probe_as
from .portals import DEFAULT_PORTAL, PortalError, format_portal, loopback_only, parse_portals
from .scsi import DeviceIdentity, LunSet, ScsiDevice
from .statelock import StateDirBusy, StateLock

log = logging.getLogger(__name__)



DB_NAME = "liverestore.db"
VOLUMES_DIR = "volumes"     # the daemon's own image directory inside the state dir
UNDO_DIR = "undo"           # undo images of keep-undo restores (file sources)
RBD_OWNERS_DIR = "rbd-owners"   # per RBD volume: the lock owner id of this daemon's client


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


#: A size as the control API takes it: bytes, or text such as "512M" or "10G".
Size = int | str


def _size(text: Size) -> int:
    if isinstance(text, bool):
        raise ServiceError(f"bad size {text!r}: use a number of bytes or e.g. 512M, 10G, 2T")
    if isinstance(text, int):
        return text
    # Also what the CLI prints ("1.5 GiB"): a decimal number of binary units.
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise ServiceError(f"bad size {text!r}: use a number of bytes or e.g. 512M, 1.5G, 2T")
    n = Fraction(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                "T": 1 << 40, "P": 1 << 50}[m.group(2).upper()]
    if n.denominator != 1:
        raise ServiceError(f"size {text!r} is not a whole number of bytes")
    return int(n)


def _volume_size(text: Size) -> int:
    """A volume's size: whole 512-byte blocks, more than none."""
    n = _size(text)
    if n <= 0 or n % 512:
        raise ServiceError("size must be a positive multiple of 512 bytes")
    return n


def _memory_limit(text: Size | None) -> int:
    """serve --memory-limit: the RSS bound the embedded iSCSI target budgets for."""
    if text is None:
        return DEFAULT_MEMORY_LIMIT
    n = _size(text)
    if n < MIN_MEMORY_LIMIT:
        raise ServiceError(f"memory limit {text} is too small: at least {MIN_MEMORY_LIMIT >> 20}M")
    return n


def _why(path: str, e: Exception) -> str:
    """One line for a failed open of an image (BlockStoreError names the path)."""
    if isinstance(e, OSError):
        return f"cannot open {path}: {e.strerror or e}"
    return str(e)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _undo_where(undo: dict[str, Any] | None) -> str | None:
    """Where a pair's undo image is, for pair show: a volume or an image."""
    if undo is None:
        return None
    if "volume" in undo:
        return f"volume {undo['volume']}"
    image = undo.get("image") or {}
    return str(image.get("path", image))


def _throttle_knobs(knobs: dict[str, Any]) -> dict[str, int]:
    unknown = set(knobs) - set(KNOB)
    if unknown:
        raise ServiceError(f"unknown throttle setting(s): {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(KNOB)}")
    out: dict[str, int] = {}
    for k, v in knobs.items():
        if v is None:
            continue
        if KNOB[k].size:
            out[k] = _size(v)
            continue
        try:
            out[k] = int(v)
        except (TypeError, ValueError):
            raise ServiceError(f"throttle {k} must be a whole number, not {v!r}") from None
    return out


def _identity(name: str, created_at: float) -> DeviceIdentity:
    h = hashlib.sha256(f"{name}\0{created_at!r}".encode()).hexdigest()
    # NAA-6 with the Linux-IO OUI (001405) as LIO does, so hosts treat the
    # LU like any LIO disk; the rest is stable per volume.
    return DeviceIdentity(product_id="liverestore", revision="0001", serial=h[:24],
                          naa="6001405" + h[:25], t10_vendor_id=h[:32])


class _Undo:
    """Steps that take back what a multi-step operation did, run newest first."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Any]] = []

    def add(self, what: str, step: Any) -> None:
        self._steps.append((what, step))

    async def run(self) -> list[str]:
        """Run every step; return the ones that failed, each as one line."""
        failed = []
        for what, step in reversed(self._steps):
            try:
                res = step()
                if asyncio.iscoroutine(res):
                    await res
            except Exception as e:  # noqa: BLE001 - undo the rest, then report
                log.error("undo %s failed: %s", what, e)
                failed.append(f"{what}: {e}")
        self._steps.clear()
        return failed


class Service(GroupOps):
    def __init__(self, state_dir: str, *, init: bool = False,
                 portals: list[tuple[str, int]] | None = None, backend: str = "auto",
                 volume_dirs: list[str] | None = None,
                 memory_limit: Size | None = None) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.memory_limit = _memory_limit(memory_limit)
        # Where a non-root peer may put or adopt images (serve --volume-dir).
        self._volume_dirs_given = list(volume_dirs or [])
        self.volume_dirs: list[str] = []
        self.lock = StateLock(self.state_dir)
        try:
            self.backend = choose_backend(backend)
        except ValueError as e:
            raise ServiceError(str(e)) from e
        self._init = init
        self._portals_override = portals
        self._started_portals: list[tuple[str, int]] = []     # what the front end was given
        self.db: Database | None = None
        self.config: ConfigStore | None = None
        self.engine: Engine | None = None
        self.groups: Groups | None = None
        self.devices: dict[str, Any] = {}        # volume -> ScsiDevice
        self.lunsets: dict[str, Any] = {}        # target iqn -> LunSet
        self.unserved: dict[str, str] = {}       # stored target iqn -> why it is not served
        self.frontend: Frontend | None = None
        self.journal: PairJournal | None = None
        self.started_at = time.time()

    # -- start / stop --------------------------------------------------------------
    async def start(self) -> None:
        self._lock_state_dir()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    def _lock_state_dir(self) -> None:
        """Take the state directory's lock before any other side effect (only
        --init on a missing directory creates it first: the lock lives in it)."""
        if not os.path.isdir(self.state_dir):
            if not self._init:
                raise ServiceError(f"state directory {self.state_dir} does not exist; "
                                   "start with --init to create it")
            try:
                os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ServiceError(f"cannot create {self.state_dir}: {e.strerror or e}") from e
        try:
            self.lock.acquire()
        except StateDirBusy as e:
            raise ServiceError(str(e)) from None
        except OSError as e:
            raise ServiceError(f"cannot lock {self.lock.path}: {e.strerror or e}") from e

    def _check_volume_dirs(self) -> None:
        dirs = self._volume_dirs_given or [os.path.join(self.state_dir, VOLUMES_DIR)]
        out = []
        for d in dirs:
            real = os.path.realpath(os.path.abspath(d))
            if self._volume_dirs_given and not os.path.isdir(real):
                raise ServiceError(f"volume directory {d} is not a directory")
            out.append(real)
        self.volume_dirs = out

    async def _start(self) -> None:
        self._check_volume_dirs()
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
        self.engine = Engine(SqliteMetadataStore(self.db),
                             StoreUndoImages(os.path.join(self.state_dir, UNDO_DIR)))
        for rec in self.config.volumes():
            if not valid_volume_name(rec.name):
                # Stored by an older version that let it through: say which
                # row, in one line, rather than fail deep in the engine.
                raise ServiceError(f"stored volume {clip(rec.name)} has a name this version "
                                   f"refuses ({NAME_HELP}); delete that row from the volumes "
                                   f"table of {path} or rename it there")
            store, offline = self._open_recorded(rec)
            self.engine.add_volume(rec.name, store, offline)
            self._make_device(rec)
        try:
            await self.engine.start()
            self.groups = Groups(self.engine, SqliteGroupStore(self.db))
            await self.groups.load()
        except (EngineError, DatabaseError) as e:
            raise ServiceError(str(e)) from e
        self.journal = PairJournal(self.engine, self.config)
        portals = self._portals_override or self._stored_portals()
        kind = LioFrontend if self.backend == "lio" else EmbeddedFrontend
        self.frontend = kind(self, portals)
        await self.frontend.start(self._servable_targets())
        self._started_portals = portals
        if self._portals_override:
            # One source of truth: the stored setting is what the daemon
            # serves, so saveconfig, status and the next start without
            # --portal agree with it (stored once the portals are bound).
            self.cfg.set("portals", [list(p) for p in self._portals_override])
        log.info("front end: %s", self.backend)

    def _open_recorded(self, rec: VolumeRecord) -> tuple[BlockStore, str | None]:
        """A recorded volume's image (its kind and path read back as a store
        spec), or a stand-in and the reason it is offline: one bad image
        must not keep the others from being served."""
        try:
            store = open_store(spec_of_record(rec.kind, rec.path), rec.size,
                               stale_owner=self._last_owner(rec.name))
        except (OSError, BlockStoreError, SpecError) as e:
            why = _why(rec.path, e)
        else:
            self._watch_fencing(rec.name, store)
            return store, None
        how = "--rbd POOL/IMAGE" if rec.kind == RBD_KIND else "--path P"
        log.error("volume %s is offline: %s (relink it with 'volume relink %s %s', "
                  "or delete it)", rec.name, why, rec.name, how)
        return MissingBlockStore(rec.path, rec.size, why, rec.kind), why

    def _watch_fencing(self, name: str, store: BlockStore) -> None:
        """A store another client can fence (RBD) takes its volume offline
        the moment it is fenced, not at the next image check; its lock
        owner id is recorded so that the next run, after a crash, can
        break the lock it left (only that one: the state directory lock
        says no other run of this daemon is alive)."""
        if isinstance(store, RbdStore):
            store.on_fenced = lambda why: self.eng.set_offline(name, why)
            if store.owner is not None:
                write_owner(self._owner_file(name), store.owner)

    def _owner_file(self, volume: str) -> str:
        return os.path.join(self.state_dir, RBD_OWNERS_DIR, volume)

    def _last_owner(self, volume: str) -> str | None:
        return read_owner(self._owner_file(volume))

    async def stop(self) -> None:
        """Graceful: stop accepting, drain commands, stop copiers, flush,
        persist, drop the locks. Also undoes a start that failed half way:
        it closes only what was opened."""
        if self.frontend is not None:
            try:
                await self.frontend.stop()
            except Exception:  # noqa: BLE001
                log.exception("%s front end stop failed", self.backend)
        if self.engine is not None:
            if self.engine.started:
                await self.engine.close()
            for vol in self.engine.volumes.values():
                vol.store.close()       # drops the image locks
        if self.db is not None:
            self.db.close()
        self.lock.release()

    # -- helpers -------------------------------------------------------------------------
    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    @property
    def cfg(self) -> ConfigStore:
        assert self.config is not None
        return self.config

    def _make_device(self, rec: VolumeRecord) -> ScsiDevice:
        dev = ScsiDevice(self.eng.volume_io(rec.name),
                         _identity(rec.name, rec.created_at),
                         reservations=SqliteReservationStore(self.cfg, rec.name))
        self.devices[rec.name] = dev
        return dev

    def _servable_targets(self) -> dict[str, dict[str, Any]]:
        """The stored targets that can be served, each checked as it is
        loaded. A bad one (e.g. a name an older version accepted with a
        trailing newline) is left out with one error line naming it, and
        the others start: one bad entry must not stop every LUN."""
        try:
            targets = self.cfg.targets()
        except StoredValueError as e:
            raise ServiceError(f"{e}; the database was changed outside liverestore") from None
        good: dict[str, dict[str, Any]] = {}
        for iqn, t in targets.items():
            try:
                check_target(iqn, t)
                missing = [v for v in t["luns"].values() if v not in self.devices]
                if missing:
                    raise InvalidConfig(f"target {iqn}: no volume {', '.join(missing)}")
            except InvalidConfig as e:
                self.unserved[iqn] = str(e)
                log.error("not serving %s; remove it with 'liverestore export delete'", e)
                continue
            good[iqn] = t
        return good

    def _exported_in(self, volume: str) -> str | None:
        for iqn, t in self.cfg.targets().items():
            luns = t.get("luns") if isinstance(t, dict) else None   # unserved ones may be odd
            if isinstance(luns, dict) and volume in luns.values():
                return iqn
        return None

    def target_config(self, iqn: str, t: dict[str, Any]) -> IscsiTargetConfig:
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
    async def volume_create(self, name: str, path: str | None = None, size: Size | None = None,
                            extent_size: Size = DEFAULT_EXTENT_SIZE, *,
                            rbd: str | None = None, ceph_conf: str | None = None,
                            ceph_id: str | None = None,
                            peer: Peer | None = None) -> dict[str, Any]:
        """A new image file of ``size``, or an existing file / block device
        adopted exactly as it is (its size is the volume's; never changed).
        With ``rbd`` (POOL/IMAGE): a Ceph RBD image, created when a size is
        given and it does not exist, else adopted at its own size."""
        if not valid_volume_name(name):
            raise ServiceError(f"invalid volume name {name!r}: {NAME_HELP}")
        if self.cfg.volume(name) is not None:
            raise ServiceError(f"volume {name} already exists")
        es = _size(extent_size)
        if es < 4096 or es & (es - 1) or es > 64 << 20:
            raise ServiceError("extent size must be a power of two from 4K to 64M")
        want = _volume_size(size) if size not in (None, "") else None
        if rbd not in (None, ""):
            if path not in (None, ""):
                raise ServiceError("give either a path or an RBD image, not both")
            spec = self._rbd_spec(rbd, ceph_conf, ceph_id, peer, name)
            store = await self._open_rbd(name, spec, want, create=True)
            return await self._add_volume(name, spec, store, es)
        if ceph_conf not in (None, "") or ceph_id not in (None, ""):
            raise ServiceError("--ceph-conf and --ceph-id go with an RBD image (--rbd POOL/IMAGE)")
        if path in (None, ""):
            # The daemon's own choice of a new file: no peer path to check.
            vdir = os.path.join(self.state_dir, VOLUMES_DIR)
            os.makedirs(vdir, mode=0o700, exist_ok=True)
            path = os.path.join(vdir, f"{name}.img")
            if os.path.lexists(path):
                raise ServiceError(f"{path} is still there (left by a deleted volume?): adopt it "
                                   f"with 'volume create {name} --path {path}', or remove it")
            if want is None:
                raise ServiceError(f"{path} does not exist: give a size to create it")
            real, probe = self._vet_path(path, None), None
        else:
            real = self._vet_path(path, peer)
            probe = await self._probe(peer, real)
        store = self._open_image(real, want, probe, create=True)
        return await self._add_volume(name, FileSpec(real), store, es)

    async def _add_volume(self, name: str, spec: StoreSpec, store: BlockStore,
                          extent_size: int) -> dict[str, Any]:
        """Record and serve a volume on a store just opened (or made) for it;
        on failure the store is abandoned (what it created is removed)."""
        rec = VolumeRecord(name, spec.location, store.size, extent_size, store.kind, time.time())
        try:
            self.eng.add_volume(name, store)
        except EngineError as e:
            store.abandon()
            raise self._wrap(e) from e
        try:
            self.cfg.put_volume(rec)
        except BaseException:
            self.eng.remove_volume(name)
            store.abandon()
            raise
        self._watch_fencing(name, store)
        self._make_device(rec)
        return self.volume_show(name)

    def _rbd_spec(self, image: Any, conf: Any, client_id: Any, peer: Peer | None,
                  volume: str) -> RbdSpec:
        """An RBD image a client names, checked: root only (the daemon's
        Ceph credentials reach every image its client may), and never
        another volume's image."""
        if peer is not None and not peer.is_root:
            raise ServiceError("only root may use RBD images (the daemon's Ceph client "
                               "can reach images the caller could not)")
        try:
            spec = RbdSpec.parse_image(image, conf, client_id)
        except SpecError as e:
            raise ServiceError(str(e)) from None
        for other in self.cfg.volumes():
            if other.name != volume and other.kind == RBD_KIND:
                try:
                    theirs = spec_of_record(other.kind, other.path)
                except SpecError:
                    continue
                if isinstance(theirs, RbdSpec) and theirs.image_name == spec.image_name \
                        and theirs.conf == spec.conf:
                    raise ServiceError(f"RBD image {spec.image_name} is the image of volume "
                                       f"{other.name}")
        return spec

    async def _open_rbd(self, volume: str, spec: RbdSpec, want: int | None, *,
                        create: bool) -> BlockStore:
        """Open (or make) an RBD image off the loop: connecting waits on the
        cluster, up to its timeouts."""
        try:
            stale = self._last_owner(volume)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: open_store(spec, want, create=create, stale_owner=stale))
        except (OSError, BlockStoreError) as e:
            raise ServiceError(str(e)) from e

    def _vet_path(self, path: Any, peer: Peer | None, volume: str | None = None) -> str:
        """The real path of an image a client names, or ServiceError: never
        the state directory or anything in it (the database!) but the
        daemon's image directory, never another volume's image (by real
        path or inode: symlinks and hard links count), for a non-root peer
        only inside the volume directories."""
        if not isinstance(path, str) or not path:
            raise ServiceError("path must be a non-empty string")
        if not os.path.isabs(path):
            raise ServiceError(f"path {path!r} is relative; the daemon cannot know the client's "
                               "working directory: give an absolute path")
        real = os.path.realpath(path)
        ino = _inode(real)
        state = os.path.realpath(self.state_dir)
        if _inside(real, state) and not _inside(real, os.path.join(state, VOLUMES_DIR)) or (
                real == os.path.join(state, VOLUMES_DIR)):
            raise ServiceError(f"{path} is the daemon's state directory or in it; "
                               "images live elsewhere (or in its volumes/ directory)")
        if ino is not None:
            with os.scandir(state) as it:
                for entry in it:
                    if _inode(entry.path) == ino:
                        raise ServiceError(f"{path} is {entry.path} of the daemon's state "
                                           "directory (a link to it); refused")
        for other in self.cfg.volumes():
            if other.name == volume or other.kind == RBD_KIND:
                continue
            vol = self.eng.volumes.get(other.name)
            theirs = getattr(vol.store, "identity", None) if vol is not None else None
            if os.path.realpath(other.path) == real or (
                    ino is not None and ino in (theirs, _inode(other.path))):
                raise ServiceError(f"{path} is the image of volume {other.name}")
        if peer is not None and not peer.is_root:
            if not any(_inside(real, d) for d in self.volume_dirs):
                raise ServiceError(f"{path} is outside the volume directories "
                                   f"({', '.join(self.volume_dirs)}); only root may use "
                                   "other paths")
        return real

    async def _probe(self, peer: Peer | None, real: str) -> Probe | None:
        """For a non-root peer: what it could open read-write itself (or
        create), else ServiceError; None when no check applies (root)."""
        if peer is None or peer.is_root:
            return None
        try:
            # off the loop: the child's open may wait on a slow file system
            return await asyncio.get_running_loop().run_in_executor(None, probe_as, peer, real)
        except PeerDenied as e:
            raise ServiceError(str(e)) from None

    def _open_image(self, real: str, want: int | None, probe: Probe | None, *,
                    create: bool) -> FileBlockStore:
        """Open (or, with ``create``, make) an image: an existing one keeps
        its size and contents (``want`` must match); the inode must be the
        one the peer's check saw (or, if it saw none, one made here)."""
        exists = os.path.lexists(real)
        if exists:
            try:
                st = os.stat(real)
            except OSError as e:
                raise ServiceError(f"cannot use {real}: {e.strerror or e}") from e
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                raise ServiceError(f"{real} is empty: remove it and give a size to create a new "
                                   "image, or grow it first (e.g. truncate -s)")
            if stat.S_ISREG(st.st_mode) and want is not None and want != st.st_size:
                raise ServiceError(f"{real} has {st.st_size} bytes, not {want}: an existing image "
                                   "is adopted as it is (leave out the size); grow it with "
                                   "'volume resize' once it is a volume")
        elif not create:
            raise ServiceError(f"{real} does not exist")
        elif want is None:
            raise ServiceError(f"{real} does not exist: give a size to create it")
        try:
            store = open_store(FileSpec(real), want, create=create and not exists)
        except (OSError, BlockStoreError) as e:
            raise ServiceError(_why(real, e)) from e
        assert isinstance(store, FileBlockStore)
        if probe is not None and (store.identity != probe.inode if probe.inode is not None
                                  else not store.created):
            store.abandon()
            raise ServiceError(f"{real} changed while it was being checked; try again")
        return store

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
        await self.eng.forget_instants(store)      # the image left in place keeps none
        store.close()
        self.devices.pop(name, None)
        self.cfg.delete_volume(name)
        forget_owner(self._owner_file(name))
        return {"deleted": name, "path": rec.path, "note": "the image was left in place"}

    async def volume_resize(self, name: str, size: Size) -> dict[str, Any]:
        """Grow a volume (never shrink): the image file is extended; a block
        device must have been grown first. Hosts see CAPACITY DATA HAS CHANGED."""
        rec = self.cfg.volume(name)
        if rec is None:
            raise ServiceError(f"no volume named {name}")
        vol = self.eng.volumes[name]
        if vol.offline is not None:
            raise ServiceError(f"volume {name} is offline ({vol.offline}); relink it first")
        if vol.as_source or vol.as_clone is not None:
            raise ServiceError(f"volume {name} is in a pair, whose size is fixed; "
                               "delete the pair first")
        want = _volume_size(size)
        if want < rec.size:
            raise ServiceError(f"volume {name} has {rec.size} bytes; resize only grows "
                               "(shrinking would cut off its data)")
        if want == rec.size:
            return self.volume_show(name)
        store = vol.store
        try:
            store.grow(want)
        except (OSError, BlockStoreError) as e:
            raise ServiceError(_why(rec.path, e)) from e
        dev = self.devices.get(name)
        if dev is not None:
            dev.lunio_changed()         # hosts see the new capacity's UA from now on
        rec.size = want
        self.cfg.put_volume(rec)
        return self.volume_show(name)

    async def volume_relink(self, name: str, path: str | None = None, *,
                            rbd: str | None = None, ceph_conf: str | None = None,
                            ceph_id: str | None = None,
                            peer: Peer | None = None) -> dict[str, Any]:
        """Point an offline volume at its image's new place: same size, same
        rules as adopting; the jobs of its pairs resume. An RBD volume
        (fenced, or its cluster was down at start) is reopened with a new
        client: at ``rbd`` if given, else where it was."""
        rec = self.cfg.volume(name)
        if rec is None:
            raise ServiceError(f"no volume named {name}")
        if self.eng.volumes[name].offline is None:
            raise ServiceError(f"volume {name} is online; only an offline volume can be relinked")
        if rbd in (None, "") and path in (None, "") and rec.kind == RBD_KIND:
            old_spec = spec_of_record(rec.kind, rec.path)
            assert isinstance(old_spec, RbdSpec)
            rbd, ceph_conf, ceph_id = old_spec.image_name, old_spec.conf, old_spec.client_id
        if rbd not in (None, ""):
            if path not in (None, ""):
                raise ServiceError("give either a path or an RBD image, not both")
            spec = self._rbd_spec(rbd, ceph_conf, ceph_id, peer, name)
            store = await self._open_rbd(name, spec, rec.size, create=False)
            return await self._relink(rec, spec, store)
        if path in (None, ""):
            raise ServiceError("give the image's new place: --path P (or --rbd POOL/IMAGE)")
        real = self._vet_path(path, peer, volume=name)
        probe = await self._probe(peer, real)
        have = os.stat(real).st_size if os.path.isfile(real) else None
        if have is not None and have != rec.size:
            raise ServiceError(f"{real} has {have} bytes; volume {name} has {rec.size}: "
                               "relink needs its image (the same size)")
        store = self._open_image(real, rec.size, probe, create=False)
        return await self._relink(rec, FileSpec(real), store)

    async def _relink(self, rec: VolumeRecord, spec: StoreSpec, store: BlockStore) -> dict[str, Any]:
        try:
            old = await self.eng.relink(rec.name, store)
        except EngineError as e:
            store.close()
            raise self._wrap(e) from e
        old.close()
        self._watch_fencing(rec.name, store)
        rec.path = spec.location
        rec.kind = store.kind
        self.cfg.put_volume(rec)
        return self.volume_show(rec.name)

    def volume_list(self) -> list[dict[str, Any]]:
        return [self.volume_show(v.name) for v in self.cfg.volumes()]

    def volume_show(self, name: str) -> dict[str, Any]:
        rec = self.cfg.volume(name)
        if rec is None:
            raise ServiceError(f"no volume named {name}")
        st = self.eng.volume_io(name).access_state()
        vol = self.eng.volumes[name]
        role = "clone" if vol.as_clone else ("source" if vol.as_source else "standalone")
        return {**asdict(rec), "role": role, "access": st.access.value, "access_reason": st.reason,
                "offline": vol.offline, "undo_of": vol.undo_of,
                "exported_by": self._exported_in(name),
                "pairs": [p.id for p in vol.as_source] + ([vol.as_clone.id] if vol.as_clone else []),
                # snapshots the daemon keeps on this image (they hold space)
                "snapshots": [p.instants[side] for p in (*vol.as_source, vol.as_clone)
                              if p is not None for side in ("source", "clone")
                              if getattr(p, side) == name and side in p.instants]}

    # -- pairs ------------------------------------------------------------------------------
    async def pair_create(self, source: str, clone: str, extent_size: Size | None = None,
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
            if pair not in self.eng.pairs:
                ofsrc = sorted(p.id for p in self.eng.pairs.values() if p.source == pair)
                if ofsrc:
                    # The common slip: naming the source; pairs go by their clone.
                    raise ServiceError(f"no pair {pair!r} (a pair is named by its clone); "
                                       f"pairs of {pair}: {', '.join(ofsrc)}")
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

    async def pair_restore(self, pair: str, protected: bool = True, keep_undo: bool = False,
                           undo_volume: str | None = None) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.restore(p.id, protected=protected, keep_undo=keep_undo,
                                        undo_volume=undo_volume))
        return self.pair_show(p.id)

    async def pair_abort(self, pair: str) -> dict[str, Any]:
        """Undo a keep-undo restore (running, or finished and not committed)."""
        p = self._pair(pair)
        await self._do(self.eng.abort(p.id))
        return self.pair_show(p.id)

    async def pair_commit(self, pair: str) -> dict[str, Any]:
        """Keep a keep-undo restore: its undo image is discarded."""
        p = self._pair(pair)
        await self._do(self.eng.commit_undo(p.id))
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
                "progress": asdict(pr), **{"state": pr.state},
                "damaged": p.damaged, "held": p.hold, "group": self.grp.group_of(p.id),
                "undo_image": _undo_where(p.undo), "snapshots": dict(p.instants),
                "offline": "; ".join(self.eng.offline_reasons(p)) or None,
                "history": self.journal.note(p.id) if self.journal is not None else None}

    async def pair_acknowledge(self, pair: str) -> dict[str, Any]:
        """Accept a held pair (rolled-back database, damaged record): it
        serves again, fractured, with every extent marked as differing."""
        p = self._pair(pair)
        try:
            reason = await self.eng.acknowledge(p.id)
        except EngineError as e:
            raise self._wrap(e) from e
        return {**self.pair_show(p.id), "message": (
            f"pair {p.id} was held because {reason}. Its metadata could no longer say which "
            f"extents differ, so now every extent does: the pair is fractured and both "
            f"volumes serve again. The next sync (source -> clone) or restore (clone -> "
            f"source) copies all {plural(p.nextents, 'extent')}, {human(p.size)} "
            f"({p.size} bytes).")}

    async def pair_wait(self, pair: str, timeout: float | None = None) -> dict[str, Any]:
        p = self._pair(pair)
        await self._do(self.eng.wait_job(p.id, timeout))
        return self.pair_show(p.id)

    # -- exports ----------------------------------------------------------------------------
    async def export_create(self, iqn: str, luns: dict[str, str] | None = None,
                            acl: list[str] | None = None, chap_user: str | None = None,
                            chap_secret: str | None = None, mutual_user: str | None = None,
                            mutual_secret: str | None = None, tpgt: int = 1) -> dict[str, Any]:
        if not valid_iscsi_name(iqn):
            raise ServiceError(f"{iqn!r} is not an iSCSI name ({ISCSI_NAME_HELP})")
        if iqn in self.cfg.targets():
            raise ServiceError(f"target {iqn} already exists")
        t = self._validate_target(iqn, luns or {}, acl, chap_user, chap_secret,
                                  mutual_user, mutual_secret, tpgt)
        await self.frontend.set_target(iqn, t)
        self.cfg.put_target(iqn, t)
        return self._with_exposure(self.export_show(iqn))

    def _with_exposure(self, e: dict[str, Any]) -> dict[str, Any]:
        """An export any initiator on the network may use, with no ACL and no
        CHAP, gets a warning every client shows loudly."""
        if e.get("acl") or e.get("chap") or loopback_only(self.portals()):
            return e
        portals = ", ".join(format_portal(p) for p in self.portals())
        return {**e, "warning": f"target {e['iqn']} is open to ANY initiator that can reach "
                f"{portals}: it has no ACL and no CHAP; add one with 'export acl add' or "
                "'export auth'"}

    def _validate_target(self, iqn: str, luns: Any, acl: Any, chap_user: Any, chap_secret: Any,
                         mutual_user: Any, mutual_secret: Any, tpgt: Any) -> dict[str, Any]:
        """The one check of a target's settings (export create/update and
        restoreconfig): types first, since export.update takes any keys,
        then names, limits and the volumes they refer to."""
        if not isinstance(luns, dict):
            raise ServiceError("luns must be an object of LUN number -> volume name")
        out_luns: dict[str, str] = {}
        for lun, vol in luns.items():
            try:
                n = int(lun)
            except (TypeError, ValueError):
                raise ServiceError(f"LUN {clip(lun, 40)} is not a number") from None
            if not 0 <= n < LUN_LIMIT:
                raise ServiceError(f"LUN {n} outside 0..{LUN_LIMIT - 1}")
            if not isinstance(vol, str) or self.cfg.volume(vol) is None:
                raise ServiceError(f"no volume named {clip(vol, 80)}")
            other = self._exported_in(vol)
            if other and other != iqn:
                raise ServiceError(f"volume {vol} is already exported by {other}")
            if vol in out_luns.values():
                raise ServiceError(f"volume {vol} given twice")
            out_luns[str(n)] = vol
        if acl is not None and not isinstance(acl, list):
            raise ServiceError("acl must be a list of initiator iSCSI names")
        for a in acl or []:
            if not valid_iscsi_name(a):
                raise ServiceError(f"ACL entry {clip(a, 80)} is not an initiator iSCSI name "
                                   f"({ISCSI_NAME_HELP})")
        for what, v in (("CHAP user", chap_user), ("CHAP secret", chap_secret),
                        ("mutual CHAP user", mutual_user), ("mutual CHAP secret", mutual_secret)):
            if v is not None and not isinstance(v, str):
                raise ServiceError(f"{what} must be text")
        if bool(chap_user) != bool(chap_secret):
            raise ServiceError("CHAP needs both a user and a secret")
        if bool(mutual_user) != bool(mutual_secret):
            raise ServiceError("mutual CHAP needs both a user and a secret")
        if mutual_user and not chap_user:
            raise ServiceError("mutual CHAP needs CHAP as well")
        for u in (chap_user, mutual_user):
            if u and not valid_chap_name(u):
                raise ServiceError(f"CHAP user {clip(u, 80)} must be 1-255 bytes of printable text")
        for sec in (chap_secret, mutual_secret):
            if sec and not SECRET_MIN <= len(sec) <= SECRET_MAX:
                raise ServiceError(f"CHAP secrets must be {SECRET_MIN} to {SECRET_MAX} "
                                   "characters (RFC 7143)")
            if sec and not sec.isprintable():
                raise ServiceError("CHAP secrets must be printable text")
        if chap_secret and mutual_secret and chap_secret == mutual_secret:
            raise ServiceError("the mutual CHAP secret must differ from the initiator's")
        if isinstance(tpgt, bool) or not isinstance(tpgt, int) or not TPGT_MIN <= tpgt <= TPGT_MAX:
            raise ServiceError(f"tpgt must be {TPGT_MIN}..{TPGT_MAX}")
        return {"luns": out_luns, "acl": sorted(set(acl)) if acl else None,
                "chap": [chap_user, chap_secret] if chap_user else None,
                "mutual_chap": [mutual_user, mutual_secret] if mutual_user else None,
                "tpgt": tpgt}

    async def export_update(self, iqn: str, **changes: Any) -> dict[str, Any]:
        t = self._target(iqn)
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
            return self._with_exposure(self.export_show(iqn))
        await self.frontend.set_target(iqn, new)
        self.cfg.put_target(iqn, new)
        return self._with_exposure(self.export_show(iqn))

    def _target(self, iqn: str) -> dict[str, Any]:
        """A target that may be changed: stored and served."""
        t = self.cfg.targets().get(iqn)
        if t is None:
            raise ServiceError(f"no target {iqn}")
        if iqn in self.unserved:
            raise ServiceError(f"not serving {self.unserved[iqn]}; only 'export delete' "
                               "works on it")
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

    def _logged_in(self, iqn: str) -> list[dict[str, Any]]:
        return list(self.frontend.sessions().get(iqn, [])) if self.frontend is not None else []

    async def export_delete(self, iqn: str, force: bool = False) -> dict[str, Any]:
        """Remove a target. Refused while initiators are logged in (they
        would lose their disks mid-I/O, maybe during a restore) unless
        ``force``."""
        if iqn not in self.cfg.targets():
            raise ServiceError(f"no target {iqn}")
        logged = self._logged_in(iqn)
        if logged and not force:
            names = ", ".join(sorted({s["initiator"] for s in logged}))
            raise ServiceError(f"target {iqn} has {plural(len(logged), 'logged-in session')} "
                               f"({names}); deleting it cuts them off: log them out first, "
                               "or delete with force")
        if iqn not in self.unserved:       # an unserved one never reached the front end
            await self.frontend.remove_target(iqn, self.cfg.targets()[iqn])
        self.lunsets.pop(iqn, None)
        self.cfg.delete_target(iqn)
        self.unserved.pop(iqn, None)
        return {"deleted": iqn, "cut_off": logged}

    def export_show(self, iqn: str) -> dict[str, Any]:
        t = self.cfg.targets().get(iqn)
        if t is None:
            raise ServiceError(f"no target {iqn}")
        if iqn in self.unserved:
            # Loaded but not served: say why, and show nothing of a value
            # that failed its check.
            return {"iqn": iqn, "luns": {}, "acl": None, "tpgt": 1, "chap": None,
                    "mutual_chap": None, "portals": [], "sessions": [], "problem": self.unserved[iqn]}
        return {"iqn": iqn, "luns": t["luns"], "acl": t.get("acl"), "tpgt": t.get("tpgt", 1),
                "chap": {"user": t["chap"][0], "secret": SECRET} if t.get("chap") else None,
                "mutual_chap": {"user": t["mutual_chap"][0], "secret": SECRET}
                if t.get("mutual_chap") else None,
                "portals": [f"{h}:{p}" for h, p in self.portals()],
                "sessions": self._logged_in(iqn)}

    def export_list(self) -> list[dict[str, Any]]:
        return [self.export_show(iqn) for iqn in sorted(self.cfg.targets())]

    def portals(self) -> list[tuple[str, int]]:
        """What the front end serves (the addresses it bound)."""
        if self.frontend is not None and self.frontend.addresses():
            return self.frontend.addresses()
        return self._portals_override or self._stored_portals()

    def _stored_portals(self) -> list[tuple[str, int]]:
        """The portals setting, checked as it is read: a bad stored value
        (an older version's restoreconfig stored anything) is a one-line
        refusal naming the setting and the way out, never a traceback."""
        try:
            value = self.cfg.get("portals", [list(DEFAULT_PORTAL)])
            check_setting("portals", value)
            return parse_portals(value)
        except (InvalidConfig, PortalError, StoredValueError) as e:
            raise ServiceError(f"{e}; start once with 'serve --portal HOST:PORT', then run "
                               "'liverestore portal set HOST:PORT'") from None

    async def portal_set(self, portals: list[str]) -> dict[str, Any]:
        try:
            parsed = parse_portals(portals)
        except PortalError as e:
            raise ServiceError(str(e)) from None
        self.cfg.set("portals", [list(p) for p in parsed])
        return {"portals": [format_portal(p) for p in parsed],
                "note": "takes effect at the next reload (systemctl reload liverestore) or "
                        "restart"}

    async def reload(self) -> list[str]:
        """SIGHUP (`systemctl reload`): re-read what may change while serving,
        without dropping a session. That is the stored portals setting
        (`export portal`; `serve --portal` stored what it serves, so the
        setting is the one source either way) and the images of offline
        volumes, tried again at their recorded paths. Returns one line per
        change."""
        done: list[str] = []
        want = self._stored_portals()
        if want != self.frontend.portals:
            await self.frontend.set_portals(want)
            self._started_portals = want
            done.append("portals: " + ", ".join(format_portal(p) for p in want))
        for rec in self.cfg.volumes():
            if self.eng.volumes[rec.name].offline is None:
                continue
            store, why = self._open_recorded(rec)
            if why is None:
                (await self.eng.relink(rec.name, store)).close()
                done.append(f"volume {rec.name} is online again")
        return done

    # -- status / config -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        stats = {"backend": self.backend,
                 **(self.frontend.stats() if self.frontend is not None else {})}
        stored = self._stored_portals()
        return {"state_dir": self.state_dir, "uptime": time.time() - self.started_at,
                "portals": [f"{h}:{p}" for h, p in self.portals()],
                # set with `portal set`, served after the next restart
                "portals_pending": [format_portal(p) for p in stored]
                if stored != self._started_portals else None,
                "volumes": self.volume_list(), "pairs": self.pair_list(),
                "groups": self.group_list(),
                "exports": self.export_list(), "iscsi": stats,
                "rollback": self._rollback_status()}

    def _rollback_status(self) -> dict[str, Any] | None:
        """The last database rollback found, with the volumes it forgot that
        are still missing (re-create them with their old --path to adopt)."""
        assert self.db is not None
        rep = self.db.rollback_report()
        if rep is None:
            return None
        rep["vanished_volumes"] = {n: path for n, path in rep["vanished_volumes"].items()
                                   if self.cfg.volume(n) is None}
        rep["held_pairs"] = sorted(pid for pid, p in self.eng.pairs.items() if p.hold)
        rep["vanished_pairs"] = [pid for pid in rep.get("vanished_pairs", [])
                                 if pid not in self.eng.pairs]
        rep["resurrected_volumes"] = {n: path for n, path in
                                      rep.get("resurrected_volumes", {}).items()
                                      if self.cfg.volume(n) is not None}
        # A resurrected volume the admin keeps needs no action: it alone
        # does not keep the notice up.
        if not (rep["vanished_volumes"] or rep["held_pairs"] or rep["vanished_pairs"]):
            return None         # everything it asked for was done
        return rep

    def saveconfig(self) -> dict[str, Any]:
        """Everything needed to rebuild this configuration (secrets included:
        keep the file private, like targetcli's saveconfig.json)."""
        return {"version": CONFIG_VERSION,
                "portals": [list(p) for p in self._stored_portals()],
                "volumes": [asdict(v) for v in self.cfg.volumes()],
                "pairs": [{"source": p.source, "clone": p.clone, "extent_size": p.extent_size,
                           "throttle": asdict(p.throttle)} for p in self.eng.pairs.values()],
                "groups": self._saved_groups(),
                "targets": self.cfg.targets()}

    async def restoreconfig(self, config: dict[str, Any], *,
                            peer: Peer | None = None) -> dict[str, Any]:
        """Create what the saved configuration has and this one lacks: all of
        it or nothing.

        The whole document is checked against its schema before anything
        changes; if a step then fails, what this call created (targets,
        pairs, volumes and the image files it made) is removed again and no
        setting is changed, so a retry after fixing the document starts from
        the same state. Pairs come back fractured with every extent in the
        delta map: the saved file does not know what changed since, so the
        next sync or restore copies everything (never less than needed)."""
        try:
            check_document(config)
        except InvalidConfig as e:
            raise ServiceError(f"restoreconfig: {e}; nothing was changed") from None
        settings = {}
        if "portals" in config:
            settings["portals"] = [list(p) for p in parse_portals(config["portals"])]
        undo = _Undo()
        try:
            made = await self._restore_objects(config, undo, peer)
            if settings:
                self.cfg.set_many(settings)       # last: one transaction, after all else held
        except Exception as e:  # noqa: BLE001 - a refusal or a bug: either way, take it all back
            if not isinstance(e, ServiceError):
                log.exception("restoreconfig failed")      # a bug, not the document
            left = await undo.run()
            why = str(e) if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
            if left:
                raise ServiceError(f"restoreconfig failed ({why}); could not undo: "
                                   f"{'; '.join(left)}") from None
            raise ServiceError(f"restoreconfig failed ({why}); nothing was changed") from None
        return {"created": made}

    async def _restore_objects(self, config: dict[str, Any], undo: "_Undo",
                               peer: Peer | None) -> dict[str, list[str]]:
        made: dict[str, list[str]] = {"volumes": [], "pairs": [], "groups": [], "targets": []}
        for v in config.get("volumes", []):
            if self.cfg.volume(v["name"]) is not None:
                continue
            path = v.get("path")
            es = v.get("extent_size", DEFAULT_EXTENT_SIZE)
            if v.get("kind") == RBD_KIND:
                try:
                    spec = spec_of_record(RBD_KIND, path)
                except SpecError as e:
                    raise ServiceError(f"volume {v['name']}: {e}") from None
                assert isinstance(spec, RbdSpec)
                await self.volume_create(v["name"], None, v["size"], es, rbd=spec.image_name,
                                         ceph_conf=spec.conf, ceph_id=spec.client_id, peer=peer)
                store = self.eng.volumes[v["name"]].store
                made_rbd = spec if getattr(store, "created", False) else None
                undo.add(f"volume {v['name']}", self._undo_volume(v["name"], None, made_rbd))
            else:
                new_file = path is None or not os.path.exists(path)
                await self.volume_create(v["name"], path, v["size"], es, peer=peer)
                created = self.cfg.volume(v["name"])
                undo.add(f"volume {v['name']}", self._undo_volume(
                    v["name"], created.path if new_file else None))
            made["volumes"].append(v["name"])
        have = {(p.source, p.clone) for p in self.eng.pairs.values()}
        for p in config.get("pairs", []):
            if (p["source"], p["clone"]) in have:
                continue
            knobs = {k: v for k, v in p.get("throttle", {}).items()
                     if k not in RETIRED_THROTTLE_KNOBS}
            await self.pair_create(p["source"], p["clone"], p.get("extent_size"), sync=False,
                                   **knobs)
            undo.add(f"pair {p['clone']}", lambda c=p["clone"]: self.pair_delete(c, force=True))
            made["pairs"].append(p["clone"])
        made["groups"] = await self._restore_groups(config.get("groups", []), undo)
        for iqn, t in config.get("targets", {}).items():
            if iqn in self.cfg.targets():
                continue
            chap = t.get("chap") or [None, None]
            mutual = t.get("mutual_chap") or [None, None]
            await self.export_create(iqn, t.get("luns"), t.get("acl"), chap[0], chap[1],
                                     mutual[0], mutual[1], t.get("tpgt", 1))
            undo.add(f"target {iqn}", lambda i=iqn: self.export_delete(i, force=True))
            made["targets"].append(iqn)
        return made

    def _undo_volume(self, name: str, made_file: str | None, made_rbd: RbdSpec | None = None):
        async def run() -> None:
            await self.volume_delete(name)
            # restoreconfig made this image: leave nothing that a retry
            # would have to adopt or refuse.
            if made_file is not None:
                os.unlink(made_file)
            if made_rbd is not None:
                await asyncio.get_running_loop().run_in_executor(None, remove_image, made_rbd)
        return run

    # -- dispatch table for the control socket ------------------------------------------------
    OPS = {
        "volume.create": "volume_create", "volume.delete": "volume_delete",
        "volume.list": "volume_list", "volume.show": "volume_show",
        "volume.resize": "volume_resize", "volume.relink": "volume_relink",
        "pair.create": "pair_create", "pair.fracture": "pair_fracture", "pair.sync": "pair_sync",
        "pair.restore": "pair_restore", "pair.pause": "pair_pause", "pair.resume": "pair_resume",
        "pair.throttle": "pair_throttle", "pair.delete": "pair_delete", "pair.list": "pair_list",
        "pair.show": "pair_show", "pair.wait": "pair_wait",
        "pair.acknowledge": "pair_acknowledge", "pair.abort": "pair_abort",
        "pair.commit": "pair_commit",
        "export.create": "export_create", "export.update": "export_update",
        "export.delete": "export_delete", "export.list": "export_list",
        "export.show": "export_show", "portal.set": "portal_set",
        "export.lun.add": "export_lun_add", "export.lun.delete": "export_lun_delete",
        "export.acl.add": "export_acl_add", "export.acl.delete": "export_acl_delete",
        "status": "status", "saveconfig": "saveconfig", "restoreconfig": "restoreconfig",
        **GROUP_OPS,
    }

    _signatures: dict[str, Signature] = {}

    @classmethod
    def signature(cls, op: str) -> Signature:
        """What ``op`` accepts, read once from its method's signature and hints."""
        sig = cls._signatures.get(op)
        if sig is None:
            sig = cls._signatures[op] = Signature(op, getattr(cls, cls.OPS[op]))
        return sig

    async def call(self, op: str, args: dict[str, Any], peer: object | None = None) -> Any:
        """Run one control operation. Arguments are checked against the
        method's signature first, so the method only sees values of the
        types it declares; ``peer`` is passed to methods that take it."""
        if not isinstance(op, str) or op not in self.OPS:
            raise ServiceError(f"unknown operation {clip(op)}")
        sig = self.signature(op)
        try:
            sig.check(args)
        except ArgumentError as e:
            raise ServiceError(str(e)) from None
        kwargs = {**args, "peer": peer} if sig.wants_peer else args
        res = getattr(self, self.OPS[op])(**kwargs)
        if asyncio.iscoroutine(res):
            res = await res
        return res
