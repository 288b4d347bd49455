"""The restore engine: volumes, pairs and their lifecycle.

    create pair (full sync) -> synchronized -> fracture -> [host writes
    tracked in the delta map] -> sync (incremental) | restore (protected or
    not) -> fractured / synchronized

Every state change is made with the volumes' I/O gates closed (no host I/O
in flight decided under the old state) and is durable before it returns.
Jobs (sync, restore) resume on start from their persisted maps.

Metadata the store reports damaged on load (map chunks that failed their
checksum) is widened to the safe side and rewritten before anything is
served; the pair is marked damaged until its next job completes. A pair on
hold (a rolled-back database, a damaged pair record) serves no I/O and runs
no job until the admin acknowledges it, which marks every extent as
differing.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Callable

from .blockstore import BlockStore, BlockStoreError
from .committer import Committer
from .copier import Copier
from .extentmap import DEFAULT_EXTENT_SIZE
from .gate import all_closed
from . import instants
from .metadata import HOLD_FIELD, MetadataStore, Snapshot
from .pair import Job, JobKind, Pair, PairState, Progress, RoutingEpoch, VolumeRuntime
from .restoremaps import PERSISTED_MAPS
from .throttle import Throttle
from .undo import UndoImages, UndoSaver
from .volume_io import VolumeIO

log = logging.getLogger(__name__)

MAX_CLONES_PER_SOURCE = 8
LAZY_COMMIT_S = 1.0
# Volume names (and so pair ids, which are clone names) reach the shell tree,
# LIO configfs and log lines: one printable token. Always used with fullmatch:
# "$" with re.match would let a trailing newline through.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
NAME_HELP = "1-64 of letters, digits, _ . : - starting with a letter or digit"


# An undo image to discard: its record and its store (if open), or None.
Discard = tuple[dict[str, Any] | None, BlockStore | None] | None


def valid_volume_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None
# How often every image is checked for having been deleted or replaced under
# the daemon (each flush checks too).
IMAGE_CHECK_S = 1.0


class EngineError(Exception):
    """A request the engine refuses; the message is for the operator."""


class Engine:
    def __init__(self, meta: MetadataStore, undo_images: UndoImages | None = None) -> None:
        self.meta = meta
        # where keep-undo restores get an undo image when the admin names no volume
        self.undo_images = undo_images
        self.committer = Committer(meta)
        self.committer.on_durable.append(self._prune_pending)
        self.volumes: dict[str, VolumeRuntime] = {}
        self.ios: dict[str, VolumeIO] = {}
        self.pairs: dict[str, Pair] = {}
        self._cleaners: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()   # copiers of volumes gone offline
        self._savers: dict[str, UndoSaver] = {}   # keep-undo restores' savers, by pair
        self._lock = asyncio.Lock()     # one lifecycle operation at a time
        self.started = False
        self.listeners: list[Any] = []  # callables(event: str, pair_id: str)
        # Which consistency group owns a pair (restore_core.groups sets it):
        # an owned pair is refused the one-by-one operations below.
        self.owner_of: Callable[[str], str | None] = lambda pair_id: None

    # -- volumes -----------------------------------------------------------------
    def add_volume(self, name: str, store: BlockStore, offline: str | None = None) -> VolumeIO:
        """Add a volume; ``offline`` (the reason) adds one whose image is not
        usable: it answers NOT READY and its pairs' jobs wait for relink()."""
        if not valid_volume_name(name):
            raise EngineError(f"invalid volume name {name!r}: {NAME_HELP}")
        if name in self.volumes:
            raise EngineError(f"volume {name!r} already exists")
        vol = VolumeRuntime(name, store)
        vol.offline = offline
        self.volumes[name] = vol
        RoutingEpoch.bump()          # a pair's other side may be this name
        io = VolumeIO(vol, self.committer, self.volumes, self.set_offline)
        self.ios[name] = io
        return io

    def set_offline(self, name: str, reason: str) -> None:
        """Take a volume offline (its image is gone): one ERROR line, host I/O
        answers NOT READY from now on, its pairs' copiers stop (their jobs
        stay, to resume after relink)."""
        vol = self.volumes.get(name)
        if vol is None or vol.offline is not None:
            return
        vol.offline = reason
        log.error("volume %s is offline: %s", name, reason)
        for pair in self._pairs_of(vol):
            t = asyncio.get_running_loop().create_task(self._stop_background(pair),
                                                       name=f"offline:{pair.id}")
            self._stopping.add(t)           # a reference, until it is done
            t.add_done_callback(self._stopping.discard)

    async def relink(self, name: str, store: BlockStore) -> BlockStore:
        """Bring an offline volume back on a new store of the same size;
        returns the old store (for the caller to close). Jobs of its pairs
        resume where they stopped."""
        async with self._lock:
            vol = self._volume(name)
            if vol.offline is None:
                raise EngineError(f"volume {name} is online; only an offline volume can be "
                                  "relinked")
            if store.size != vol.store.size:
                raise EngineError(f"volume {name} is {vol.store.size} bytes; the new image has "
                                  f"{store.size}")
            async with vol.gate.closed():
                old, vol.store = vol.store, store
                for pair in vol.as_source:
                    pair.source_store = store
                if vol.as_clone is not None:
                    vol.as_clone.clone_store = store
                vol.offline = None
                vol.generation += 1
            log.info("volume %s is online again at %s", name, getattr(store, "name", "?"))
            for pair in self._pairs_of(vol):
                if not self.offline_reasons(pair):
                    await self._recover(pair)
        return old

    def _pairs_of(self, vol: VolumeRuntime) -> list[Pair]:
        return list(vol.as_source) + ([vol.as_clone] if vol.as_clone is not None else [])

    def offline_reasons(self, pair: Pair) -> list[str]:
        """Why the pair's jobs cannot run now (its volumes that are offline)."""
        return [f"volume {n} is offline: {self.volumes[n].offline}"
                for n in (pair.source, pair.clone)
                if n in self.volumes and self.volumes[n].offline is not None]

    def _require_online(self, *names: str) -> None:
        for n in names:
            vol = self._volume(n)
            if vol.offline is not None:
                raise EngineError(f"volume {n} is offline ({vol.offline}); relink it first")

    async def _watch_images(self) -> None:
        while True:
            await asyncio.sleep(IMAGE_CHECK_S)
            for name, vol in list(self.volumes.items()):
                if vol.offline is None:
                    why = vol.store.lost()
                    if why is not None:
                        self.set_offline(name, why)

    def remove_volume(self, name: str) -> BlockStore:
        vol = self._volume(name)
        if vol.as_clone is not None or vol.as_source:
            users = [p.id for p in vol.as_source] + ([vol.as_clone.id] if vol.as_clone else [])
            raise EngineError(f"volume {name!r} is in pair(s) {', '.join(users)}; delete them first")
        if vol.undo_of is not None:
            raise EngineError(f"volume {name!r} holds the undo image of pair {vol.undo_of}; "
                              f"commit or abort its restore first")
        del self.volumes[name]
        del self.ios[name]
        RoutingEpoch.bump()
        return vol.store

    def volume_io(self, name: str) -> VolumeIO:
        self._volume(name)
        return self.ios[name]

    def _volume(self, name: str) -> VolumeRuntime:
        try:
            return self.volumes[name]
        except KeyError:
            raise EngineError(f"no volume named {name!r}") from None

    def pair(self, pair_id: str) -> Pair:
        try:
            return self.pairs[pair_id]
        except KeyError:
            raise EngineError(f"no pair {pair_id!r}") from None

    def find_pair(self, source: str, clone: str) -> Pair:
        for p in self.pairs.values():
            if p.source == source and p.clone == clone:
                return p
        raise EngineError(f"no pair {source}/{clone}")

    # -- start / stop -----------------------------------------------------------------
    async def start(self) -> None:
        """Load pairs from the metadata store and resume interrupted jobs."""
        snap = await asyncio.get_running_loop().run_in_executor(None, self.meta.load)
        for pid, rec in snap.pairs.items():
            try:
                pair = Pair.from_record(rec)
                for name in PERSISTED_MAPS:
                    pair.maps.load(name, snap.maps.get(pair.map_key(name), {}))
                self._attach(pair)
            except (KeyError, ValueError, TypeError, EngineError) as e:
                if not rec.get(HOLD_FIELD):
                    raise
                # A record that failed its checksum may name nothing usable.
                log.error("pair %s: its damaged record cannot be used (%s); the pair is not "
                          "loaded and its volumes serve unpaired: re-create the pair (a full "
                          "sync)", pid, e)
        if self._widen_damaged(snap) or any(p.hold for p in self.pairs.values()):
            # Rewritten with fresh checksums before anything is served.
            for pair in self.pairs.values():
                if pair.hold or pair.damaged:
                    self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
        self._refresh_holds()
        await self._sweep_undo_images()
        await self._sweep_instants()
        for pair in self.pairs.values():
            await self._recover(pair)
        self._lazy = asyncio.get_running_loop().create_task(self._lazy_commits(), name="lazy-commits")
        self._watch = asyncio.get_running_loop().create_task(self._watch_images(), name="image-watch")
        self.started = True

    async def _lazy_commits(self) -> None:
        """Exact delta bits of tracked writes reach disk with whatever batch
        comes next; this makes sure one comes at least every second."""
        while True:
            await asyncio.sleep(LAZY_COMMIT_S)
            if self.committer.has_changes():
                try:
                    await self.committer.commit()
                except Exception as e:  # noqa: BLE001 - writes will report it
                    log.error("background metadata commit failed: %s", e)
                    return

    def _attach(self, pair: Pair) -> None:
        src = self._volume(pair.source)
        cln = self._volume(pair.clone)
        if src.store.size != pair.size or cln.store.size != pair.size:
            raise EngineError(
                f"pair {pair.id}: volumes are {src.store.size} and {cln.store.size} bytes, "
                f"the pair was made for {pair.size}")
        pair.source_store = src.store
        pair.clone_store = cln.store
        if pair.undo is not None and pair.hold is None:
            self._open_undo(pair)
        src.as_source = (*src.as_source, pair)
        cln.as_clone = pair
        self.pairs[pair.id] = pair
        pair.maps.attach(self.committer, pair.id)

    def _open_undo(self, pair: Pair) -> None:
        """Reopen a pair's undo image at start; one that cannot be opened
        puts the pair on hold (its abort would have nothing to put back)."""
        rec = pair.undo or {}
        try:
            if "volume" in rec:
                vol = self._volume(str(rec["volume"]))
                if vol.undo_of not in (None, pair.id) or vol.as_clone or vol.as_source:
                    raise EngineError(f"volume {vol.name} is in use elsewhere")
                pair.undo_store = vol.store
                vol.undo_of = pair.id
                vol.generation += 1
            else:
                if self.undo_images is None:
                    raise EngineError("this daemon has no place for undo images")
                pair.undo_store = self.undo_images.open(rec["image"], pair.size)
            if pair.undo_store.size < pair.size:
                raise EngineError(f"it has {pair.undo_store.size} bytes, the pair {pair.size}")
        except (EngineError, BlockStoreError, OSError, KeyError, TypeError, ValueError) as e:
            pair.undo_store = None     # ValueError: a record whose spec does not parse
            pair.hold = f"its undo image {rec} cannot be used: {e}"
            log.error("pair %s: %s", pair.id, pair.hold)

    async def _sweep_undo_images(self) -> None:
        """Remove undo images no pair refers to any more."""
        if self.undo_images is None:
            return
        keep = [p.undo["image"] for p in self.pairs.values()
                if p.undo is not None and "image" in p.undo]
        try:
            gone = await asyncio.get_running_loop().run_in_executor(
                None, self.undo_images.sweep, keep)
        except (BlockStoreError, OSError) as e:
            log.warning("undo images no pair uses could not be removed: %s", e)
            return
        for name in gone:
            log.info("removed undo image %s, which no pair uses any more", name)

    async def _sweep_instants(self) -> None:
        """Remove the instants (snapshots) no pair records: a crash between
        marking one and the commit naming it, or between the commit that
        forgets one and its removal."""
        for vol in self.volumes.values():
            if vol.offline is None:
                keep = {p.instants[side] for p in self._pairs_of(vol)
                        for side in instants.SIDES if p.instants.get(side) is not None
                        and getattr(p, side) == vol.name}
                await instants.sweep(vol.store, keep)

    async def forget_instants(self, store: BlockStore) -> None:
        """A volume is deleted: its image keeps no snapshot of ours."""
        await instants.sweep(store, set())

    def _sides(self, pair: Pair) -> dict[str, BlockStore]:
        return {side: self.volumes[getattr(pair, side)].store for side in instants.SIDES}

    async def _tidy_instants(self, pair: Pair) -> None:
        """After the commit that recorded the pair's instants: remove the
        ones it no longer names."""
        await instants.tidy(pair.id, pair.instants, self._sides(pair))

    async def take_instants(self, pair: Pair) -> dict[str, str]:
        """Mark the instants of a pair about to be fractured (gates closed,
        its job stopped)."""
        return await instants.take(pair.id, self._sides(pair))

    def _widen_damaged(self, snap: Snapshot) -> bool:
        """Give every chunk that failed its checksum its safe-side content
        (see Pair.widen_damaged_chunk); progress maps after the maps they
        are read against. Returns whether anything was damaged."""
        order = {name: i for i, name in enumerate(PERSISTED_MAPS)}
        found = False
        for key in sorted(snap.damaged, key=lambda k: order.get(k.partition("/")[2], -1)):
            chunks = snap.damaged[key]
            pid, _, name = key.partition("/")
            pair = self.pairs.get(pid)
            if pair is None or name not in order:
                log.error("map %s: chunk(s) %s failed their checksum and belong to no pair; "
                          "ignored", key, ", ".join(map(str, chunks)))
                continue
            found = True
            for chunk in chunks:
                assumed = pair.maps.widen_damaged_chunk(name, chunk, pair.protected_restore)
                log.error("pair %s: map %s chunk %d failed its checksum: %s; the pair is "
                          "marked damaged", pid, name, chunk, assumed)
            pair.damaged = (f"map {name} chunk(s) {', '.join(map(str, chunks))} failed their "
                            "checksum; widened to the safe side, the next sync or restore "
                            "copies the extents they cover")
            self._emit("damaged", pid)
        return found

    def _refresh_holds(self) -> None:
        """Each volume of a held pair answers NOT READY with the pair's reason."""
        for vol in self.volumes.values():
            vol.held = None
        for pair in self.pairs.values():
            if pair.hold is None:
                continue
            why = (f"pair {pair.id} is held: {pair.hold}; "
                   f"run 'liverestore pair acknowledge {pair.id}'")
            for name in (pair.source, pair.clone):
                vol = self.volumes[name]
                if vol.held is None:
                    vol.held = why
                    vol.generation += 1

    def _refuse_held(self, pair: Pair) -> None:
        if pair.hold is not None:
            raise EngineError(f"pair {pair.id} is held: {pair.hold}; acknowledge it first "
                              f"('liverestore pair acknowledge {pair.id}')")

    def _refuse_owned(self, pair: Pair) -> None:
        group = self.owner_of(pair.id)
        if group is not None:
            raise EngineError(f"pair {pair.id} belongs to group {group}: operate on the group "
                              f"('liverestore group ... {group}'), or take the pair out first "
                              f"('liverestore group remove {group} {pair.id}')")

    async def acknowledge(self, pair_id: str) -> str:
        """The admin accepts a held pair: every extent counts as differing,
        the pair is fractured and serves again. Returns what was held."""
        async with self._lock:
            pair = self.pair(pair_id)
            if pair.hold is None:
                raise EngineError(f"pair {pair_id} is not held; nothing to acknowledge")
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                reason = pair.hold
                pair.hold = None
                await self._stop_background(pair)
                image = self._drop_undo(pair)
                pair.damaged = pair.damaged or f"acknowledged after: {reason}"
                # its maps can no longer say what differs: everything does
                await self._become_fractured(pair, None)
                src.generation += 1
                cln.generation += 1
                self._refresh_holds()
            await self._discard_image(pair.id, image)
            await self._tidy_instants(pair)
            log.warning("pair %s: acknowledged (%s); every extent now counts as differing",
                        pair.id, reason)
            self._emit("acknowledged", pair.id)
            return reason

    async def _recover(self, pair: Pair) -> None:
        if pair.hold is not None:
            log.error("pair %s is held: %s; its volumes answer NOT READY until "
                      "'liverestore pair acknowledge %s'", pair.id, pair.hold, pair.id)
            return
        # Acknowledged writes whose exact bits had not reached disk: exactly
        # from the instants where the writes' sides keep one, else whole regions.
        covered = pair.maps.covered_extents()
        waiting = [n for n in (getattr(pair, side) for side in pair.instants)
                   if self.volumes[n].offline is not None]
        if covered and waiting:
            # Its regions stay covered (durably): relink recovers them.
            log.info("pair %s: the exact delta of its covered write-intent regions waits for "
                     "volume %s", pair.id, ", ".join(waiting))
            covered = []
        elif covered:
            changed = await instants.changed_extents(pair.instants, self._sides(pair), covered,
                                                     pair.extent_size, pair.nextents)
            if changed is None:
                pair.instants = {}      # one that cannot say now will not later either
            else:
                log.info("pair %s: after the crash, %d extent run(s) written since the "
                         "fracture, from its snapshots, instead of %d whole extents",
                         pair.id, len(changed), sum(b - a for a, b in covered))
            pair.maps.settle_covered(changed)
        if pair.maps.widen_delta_by_intent() or covered:
            self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
        if pair.mirroring and (pair.maps.has_dirty_regions() or (
                pair.state is PairState.SYNCHRONIZED and pair.maps.any_differing())):
            # Mirrored writes may have been cut between the legs: copy those
            # extents again (one transaction, before the copier starts). A
            # synchronized pair's delta is empty unless a damaged chunk was
            # widened: copy those too.
            restart = pair.state is PairState.SYNCHRONIZED
            if restart:
                pair.state = PairState.SYNCING
                pair.job = Job(JobKind.SYNC, total=0)
            pair.maps.recopy_dirty_regions(restart)
            pair.compute_todo()
            if pair.job is not None:
                pair.job.total = max(pair.job.total, pair.maps.todo_left())
            self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
        if pair.job is not None:
            pair.compute_todo()
            log.info("pair %s: resuming %s, %d extents left", pair.id, pair.job.kind.value,
                     pair.maps.todo_left())
            self._start_job(pair)
        if pair.mirroring:
            self._start_cleaner(pair)

    async def close(self) -> None:
        """Stop copiers (their progress is durable), flush, commit."""
        for name in ("_lazy", "_watch"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for pair in self.pairs.values():
            if pair.copier is not None:
                await pair.copier.stop()
        for saver in self._savers.values():
            await saver.close()
        self._savers.clear()
        for t in self._cleaners.values():
            t.cancel()
        await asyncio.gather(*self._cleaners.values(), return_exceptions=True)
        self._cleaners.clear()
        for vol in self.volumes.values():
            try:
                await vol.store.flush()
            except Exception as e:  # noqa: BLE001
                log.error("flush of %s at close failed: %s", vol.name, e)
        await self.committer.close()

    # -- lifecycle -----------------------------------------------------------------------
    async def create_pair(self, source: str, clone: str, *, extent_size: int = DEFAULT_EXTENT_SIZE,
                          sync: bool = True, throttle: Throttle | None = None) -> Pair:
        async with self._lock:
            if extent_size < 4096 or extent_size & (extent_size - 1) or extent_size > 64 << 20:
                raise EngineError("extent size must be a power of two from 4 KiB to 64 MiB")
            src, cln = self._volume(source), self._volume(clone)
            self._require_online(source, clone)
            if source == clone:
                raise EngineError("a volume cannot be its own clone")
            if cln.as_clone is not None:
                raise EngineError(f"volume {clone!r} is already the clone in pair {cln.as_clone.id}")
            if cln.as_source:
                raise EngineError(f"volume {clone!r} is the source of other pairs; it cannot be a clone")
            if src.as_clone is not None:
                raise EngineError(f"volume {source!r} is a clone; a clone cannot be a source")
            if len(src.as_source) >= MAX_CLONES_PER_SOURCE:
                raise EngineError(f"volume {source!r} already has {MAX_CLONES_PER_SOURCE} clones")
            for vol in (src, cln):
                if vol.held is not None:
                    raise EngineError(f"volume {vol.name!r}: {vol.held}")
            if src.store.size != cln.store.size:
                raise EngineError(f"sizes differ: {source} has {src.store.size} bytes, "
                                  f"{clone} has {cln.store.size}")
            if any(p.to_source for p in src.as_source):
                raise EngineError(f"volume {source!r} is being restored; wait for the restore to end")
            if throttle is not None:
                throttle.validate()
            pair = Pair(clone, source, clone, src.store.size, extent_size, PairState.FRACTURED)
            if throttle is not None:
                pair.throttle = throttle
            async with src.gate.closed(), cln.gate.closed():
                self._attach(pair)
                pair.maps.all_differ()
                if sync:
                    pair.state = PairState.SYNCING
                    pair.job = Job(JobKind.SYNC, total=pair.nextents)
                self.committer.put_pair(pair.id, pair.to_record())
                try:
                    await self.committer.commit()
                except BaseException:
                    self._detach(pair)
                    raise
                cln.generation += 1
                if sync:
                    pair.compute_todo()
                    self._start_job(pair)
                    self._start_cleaner(pair)
            self._emit("pair-created", pair.id)
            return pair

    async def sync(self, pair_id: str, *, full: bool = False) -> Pair:
        """Incremental (delta extents) or full copy source -> clone."""
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            self._refuse_held(pair)
            if pair.to_source:
                raise EngineError(f"pair {pair_id} is {pair.state.value}; wait for it to end")
            self._refuse_undo_kept(pair)
            if pair.state is PairState.SYNCING:
                raise EngineError(f"pair {pair_id} is already syncing")
            self._require_online(pair.source, pair.clone)
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            if any(p.to_source for p in src.as_source):
                raise EngineError(f"volume {pair.source} is being restored from another clone")
            async with src.gate.closed(), cln.gate.closed():
                # the exact delta commits with the job
                pair.maps.begin_sync(pair.state is PairState.SYNCHRONIZED, full)
                pair.aborted = False
                pair.state = PairState.SYNCING
                pair.job = Job(JobKind.SYNC, total=pair.maps.differing())
                pair.instants = {}      # the sync makes the fracture's moot
                self.committer.put_pair(pair.id, pair.to_record())
                await self.committer.commit()
                pair.compute_todo()
                cln.generation += 1
                self._start_job(pair)
                self._start_cleaner(pair)
            await self._tidy_instants(pair)
            self._emit("sync-started", pair.id)
            return pair

    async def _become_fractured(self, pair: Pair, differ) -> None:
        """Stop the pair's job and leave it fractured with ``differ`` as its
        delta map (None: every extent, which no instant can narrow),
        committed. The caller holds both volumes' gates closed and removes
        the instants it no longer uses afterwards (_tidy_instants)."""
        await self._stop_background(pair)
        marked = {} if differ is None else await self.take_instants(pair)
        self._set_fractured(pair, differ, marked)
        await self.committer.commit()

    def _set_fractured(self, pair: Pair, differ, marked: dict[str, str]) -> None:
        """The in-memory half of _become_fractured: no await, so changes of
        several pairs made one after another share one commit batch."""
        pair.maps.fracture(differ)
        pair.state = PairState.FRACTURED
        pair.job = None
        pair.instants = marked
        self.committer.put_pair(pair.id, pair.to_record())

    def _needs_fracture(self, pair: Pair) -> bool:
        """False if already fractured; raises if it cannot be fractured now."""
        self._refuse_held(pair)
        if pair.to_source:
            raise EngineError(f"pair {pair.id} is {pair.state.value}; a restore cannot be split "
                              "off half way (pause it, or wait for it to end)")
        return pair.state is not PairState.FRACTURED

    async def fracture(self, pair_id: str) -> Pair:
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            if not self._needs_fracture(pair):
                return pair
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                await self._become_fractured(pair, pair.maps.may_differ())
                cln.generation += 1
            await self._tidy_instants(pair)
            self._emit("fractured", pair.id)
            return pair

    async def restore(self, pair_id: str, *, protected: bool = True, paused: bool = False,
                      keep_undo: bool = False, undo_volume: str | None = None) -> Pair:
        """Start copying clone -> source; returns at once, the source stays usable.

        ``paused`` starts with the background copier held: only host I/O
        copies (on demand) until resume. ``keep_undo`` saves what the
        restore overwrites to an undo image (``undo_volume``, or one the
        engine's UndoImages makes) so that ``abort`` can put it back.
        """
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            self._check_restorable(pair, protected, keep_undo, undo_volume)
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            if keep_undo:
                await self._attach_undo(pair, undo_volume)
            try:
                async with src.gate.closed(), cln.gate.closed():
                    self._set_restoring(pair, protected, paused)
                    await self.committer.commit()
                    self._restore_started(pair)
            except BaseException:
                if pair.state is not PairState.RESTORING:
                    await self._discard_image(pair.id, self._release_undo(pair))
                raise
            await self._tidy_instants(pair)
            self._emit("restore-started", pair.id)
            return pair

    def _check_restorable(self, pair: Pair, protected: bool = True, keep_undo: bool = False,
                          undo_volume: str | None = None) -> None:
        self._refuse_held(pair)
        self._refuse_undo_kept(pair)
        if pair.state is not PairState.FRACTURED:
            raise EngineError(f"pair {pair.id} is {pair.state.value}; only a fractured pair "
                              "can be restored")
        self._require_online(pair.source, pair.clone)
        self._check_siblings(pair)
        if undo_volume is not None and not keep_undo:
            raise EngineError("an undo volume is only used with keep-undo")
        if keep_undo:
            if not protected:
                raise EngineError("keep-undo needs a protected restore (an unprotected one "
                                  "mirrors host writes into the clone)")
            if undo_volume is None and self.undo_images is None:
                raise EngineError("no place for undo images here: name an undo volume")
            if undo_volume is not None:
                self._check_undo_volume(pair, undo_volume)

    def _check_siblings(self, pair: Pair) -> None:
        for other in self.volumes[pair.source].as_source:
            if other is pair:
                continue
            if other.state is not PairState.FRACTURED:
                raise EngineError(f"pair {other.id} of the same source is {other.state.value}; "
                                  "fracture it first")
            if other.undo is not None:
                raise EngineError(f"pair {other.id} of the same source keeps the undo image "
                                  f"of its restore; commit or abort it first")

    def _check_undo_volume(self, pair: Pair, name: str) -> None:
        vol = self._volume(name)
        if name in (pair.source, pair.clone) or vol.as_clone is not None or vol.as_source:
            raise EngineError(f"volume {name} is in a pair; an undo volume must be in none")
        if vol.undo_of is not None:
            raise EngineError(f"volume {name} already holds the undo image of pair {vol.undo_of}")
        if vol.offline is not None:
            raise EngineError(f"volume {name} is offline ({vol.offline})")
        if vol.store.size < pair.size:
            raise EngineError(f"volume {name} has {vol.store.size} bytes; the undo image of "
                              f"pair {pair.id} needs {pair.size}")

    def _refuse_undo_kept(self, pair: Pair) -> None:
        if pair.undo is not None and pair.state is not PairState.RESTORING:
            raise EngineError(f"pair {pair.id} keeps the undo image of its restore; "
                              f"'liverestore pair commit {pair.id}' or 'pair abort {pair.id}' "
                              "first")

    async def _attach_undo(self, pair: Pair, undo_volume: str | None) -> None:
        """Give the pair its (empty) undo image; recorded with the restore start."""
        if undo_volume is not None:
            vol = self.volumes[undo_volume]
            vol.undo_of = pair.id
            vol.generation += 1
            async with vol.gate.closed():     # host I/O to it ends; NOT READY from now on
                pass
            pair.undo, pair.undo_store = {"volume": undo_volume}, vol.store
            return
        assert self.undo_images is not None and pair.source_store is not None
        images, like = self.undo_images, pair.source_store
        try:
            store, rec = await asyncio.get_running_loop().run_in_executor(
                None, images.create, pair.id, like)
        except (BlockStoreError, OSError) as e:
            raise EngineError(f"cannot create the undo image of pair {pair.id}: {e}") from None
        pair.undo, pair.undo_store = {"image": rec}, store

    def _release_undo(self, pair: Pair) -> Discard:
        """Forget the pair's undo image (in memory); returns the image (its
        record and open store) to discard once that is durable."""
        rec, store = pair.undo, pair.undo_store
        pair.undo, pair.undo_store = None, None
        if rec is None:
            return None
        if "volume" in rec:
            vol = self.volumes.get(str(rec["volume"]))
            if vol is not None and vol.undo_of == pair.id:
                vol.undo_of = None
                vol.generation += 1
            return None
        return rec.get("image"), store

    def _drop_undo(self, pair: Pair) -> Discard:
        pair.maps.drop_undo()
        return self._release_undo(pair)

    async def _discard_image(self, pair_id: str, image: Discard) -> None:
        """After the change that forgets it is durable: a crash before this
        leaves an unused image behind (removed at the next start), never a
        pair pointing at none."""
        if image is None or image[0] is None or self.undo_images is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.undo_images.discard,
                                                             *image)
        except (BlockStoreError, OSError) as e:
            log.warning("pair %s: its undo image %s could not be removed: %s", pair_id,
                        image[0], e)

    def _set_restoring(self, pair: Pair, protected: bool, paused: bool) -> None:
        """The in-memory half of a restore start (no await: see
        _set_fractured); the caller holds both gates closed and commits."""
        # Every sibling clone will differ wherever this restore copies.
        for other in self.volumes[pair.source].as_source:
            if other is not pair:
                other.maps.add_differing(pair.maps)
            # Every pair's exact delta commits with this change: regions are done.
            other.maps.clear_intent()
        pair.maps.begin_restore(pair.undo is not None)
        pair.aborted = False
        pair.instants = {}      # no write is tracked while it restores
        pair.state = PairState.RESTORING
        pair.job = Job(JobKind.RESTORE, protected=protected, total=pair.maps.differing(),
                       paused=paused)
        self.committer.put_pair(pair.id, pair.to_record())

    def _restore_started(self, pair: Pair) -> None:
        """After the restore start is durable, gates still closed."""
        pair.compute_todo()
        self.volumes[pair.source].generation += 1
        self.volumes[pair.clone].generation += 1
        self._start_job(pair)
        if pair.mirroring:
            self._start_cleaner(pair)

    # -- keep-undo: abort / commit ----------------------------------------------------
    def _check_abortable(self, pair: Pair) -> bool:
        """False if already aborting; raises if the pair cannot abort now."""
        self._refuse_held(pair)
        if pair.undo is None:
            raise EngineError(f"pair {pair.id} keeps no undo image; only a restore started "
                              "with keep-undo can be aborted (before its commit)")
        if pair.state is PairState.ABORTING:
            return False
        self._require_online(pair.source)
        self._check_siblings(pair)
        return True

    async def abort(self, pair_id: str) -> Pair:
        """Put back what a keep-undo restore overwrote, except extents hosts
        wrote since it began; runs in the background like a restore, with
        copy-on-demand from the undo image. Already aborting: nothing to do."""
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            if not self._check_abortable(pair):
                return pair
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                await self._quiesce(pair)
                self._set_aborting(pair)
                await self.committer.commit()
                self._restore_started(pair)
            await self._tidy_instants(pair)
            self._emit("abort-started", pair.id)
            return pair

    async def _quiesce(self, pair: Pair) -> None:
        """Stop the pair's job with every copy landed (gates closed: no
        copy-on-demand runs), so no restore write reaches the source later."""
        if pair.copier is not None:
            await pair.copier.drain()
        saver = self._savers.pop(pair.id, None)
        if saver is not None:
            await saver.close()
        await self._stop_background(pair)

    def _set_aborting(self, pair: Pair) -> None:
        """The in-memory half of an abort start (see _set_fractured)."""
        for other in self.volumes[pair.source].as_source:
            if other is not pair:     # the source changes where data is put back
                other.maps.delta.update_from(pair.maps.saved)
            other.maps.clear_intent()
        pair.maps.begin_abort()
        pair.aborted = True
        pair.instants = {}
        pair.state = PairState.ABORTING
        pair.maps.start_todo(True, abort=True)
        pair.job = Job(JobKind.ABORT, total=pair.maps.todo_left())
        self.committer.put_pair(pair.id, pair.to_record())

    async def commit_undo(self, pair_id: str) -> Pair:
        """The admin keeps the restore: its undo image is discarded."""
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            self._check_committable(pair)
            src = self.volumes[pair.source]
            async with src.gate.closed():
                image = self._drop_undo(pair)
                self.committer.put_pair(pair.id, pair.to_record())
                await self.committer.commit()
            await self._discard_image(pair.id, image)
            self._emit("committed", pair.id)
            return pair

    def _check_committable(self, pair: Pair) -> None:
        if pair.undo is None:
            raise EngineError(f"pair {pair.id} keeps no undo image; nothing to commit")
        if pair.state is not PairState.FRACTURED:
            raise EngineError(f"pair {pair.id} is {pair.state.value}; a restore is committed "
                              "once it has finished (or aborted with 'pair abort')")

    async def delete_pair(self, pair_id: str, *, force: bool = False) -> None:
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            if pair.to_source and not force:
                raise EngineError(f"pair {pair_id} is {pair.state.value}; the source would be "
                                  "left half restored (use force to delete anyway)")
            if pair.undo is not None and not force:
                raise EngineError(f"pair {pair_id} keeps the undo image of its restore; commit "
                                  "or abort it first (or use force to delete anyway)")
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                await self._quiesce(pair)
                image = self._release_undo(pair)
                self.committer.put_pair(pair.id, None)
                self._detach(pair)
                await self.committer.commit()
                src.generation += 1
                cln.generation += 1
                self._refresh_holds()
            await self._discard_image(pair_id, image)
            pair.instants = {}
            await self._tidy_instants(pair)
            self._emit("pair-deleted", pair_id)

    def _detach(self, pair: Pair) -> None:
        pair.maps.detach()
        src, cln = self.volumes[pair.source], self.volumes[pair.clone]
        if pair in src.as_source:
            src.as_source = tuple(p for p in src.as_source if p is not pair)
        if cln.as_clone is pair:
            cln.as_clone = None
        self.pairs.pop(pair.id, None)

    # -- job control ------------------------------------------------------------------------
    async def pause(self, pair_id: str) -> None:
        pair = self.pair(pair_id)
        self._refuse_owned(pair)
        if pair.job is None:
            raise EngineError(f"pair {pair_id} has no sync or restore running")
        pair.job.paused = True
        self.committer.put_pair(pair.id, pair.to_record())
        await self.committer.commit()
        self._emit("paused", pair_id)

    async def resume(self, pair_id: str) -> None:
        pair = self.pair(pair_id)
        self._refuse_owned(pair)
        self._refuse_held(pair)
        if pair.job is None:
            raise EngineError(f"pair {pair_id} has no sync or restore to resume")
        self._require_online(pair.source, pair.clone)
        pair.job.paused = False
        pair.job.error = None
        self.committer.put_pair(pair.id, pair.to_record())
        await self.committer.commit()
        if pair.copier is None or not pair.copier.running:
            self._start_job(pair)
        else:
            pair.copier.resume_event.set()
        self._emit("resumed", pair_id)

    async def set_throttle(self, pair_id: str, **knobs: int) -> Throttle:
        pair = self.pair(pair_id)
        t = Throttle(**{**pair.throttle.__dict__, **knobs})
        t.validate()
        pair.throttle = t
        if pair.copier is not None:
            pair.copier.wake.set()     # a waiting copier picks up the new rate now
        self.committer.put_pair(pair.id, pair.to_record())
        await self.committer.commit()
        return t

    def progress(self, pair_id: str) -> Progress:
        return self.pair(pair_id).progress()

    async def wait_job(self, pair_id: str, timeout: float | None = None) -> Pair:
        """Wait until the pair's job finished (or stopped with an error)."""
        pair = self.pair(pair_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while pair.job is not None and not pair.job.error and not pair.job.paused:
            if pair.copier is not None and pair.copier.running:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await asyncio.wait_for(pair.copier.wait_finished(), left)
                except asyncio.TimeoutError:
                    raise EngineError(f"pair {pair_id}: job still running after {timeout}s") from None
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        raise
            else:
                await asyncio.sleep(0.01)
            if deadline is not None and loop.time() > deadline:
                raise EngineError(f"pair {pair_id}: job still running after {timeout}s")
        return pair

    # -- internals -------------------------------------------------------------------------
    def _start_job(self, pair: Pair) -> None:
        offline = self.offline_reasons(pair)
        if offline:
            # the job stays recorded; relink() resumes it
            log.warning("pair %s: %s waits: %s", pair.id,
                        pair.job.kind.value if pair.job else "job", "; ".join(offline))
            return
        if pair.copier is None:
            # Host activity is the source LU's (host I/O during a restore or
            # sync goes there), and so is the idle copy rate it learns: it
            # outlives the job and serves the pair's other clones too.
            pair.copier = Copier(pair, self.committer, self.volumes[pair.source].hosts)
            pair.copier.on_finished = self._job_finished
            pair.copier.on_error = self._job_failed
            pair.copier.hold_hosts = lambda: all_closed(
                self.volumes[pair.source].gate, self.volumes[pair.clone].gate)
        saver = None
        if pair.undo_store is not None:
            saver = self._savers.get(pair.id)
            if saver is None:
                saver = self._savers[pair.id] = UndoSaver(pair, self.committer,
                                                          pair.copier.buffers)
        pair.copier.before_overwrite = None if saver is None else saver.before_overwrite
        if pair.job is not None and not pair.job.paused:
            pair.copier.start()

    async def _stop_background(self, pair: Pair) -> None:
        if pair.copier is not None:
            await pair.copier.stop()
        t = self._cleaners.pop(pair.id, None)
        if t is not None:
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)

    async def _job_finished(self, pair: Pair) -> None:
        """Called by the copier when todo is empty and durable."""
        src, cln = self.volumes[pair.source], self.volumes[pair.clone]
        async with self._lock, src.gate.closed(), cln.gate.closed():
            if pair.job is None:
                return
            kind = pair.job.kind
            image = None
            self._savers.pop(pair.id, None)     # nothing left to save ahead
            if kind is JobKind.ABORT:
                # the delta was set when the abort began
                pair.maps.finish_job(False, keep_delta=True)
                image = self._drop_undo(pair)
                pair.state = PairState.FRACTURED
            else:
                protected = kind is JobKind.RESTORE and pair.job.protected
                pair.maps.finish_job(protected)
                pair.state = PairState.FRACTURED if protected else PairState.SYNCHRONIZED
            # No snapshot for a restore ending fractured: ~60 ms more with
            # hosts held at every restore's end (tests/bench/rbd.py times
            # the restore to it); its writes widen after a crash until the
            # next fracture.
            pair.job = None
            # The job copied every extent a widened chunk covered.
            pair.damaged = None
            self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
            if kind is not JobKind.SYNC:
                src.generation += 1
            cln.generation += 1
            if pair.state is PairState.FRACTURED:
                t = self._cleaners.pop(pair.id, None)
                if t is not None:
                    t.cancel()
        await self._discard_image(pair.id, image)
        log.info("pair %s: %s finished, now %s", pair.id, kind.value, pair.state.value)
        self._emit(f"{kind.value}-finished", pair.id)

    async def _job_failed(self, pair: Pair, message: str) -> None:
        if pair.job is None:
            return
        pair.job.error = message
        pair.job.paused = True
        self.committer.put_pair(pair.id, pair.to_record())
        try:
            await self.committer.commit()
        except Exception as e:  # noqa: BLE001
            log.error("pair %s: could not record the failure: %s", pair.id, e)
        self._emit("job-failed", pair.id)

    def _start_cleaner(self, pair: Pair) -> None:
        if self.offline_reasons(pair):
            return      # its flushes would reach an image that is not there
        if pair.id in self._cleaners and not self._cleaners[pair.id].done():
            return
        self._cleaners[pair.id] = asyncio.get_running_loop().create_task(
            self._clean_regions(pair), name=f"regions:{pair.id}")

    async def _clean_regions(self, pair: Pair) -> None:
        """Lazily clear dirty-region bits of mirrored writes that both legs hold."""
        while pair.mirroring:
            await asyncio.sleep(0.5)
            if not pair.regionlog.candidates:
                continue
            gen = pair.regionlog.gen
            assert pair.source_store is not None and pair.clone_store is not None
            try:
                await asyncio.gather(pair.source_store.flush(), pair.clone_store.flush())
            except Exception as e:  # noqa: BLE001 - bits simply stay set
                log.warning("pair %s: region clean flush failed: %s", pair.id, e)
                continue
            if pair.mirroring and pair.regionlog.clean(gen):
                try:
                    await self.committer.commit()
                except Exception as e:  # noqa: BLE001
                    log.error("pair %s: region clean commit failed: %s", pair.id, e)
                    return

    def _prune_pending(self, durable_id: int) -> None:
        for pair in self.pairs.values():
            pair.maps.prune_pending(durable_id)

    def _emit(self, event: str, pair_id: str) -> None:
        for cb in list(self.listeners):
            try:
                cb(event, pair_id)
            except Exception:  # noqa: BLE001
                log.exception("listener failed on %s", event)
