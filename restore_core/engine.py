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

from .blockstore import BlockStore
from .committer import Committer, load_map
from .copier import Copier
from .extentmap import DEFAULT_EXTENT_SIZE
from .metadata import HOLD_FIELD, MetadataStore, Snapshot
from .pair import (PERSISTED_MAPS, Job, JobKind, Pair, PairState, Progress, Throttle,
                   VolumeRuntime)
from .volume_io import VolumeIO

log = logging.getLogger(__name__)

MAX_CLONES_PER_SOURCE = 8
LAZY_COMMIT_S = 1.0
# Volume names (and so pair ids, which are clone names) reach the shell tree,
# LIO configfs and log lines: one printable token. Always used with fullmatch:
# "$" with re.match would let a trailing newline through.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
NAME_HELP = "1-64 of letters, digits, _ . : - starting with a letter or digit"


def valid_volume_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None
# How often every image is checked for having been deleted or replaced under
# the daemon (each flush checks too).
IMAGE_CHECK_S = 1.0


class EngineError(Exception):
    """A request the engine refuses; the message is for the operator."""


class Engine:
    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta
        self.committer = Committer(meta)
        self.committer.on_durable.append(self._prune_pending)
        self.volumes: dict[str, VolumeRuntime] = {}
        self.ios: dict[str, VolumeIO] = {}
        self.pairs: dict[str, Pair] = {}
        self._cleaners: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()   # copiers of volumes gone offline
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
        del self.volumes[name]
        del self.ios[name]
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
                    cur = getattr(pair, name)   # intent has one bit per region, not per extent
                    cur.assign(load_map(cur.nbits, snap.maps.get(pair.map_key(name), {})))
                for name in PERSISTED_MAPS:
                    getattr(pair, name).take_dirty_chunks()
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
        pair.regionlog.marks = pair.marks
        src.as_source.append(pair)
        cln.as_clone = pair
        self.pairs[pair.id] = pair
        for name in PERSISTED_MAPS:
            self.committer.register_map(pair.map_key(name), getattr(pair, name))

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
                assumed = pair.widen_damaged_chunk(name, chunk)
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
                pair.damaged = pair.damaged or f"acknowledged after: {reason}"
                # its maps can no longer say what differs: everything does
                await self._become_fractured(pair, None)
                src.generation += 1
                cln.generation += 1
                self._refresh_holds()
            log.warning("pair %s: acknowledged (%s); every extent now counts as differing",
                        pair.id, reason)
            self._emit("acknowledged", pair.id)
            return reason

    async def _recover(self, pair: Pair) -> None:
        if pair.hold is not None:
            log.error("pair %s is held: %s; its volumes answer NOT READY until "
                      "'liverestore pair acknowledge %s'", pair.id, pair.hold, pair.id)
            return
        if pair.widen_delta_by_intent():
            # Acknowledged writes whose exact bits had not reached disk.
            self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
        if pair.mirroring and (pair.marks.any(0, pair.nextents) or (
                pair.state is PairState.SYNCHRONIZED and pair.delta.any(0, pair.nextents))):
            # Mirrored writes may have been cut between the legs: copy those
            # extents again (one transaction, before the copier starts). A
            # synchronized pair's delta is empty unless a damaged chunk was
            # widened: copy those too.
            if pair.state is PairState.SYNCHRONIZED:
                pair.state = PairState.SYNCING
                pair.job = Job(JobKind.SYNC, total=0)
                pair.done.clear_all()
            pair.delta.update_from(pair.marks)
            pair.done.subtract(pair.marks)
            pair.marks.clear_all()
            pair.compute_todo()
            if pair.job is not None:
                pair.job.total = max(pair.job.total, pair.todo.count())
            self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
        if pair.job is not None:
            pair.compute_todo()
            log.info("pair %s: resuming %s, %d extents left", pair.id, pair.job.kind.value,
                     pair.todo.count())
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
            if any(p.state is PairState.RESTORING for p in src.as_source):
                raise EngineError(f"volume {source!r} is being restored; wait for the restore to end")
            if throttle is not None:
                throttle.validate()
            pair = Pair(clone, source, clone, src.store.size, extent_size, PairState.FRACTURED)
            if throttle is not None:
                pair.throttle = throttle
            async with src.gate.closed(), cln.gate.closed():
                self._attach(pair)
                pair.delta.set_all()
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
            if pair.state is PairState.RESTORING:
                raise EngineError(f"pair {pair_id} is restoring; wait for the restore to end")
            if pair.state is PairState.SYNCING:
                raise EngineError(f"pair {pair_id} is already syncing")
            self._require_online(pair.source, pair.clone)
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            if any(p.state is PairState.RESTORING for p in src.as_source):
                raise EngineError(f"volume {pair.source} is being restored from another clone")
            async with src.gate.closed(), cln.gate.closed():
                if pair.state is PairState.SYNCHRONIZED:
                    pair.delta.update_from(pair.marks)
                    pair.marks.clear_all()
                if full:
                    pair.delta.set_all()
                pair.done.clear_all()
                pair.intent.clear_all()    # the exact delta commits with the job
                pair.state = PairState.SYNCING
                pair.job = Job(JobKind.SYNC, total=pair.delta.count())
                self.committer.put_pair(pair.id, pair.to_record())
                await self.committer.commit()
                pair.compute_todo()
                cln.generation += 1
                self._start_job(pair)
                self._start_cleaner(pair)
            self._emit("sync-started", pair.id)
            return pair

    async def _become_fractured(self, pair: Pair, differ) -> None:
        """Stop the pair's job and leave it fractured with ``differ`` as its
        delta map (None: every extent), committed. The caller holds both
        volumes' gates closed."""
        await self._stop_background(pair)
        self._set_fractured(pair, differ)
        await self.committer.commit()

    def _set_fractured(self, pair: Pair, differ) -> None:
        """The in-memory half of _become_fractured: no await, so changes of
        several pairs made one after another share one commit batch."""
        if differ is None:
            pair.delta.set_all()
        else:
            pair.delta.assign(differ)
        pair.done.clear_all()
        pair.marks.clear_all()
        pair.intent.clear_all()
        pair.todo.clear_all()
        pair.state = PairState.FRACTURED
        pair.job = None
        self.committer.put_pair(pair.id, pair.to_record())

    def _needs_fracture(self, pair: Pair) -> bool:
        """False if already fractured; raises if it cannot be fractured now."""
        self._refuse_held(pair)
        if pair.state is PairState.RESTORING:
            raise EngineError(f"pair {pair.id} is restoring; a restore cannot be split off "
                              "half way (pause it, or wait for it to end)")
        return pair.state is not PairState.FRACTURED

    async def fracture(self, pair_id: str) -> Pair:
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            if not self._needs_fracture(pair):
                return pair
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                await self._become_fractured(pair, pair.may_differ())
                cln.generation += 1
            self._emit("fractured", pair.id)
            return pair

    async def restore(self, pair_id: str, *, protected: bool = True, paused: bool = False) -> Pair:
        """Start copying clone -> source; returns at once, the source stays usable.

        ``paused`` starts with the background copier held: only host I/O
        copies (on demand) until resume.
        """
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            self._check_restorable(pair)
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                self._set_restoring(pair, protected, paused)
                await self.committer.commit()
                self._restore_started(pair)
            self._emit("restore-started", pair.id)
            return pair

    def _check_restorable(self, pair: Pair) -> None:
        self._refuse_held(pair)
        if pair.state is not PairState.FRACTURED:
            raise EngineError(f"pair {pair.id} is {pair.state.value}; only a fractured pair "
                              "can be restored")
        self._require_online(pair.source, pair.clone)
        for other in self.volumes[pair.source].as_source:
            if other is not pair and other.state is not PairState.FRACTURED:
                raise EngineError(f"pair {other.id} of the same source is {other.state.value}; "
                                  "fracture it first")

    def _set_restoring(self, pair: Pair, protected: bool, paused: bool) -> None:
        """The in-memory half of a restore start (no await: see
        _set_fractured); the caller holds both gates closed and commits."""
        # Every sibling clone will differ wherever this restore copies.
        for other in self.volumes[pair.source].as_source:
            if other is not pair:
                other.delta.update_from(pair.delta)
            # Every pair's exact delta commits with this change: regions are done.
            other.intent.clear_all()
        pair.done.clear_all()
        pair.marks.clear_all()
        pair.state = PairState.RESTORING
        pair.job = Job(JobKind.RESTORE, protected=protected, total=pair.delta.count(),
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

    async def delete_pair(self, pair_id: str, *, force: bool = False) -> None:
        async with self._lock:
            pair = self.pair(pair_id)
            self._refuse_owned(pair)
            if pair.state is PairState.RESTORING and not force:
                raise EngineError(f"pair {pair_id} is restoring; the source would be left half "
                                  "restored (use force to delete anyway)")
            src, cln = self.volumes[pair.source], self.volumes[pair.clone]
            async with src.gate.closed(), cln.gate.closed():
                await self._stop_background(pair)
                self.committer.put_pair(pair.id, None)
                self._detach(pair)
                await self.committer.commit()
                src.generation += 1
                cln.generation += 1
                self._refresh_holds()
            self._emit("pair-deleted", pair_id)

    def _detach(self, pair: Pair) -> None:
        self.committer.unregister_prefix(pair.id + "/")
        src, cln = self.volumes[pair.source], self.volumes[pair.clone]
        if pair in src.as_source:
            src.as_source.remove(pair)
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
            pair.copier = Copier(pair, self.committer)
            pair.copier.on_finished = self._job_finished
            pair.copier.on_error = self._job_failed
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
            if kind is JobKind.RESTORE and pair.job.protected:
                # The protected restore map is exactly the new delta map.
                pair.delta.assign(pair.marks)
                pair.marks.clear_all()
                pair.state = PairState.FRACTURED
            else:
                # Everything copied; mirrored writes stay in the region log.
                pair.delta.clear_all()
                pair.state = PairState.SYNCHRONIZED
            pair.done.clear_all()
            pair.job = None
            # The job copied every extent a widened chunk covered.
            pair.damaged = None
            self.committer.put_pair(pair.id, pair.to_record())
            await self.committer.commit()
            if kind is JobKind.RESTORE:
                src.generation += 1
            cln.generation += 1
            if pair.state is PairState.FRACTURED:
                t = self._cleaners.pop(pair.id, None)
                if t is not None:
                    t.cancel()
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
            for pm in (pair.pending_marks, pair.pending_intent):
                if pm:
                    for e in [e for e, b in pm.items() if b <= durable_id]:
                        del pm[e]

    def _emit(self, event: str, pair_id: str) -> None:
        for cb in list(self.listeners):
            try:
                cb(event, pair_id)
            except Exception:  # noqa: BLE001
                log.exception("listener failed on %s", event)
