"""The host I/O path of one volume: what every SCSI READ/WRITE goes through.

Implements the LunIO interface (restore_core.lunio) directly: it raises
that interface's errors, which the SCSI layer maps to sense data.
For each pair the volume belongs to, a host write is prepared according to
the pair's state, then the data is written, then the preparation finished:

  fractured            mark the delta bit durable, then write
  protected restore    copy-on-demand partially covered unrestored extents;
                       whole ones are claimed and filled by the write itself;
                       mark the protected restore map durable before writing
                       to restored extents; fills: data durable -> map -> ack
  mirroring (sync,     mark the dirty-region bit durable, write both legs;
  synchronized,        the region log clears the bit lazily once both legs
  unprotected restore) are durable; extents still to sync are claimed so the
                       copier cannot copy them under the write

Reads during a restore are served from the clone for the extents still to
restore (see the reads section for why that is correct), never waiting for
a copy.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Mapping

from .blockstore import BlockStore, BlockStoreError
from .committer import Committer
from .direct import DirectLease
from .extentmap import extents_of, whole_extents_of
from .lunio import (READ_WRITE, Access, AccessState, LunIO, MediumError, NotReadyError,
                    ReadWork, WriteProtectedError, WriteWork)
from .metadata import MetadataError
from .pair import Pair, PairState, RoutingEpoch, VolumeRuntime
from .restoremaps import LEFT_ALL, LEFT_NONE
from .store_errors import host_error


IoFn = Callable[[BlockStore], Awaitable[None]]
Piece = tuple[BlockStore, int, int]        # a read's bytes [start, end) from a store


def _slice(bufs: list[memoryview], start: int, end: int) -> list[memoryview]:
    """Bytes [start, end) of a scatter list, as views into it."""
    out = []
    pos = 0
    for buf in bufs:
        n = len(buf)
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            out.append(buf[lo:hi])
        pos += n
    return out


class _Routing:
    """What a LU's host commands are decided by, as of one RoutingEpoch."""
    __slots__ = ("epoch", "access", "not_ready", "restoring", "paired")

    def __init__(self, epoch: int, access: AccessState, restoring: Pair | None,
                 paired: bool) -> None:
        self.epoch = epoch
        self.access = access
        self.not_ready = access.access is Access.NOT_READY
        # the pair restoring (or aborting) into this volume: reads of its
        # extents still to restore come from its clone
        self.restoring = restoring
        self.paired = paired             # some pair tracks this volume's writes


def _done(work: ReadWork | WriteWork | None) -> bool:
    if work is None:
        return True
    work.close()                                 # never started: nothing to undo
    return False


class VolumeIO(LunIO):
    def __init__(self, vol: VolumeRuntime, committer: Committer,
                 volumes: Mapping[str, VolumeRuntime] | None = None,
                 on_lost: Callable[[str, str], None] | None = None) -> None:
        self.vol = vol
        self.committer = committer
        # every volume by name (to see whether a pair's other side is
        # offline), and whom to tell when this volume's image is gone
        self.volumes: Mapping[str, VolumeRuntime] = volumes if volumes is not None else {}
        self.on_lost = on_lost
        self._route = _Routing(-1, READ_WRITE, None, False)     # decided on first use

    # -- LunIO properties ------------------------------------------------------
    @property
    def size(self) -> int:
        return self.vol.store.size

    @property
    def generation(self) -> int:
        return self.vol.generation

    def access_state(self) -> AccessState:
        return self._routing().access

    def _routing(self) -> _Routing:
        """The LU's access and route as its pairs' and volumes' states
        decide them: recomputed when one of those changed (RoutingEpoch),
        not for every command."""
        r = self._route
        if r.epoch != RoutingEpoch.n:
            r = self._route = self._decide()
        return r

    def _decide(self) -> _Routing:
        epoch = RoutingEpoch.n
        vol = self.vol
        restoring = next((p for p in vol.as_source if p.to_source), None)
        paired = vol.as_clone is not None or bool(vol.as_source)
        return _Routing(epoch, self._access(), restoring, paired)

    def _access(self) -> AccessState:
        vol = self.vol
        if vol.held is not None:
            return AccessState(Access.NOT_READY, vol.held)
        if vol.undo_of is not None:
            return AccessState(Access.NOT_READY,
                               f"volume {vol.name} holds the undo image of pair {vol.undo_of}")
        if vol.offline is not None:
            return AccessState(Access.NOT_READY, f"volume {vol.name} is offline: {vol.offline}")
        for p in vol.as_source:
            if p.state is PairState.RESTORING and self._offline(p.clone):
                return AccessState(Access.NOT_READY,
                                   f"restoring from clone {p.clone}, which is offline: "
                                   f"{self.volumes[p.clone].offline}")
        pair = vol.as_clone
        if pair is None:
            return READ_WRITE
        if pair.state is PairState.RESTORING:
            if pair.protected_restore:
                return AccessState(Access.NOT_READY,
                                   f"clone of pair {pair.id} is the source of a protected restore")
            return AccessState(Access.READ_ONLY, f"clone of pair {pair.id} is the source of a restore")
        if pair.state in (PairState.SYNCING, PairState.SYNCHRONIZED):
            return AccessState(Access.READ_ONLY, f"clone of pair {pair.id} is {pair.state.value}")
        return READ_WRITE

    def _offline(self, name: str) -> bool:
        other = self.volumes.get(name)
        return other is not None and other.offline is not None

    def _verify_image(self) -> None:
        """After a flush: refuse to acknowledge data that went into an image
        file deleted or replaced under us (the volume goes offline)."""
        why = self.vol.store.lost()
        if why is None:
            return
        if self.on_lost is not None:
            self.on_lost(self.vol.name, why)
        raise MediumError(why, None, write=True)

    def _check(self, writing: bool) -> None:
        st = self.access_state()
        if st.access is Access.NOT_READY:
            raise NotReadyError(st.reason)
        if writing and st.access is Access.READ_ONLY:
            raise WriteProtectedError(st.reason)

    # -- host I/O routing ----------------------------------------------------------
    # One decision per host I/O (LunIO.route_read/route_write): an I/O that
    # needs nothing but the data movement -- no extent to copy first, no map
    # bit to wait for, no state change under way -- is done at once, straight
    # to the store, without a coroutine; anything else gets its work, which
    # enters the gate and re-checks the access state there (the state may
    # have changed since the SCSI layer checked it, and cannot change while
    # the work holds the gate). What the decision rests on -- the access
    # state, the pair restoring into the volume -- is decided once per state
    # change (_routing), not per command: the SCSI layer's access check and
    # the direct path's read the same kept decision.
    def route_read(self, offset: int, into: list[memoryview]) -> ReadWork | None:
        return self._route_read(offset, into, True)

    def _route_read(self, offset: int, into: list[memoryview], start: bool) -> ReadWork | None:
        """``start``: a store's asynchronous direct read may be started
        (BlockStore.start_readinto): it holds the gate, as the work would,
        until the store let go of the buffer."""
        length = sum(map(len, into))
        if self._direct_blocked():
            return self._read_work(offset, length)
        src = self._read_sources(offset, length)
        if src.__class__ is list:
            done = all(store.try_readinto(a, _slice(into, a - offset, b - offset))
                       for store, a, b in src)       # type: ignore[union-attr]
        elif src.try_readinto(offset, into):         # type: ignore[union-attr]
            return None
        else:
            done = False
            gate = self.vol.gate
            if start and len(into) == 1 and gate.try_enter():
                started = src.start_readinto(offset, into[0], gate.leave,   # type: ignore[union-attr]
                                             host_error)
                if started is not None:
                    return started
                gate.leave()
        return None if done else self._read_work(offset, length)

    def route_write(self, offset: int, data: memoryview, fua: bool) -> WriteWork | None:
        if not fua and not self._direct_blocked() and self._ready_to_write(offset, len(data)) \
                and self.vol.store.try_write(offset, [data]):
            return None
        return self.write(offset, data, fua)

    # The direct path alone (tests drive it): True when route_* did the I/O,
    # False when it would need work, which is dropped unstarted.
    def try_readinto(self, offset: int, bufs: list[memoryview]) -> bool:
        return _done(self._route_read(offset, bufs, False))

    def try_write(self, offset: int, bufs: list) -> bool:
        data = memoryview(bufs[0]) if len(bufs) == 1 else memoryview(b"".join(bufs))
        return _done(self.route_write(offset, data, False))

    def direct_lease(self) -> DirectLease | None:
        """Leave to serve every host read and non-FUA write of this LU straight
        from its store from outside the loop, while it stays what route_read /
        route_write decide for any range; None when they would not."""
        vol = self.vol
        if not self._whole_lu_direct() or not vol.gate.try_enter():
            return None
        store = vol.store
        unwatch: list[Callable[[], None]] = []

        def leave() -> None:
            for stop in unwatch:
                stop()
            vol.gate.leave()
        lease = DirectLease(store, lambda: vol.store is store and self._serves(vol)
                            and self._whole_lu_direct(), leave)
        # what can end it: the gate closing (every state change of this
        # volume), a routing change (its clone going offline, a hold, the
        # volume removed)
        unwatch += (vol.gate.watch(lease.changed), RoutingEpoch.watch(lease.changed))
        return lease

    def _serves(self, vol: VolumeRuntime) -> bool:
        """The volume is still the engine's (not removed)."""
        return self.volumes.get(vol.name, vol) is vol

    def _whole_lu_direct(self) -> bool:
        """No pair tracks this volume and nothing blocks the direct path: any
        range's read or non-FUA write goes straight to the store."""
        return not self._routing().paired and not self._direct_blocked()

    def _direct_blocked(self) -> bool:
        """A state change is under way or the LU cannot serve I/O: the work
        path waits for the gate and reports the error."""
        return self.vol.gate.is_closed or self._routing().not_ready

    def _ready_to_write(self, offset: int, length: int) -> bool:
        """Whether a write needs nothing done before it: for each pair, the
        map bit it needs is durable already. Only fractured pairs' sides
        qualify (their tracking is synchronous once the write-intent region
        is durable) and restoring sources with a protected restore whose
        extents under the write are restored and already marked host-written
        (durably); the rest needs work. At most delta bits of fractured pairs
        are set early here, which the work sets anyway."""
        if length == 0:
            return False
        vol = self.vol
        tracked = [vol.as_clone] if vol.as_clone is not None else []
        tracked += vol.as_source
        side = "clone" if vol.as_clone is not None else "source"
        fractured = []
        for pair in tracked:
            a, b = extents_of(offset, length, pair.extent_size)
            if pair.tracks_written and not pair.maps.is_written_durably(a, b):
                return False                     # an abort must know to keep this write
            if pair.state is PairState.FRACTURED:
                fractured.append((pair, a, b))
            elif not (pair.to_source and pair.protected_restore
                      and self._restored_and_marked(pair, a, b)):
                return False
        for pair, a, b in fractured:
            if pair.maps.mark_tracked(a, b, side in pair.instants):
                return False                     # its region must be durable first
        return True

    def _restored_and_marked(self, pair: Pair, a: int, b: int) -> bool:
        """Extents [a, b) of a protected restore are restored and durably
        marked host-written: a write to them needs no copy and no commit."""
        pair.last_host_io = time.monotonic()
        return pair.maps.is_restored(a, b) and pair.maps.is_host_written_durably(a, b)

    # -- reads -------------------------------------------------------------------
    # During a restore, a host read of an extent still to restore is served
    # from the clone's bytes at once (dm-clone's "remap"), never waiting for
    # a copy. Why that returns what a copy-on-demand would have:
    # * An extent still to restore has not been host-written during this
    #   restore: a write into it copies it first (partly covered) or fills it
    #   (wholly covered), and either way takes it out of the restore map
    #   before the write is acknowledged. So the clone's bytes are exactly
    #   what the source will hold once the extent is restored.
    # * Those clone bytes do not change under the read: a protected
    #   restore's clone is NOT READY to hosts and copies only read it; an
    #   unprotected restore mirrors host writes to the clone, but (as above)
    #   a write to an extent still to restore takes it out of the map before
    #   its acknowledgement, so only a write not yet acknowledged -- one
    #   concurrent with this read, where either answer is allowed -- can
    #   change them.
    # * A read issued after a write's acknowledgement finds the written
    #   extents restored and reads the source; a copy in flight writes the
    #   source only, and leaves the map after its data is there.
    # * A read changes nothing durable: crash safety is untouched.
    # The direct path tests the map and reads without yielding; the work
    # path decides under the gate (no state change meanwhile).
    async def read(self, offset: int, length: int) -> bytearray:
        return await self._read_work(offset, length)

    async def _read_work(self, offset: int, length: int) -> bytearray:
        vol = self.vol
        if not vol.gate.try_enter():
            await vol.gate.enter()
        try:
            self._check(False)
            src = self._read_sources(offset, length)
            if not isinstance(src, list):
                return await src.read(offset, length)
            out = bytearray(length)
            for store, a, b in src:
                out[a - offset:b - offset] = await store.read(a, b - a)
            return out
        except BlockStoreError as e:
            raise host_error(e) from e
        finally:
            vol.gate.leave()

    def _read_sources(self, offset: int, length: int) -> BlockStore | list[Piece]:
        """Where a host read's bytes come from: one store for all of them
        (the usual answer: the volume's own, or the clone when every extent
        under the read is still to restore -- one map test for a read within
        one extent), else (store, start, end) pieces covering [offset, end)
        in order, the extents still to restore coming from the clone. Notes
        the host I/O for the copier's host priority. Runs for every read of
        a restoring LU: a QD32 load's IOPS follow its cost."""
        pair = self._routing().restoring       # one restore at a time per source
        if pair is None:
            return self.vol.store
        pair.last_host_io = time.monotonic()
        left = pair.maps.left_in(*extents_of(offset, length, pair.extent_size))
        if left == LEFT_NONE:
            return self.vol.store
        clone = pair.copy_from    # the undo image in an abort
        assert clone is not None  # set when the pair was attached
        if left == LEFT_ALL:
            return clone
        return self._pieces(pair, clone, offset, length)

    def _pieces(self, pair: Pair, clone: BlockStore, offset: int, length: int) -> list[Piece]:
        """A read over restored and unrestored extents, split by store."""
        es = pair.extent_size
        end = offset + length
        pieces: list[Piece] = []
        pos = offset
        own = self.vol.store
        for e in pair.maps.todo_in(*extents_of(offset, length, es)):
            s, t = max(e * es, offset), min((e + 1) * es, end)
            if s > pos:
                pieces.append((own, pos, s))
            if pieces and pieces[-1][0] is clone and pieces[-1][2] == s:
                pieces[-1] = (clone, pieces[-1][1], t)
            else:
                pieces.append((clone, s, t))
            pos = t
        if pos < end:
            pieces.append((own, pos, end))
        return pieces

    # -- writes ------------------------------------------------------------------
    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        async def io(store: BlockStore) -> None:
            await store.write(offset, data)
        await self._modify(offset, len(data), io, fua)

    async def unmap(self, offset: int, length: int) -> None:
        async def io(store: BlockStore) -> None:
            await store.discard(offset, length)
        await self._modify(offset, length, io, False)

    async def flush(self) -> None:
        vol = self.vol
        if vol.offline is not None:
            raise NotReadyError(self.access_state().reason)
        stores = [vol.store]
        for pair in vol.as_source:
            if pair.mirroring and pair.clone_store is not None:
                stores.append(pair.clone_store)
        try:
            await asyncio.gather(*(s.flush() for s in stores))
        except BlockStoreError as e:
            raise host_error(e, write=True) from e
        self._verify_image()

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.vol.store.allocation(offset, length)

    # -- the write path ----------------------------------------------------------------
    async def _modify(self, offset: int, length: int, io: IoFn, fua: bool) -> None:
        if length == 0:
            self._check(True)
            return
        vol = self.vol
        if not vol.gate.try_enter():
            await vol.gate.enter()
        try:
            self._check(True)
            if vol.as_clone is not None:
                await self._modify_clone(vol.as_clone, offset, length, io, fua)
            elif vol.as_source:
                await self._modify_source(offset, length, io, fua)
            else:                          # in no pair: nothing to track or copy first
                await io(vol.store)
                if fua:
                    await vol.store.flush()
        except BlockStoreError as e:
            raise host_error(e, write=True) from e
        except MetadataError as e:
            raise MediumError(f"metadata: {e}", offset, write=True) from e
        finally:
            vol.gate.leave()
        if fua:
            self._verify_image()

    async def _modify_clone(self, pair: Pair, offset: int, length: int, io: IoFn, fua: bool) -> None:
        # Only a fractured clone is writable (checked by _check).
        a, b = extents_of(offset, length, pair.extent_size)
        bid = pair.maps.mark_tracked(a, b, "clone" in pair.instants)
        if bid:
            await self.committer.wait_durable(bid)
        await io(self.vol.store)
        if fua:
            await self.vol.store.flush()

    async def _modify_source(self, offset: int, length: int, io: IoFn, fua: bool) -> None:
        vol = self.vol
        wait_bid = 0
        # (pair, claimed extents, fill?) -- fills complete the restore of
        # whole extents; sync claims only keep the copier away.
        claims: list[tuple[Pair, list[int], bool]] = []
        mirrors: list[tuple[Pair, int, int]] = []
        mirror_stores: list[BlockStore] = []
        try:
            for pair in vol.as_source:
                a, b = extents_of(offset, length, pair.extent_size)
                st = pair.state
                if pair.tracks_written:     # keep-undo: an abort keeps this write
                    wait_bid = max(wait_bid, pair.maps.mark_written_since_restore(range(a, b)))
                if st is PairState.FRACTURED:
                    wait_bid = max(wait_bid, pair.maps.mark_tracked(
                        a, b, "source" in pair.instants))
                    continue
                pair.last_host_io = time.monotonic()
                if pair.to_source:
                    fa, fb = whole_extents_of(offset, length, pair.extent_size, pair.size)
                    assert pair.copier is not None
                    fills = await pair.copier.ensure_copied(a, b, (fa, fb))
                    if fills:
                        claims.append((pair, fills, True))
                    rest = [e for e in range(a, b) if e not in fills] if fills else None
                    if pair.protected_restore:
                        if pair.maps.copy_in_doubt(a, b):
                            # A mark keeps the copier off for good: the copy
                            # it keeps must be durable first.
                            await self.committer.settle_landed()
                        wait_bid = max(wait_bid, pair.maps.mark_host_written(
                            range(a, b) if rest is None else rest))
                        continue
                else:   # SYNCING / SYNCHRONIZED: keep the copier off todo extents
                    own = await self._claim_todo(pair, a, b)
                    if own:
                        claims.append((pair, own, False))
                    rest = [e for e in range(a, b) if e not in own] if own else None
                # mirroring: region-log the extents not covered by a claim
                wait_bid = max(wait_bid, pair.maps.mark_region_dirty(range(a, b) if rest is None else rest))
                if self._offline(pair.clone):
                    # No second leg while the clone is offline: the durable
                    # region marks stay set (no begin/end), so these extents
                    # are copied again when it comes back.
                    continue
                pair.regionlog.begin(a, b)
                mirrors.append((pair, a, b))
                assert pair.clone_store is not None
                mirror_stores.append(pair.clone_store)
            if wait_bid:
                await self.committer.wait_durable(wait_bid)
            if mirror_stores:
                await asyncio.gather(io(vol.store), *(io(s) for s in mirror_stores))
            else:
                await io(vol.store)
        except BaseException:
            for pair, ext, _ in claims:
                pair.inflight.release_all(ext)
            for pair, a, b in mirrors:
                pair.regionlog.abort(a, b)
            raise
        for pair, a, b in mirrors:
            pair.regionlog.end(a, b)
        need_commit = False
        for pair, ext, fill in claims:
            if fill:
                # The write filled these extents whole: they are restored (or
                # host-written) without a copy. Their map change waits for the
                # data to be durable: settled by the commit below, under the
                # claim, so later writers find the bits set.
                job = pair.job
                settle = pair.maps.mark_filled(ext, pair.protected_restore,
                                               lambda p=pair, j=job: p.job is j)
                self.committer.note_landed((vol.store, *mirror_stores), settle)
                need_commit = True
                continue
            pair.inflight.release_all(ext)
        if need_commit:
            try:
                await self.committer.settle_landed()
            finally:
                for pair, ext, fill in claims:
                    if fill:
                        pair.inflight.release_all(ext)
            await self.committer.commit()
        elif fua:
            stores = [vol.store, *mirror_stores]
            await asyncio.gather(*(s.flush() for s in stores))

    async def _claim_todo(self, pair: Pair, a: int, b: int) -> list[int]:
        """Claim the extents of [a, b) the sync still has to copy."""
        own: list[int] = []
        while True:
            busy: list[int] = []
            for e in pair.maps.todo_in(a, b):
                if e in own:
                    continue
                if pair.inflight.try_claim(e):
                    own.append(e)
                else:
                    busy.append(e)
            if not busy:
                return own
            pair.inflight.release_all(own)
            own.clear()
            for e in busy:
                await pair.inflight.wait(e, e + 1)
