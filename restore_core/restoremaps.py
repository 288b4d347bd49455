"""A pair's extent maps behind named operations (as dm-clone's metadata API).

Crash safety rests on these maps and on the order their changes reach disk,
so nothing else touches them: the copier, the host I/O path and the engine's
state changes call the operations below.

Persisted (one bit per extent unless said otherwise):
  delta  -- extents that may differ between source and clone; frozen while
            a job runs so that starting a restore writes no map chunks.
  done   -- extents the running job has copied (or a host write filled
            whole), set only once their data is durable.
  marks  -- one persisted map with two meanings, by pair state:
            the **protected restore map** (protected restore: host-written
            extents, never overwritten by the copier, the new delta at the
            end) and the **dirty-region log** (sync, synchronized,
            unprotected restore: mirrored writes whose legs may differ).
  intent -- write-intent regions of a fractured pair (INTENT_EXTENTS
            extents each, like md's write-intent bitmap): a host write makes
            its region bit durable before it is acknowledged, while its exact
            delta bits stay in memory and reach disk with a later batch.
  covered -- write-intent regions too, but of writes to a side whose store
            keeps the pair's fracture instant (an RBD snapshot): a restart
            takes their delta from what that store says changed since the
            instant (exact extents) instead of the whole region. A region in
            both maps is widened.
  saved  -- keep-undo restore (restore_core.undo): extents whose
            pre-restore source data is durable in the undo image; set
            before the restore overwrites them.
  written -- keep-undo restore, until abort or commit: extents hosts wrote
            since the restore began (an abort keeps their data); durable
            before the write is acknowledged.
During an abort the protected restore map holds the extents hosts wrote
(never copied over), ``delta`` is already the pair's delta after the abort
and the job puts back ``saved - written``.
In memory:
  todo   -- still to copy: ``delta - done`` (minus the protected restore map).
  landed -- copied (or filled) but the data not yet durable: neither todo
            nor done. A protected mark on such an extent waits for it.
"May differ" is always ``(delta - done) | marks``.
"""
from __future__ import annotations

from typing import Callable

from .committer import Committer, load_map
from .extentmap import CHUNK_BITS, ExtentMap

# 256 extents: 16 MiB regions at the default 64 KiB extent size.
INTENT_EXTENTS = 256
PERSISTED_MAPS = ("delta", "done", "marks", "intent", "covered", "saved", "written")

Settle = Callable[[], None]

# RestoreMaps.left_in: how much of a range is still to copy
LEFT_NONE, LEFT_SOME, LEFT_ALL = 0, 1, 2


class RestoreMaps:
    def __init__(self, nextents: int) -> None:
        n = nextents
        self.nextents = n
        self.delta = ExtentMap(n)
        self.done = ExtentMap(n)
        self.marks = ExtentMap(n)
        self.intent = ExtentMap((n + INTENT_EXTENTS - 1) // INTENT_EXTENTS)
        self.covered = ExtentMap(self.intent.nbits)
        self.saved = ExtentMap(n)
        self.written = ExtentMap(n)
        self.todo = ExtentMap(n)
        self.landed = ExtentMap(n)
        # index -> batch making its bit durable (later markers wait for it too)
        self._pending_marks: dict[int, int] = {}
        self._pending_intent: dict[int, int] = {}
        self._pending_covered: dict[int, int] = {}
        self._pending_written: dict[int, int] = {}
        self._committer: Committer | None = None
        self._prefix = ""

    # -- persistence --------------------------------------------------------------
    def attach(self, committer: Committer, prefix: str) -> None:
        """Have ``committer`` persist the maps under ``prefix``/<name>."""
        self._committer = committer
        self._prefix = prefix
        for name in PERSISTED_MAPS:
            committer.register_map(f"{prefix}/{name}", getattr(self, name))

    def detach(self) -> None:
        if self._committer is not None:
            self._committer.unregister_prefix(self._prefix + "/")
            self._committer = None

    def load(self, name: str, chunks: dict[int, bytes]) -> None:
        """Replace persisted map ``name`` by its stored chunks (at start)."""
        m: ExtentMap = getattr(self, name)
        m.assign(load_map(m.nbits, chunks))
        m.take_dirty_chunks()

    @property
    def committer(self) -> Committer:
        assert self._committer is not None, "maps not attached to a committer"
        return self._committer

    # -- queries --------------------------------------------------------------------
    def is_restored(self, a: int, b: int) -> bool:
        """No extent of [a, b) is still to copy."""
        return not self.todo.any(a, b)

    def left_in(self, a: int, b: int) -> int:
        """How much of [a, b) is still to copy: LEFT_NONE, LEFT_SOME or
        LEFT_ALL. One bit test for one extent (a host read's usual case:
        this runs for every read of a restoring LU)."""
        bits = self.todo.bits
        if b - a == 1:
            return LEFT_ALL if bits[a] else LEFT_NONE
        if bits.find(1, a, b) < 0:
            return LEFT_NONE
        return LEFT_ALL if bits.find(0, a, b) < 0 else LEFT_SOME

    def todo_in(self, a: int, b: int) -> list[int]:
        return self.todo.set_in(a, b)

    def todo_left(self) -> int:
        return self.todo.count()

    def any_todo(self) -> bool:
        return self.todo.any(0, self.nextents)

    def next_todo_run(self, pos: int, span: int) -> tuple[int, int] | None:
        """The first run of at most ``span`` extents still to copy at or
        after ``pos``, or None."""
        e = self.todo.next_set(pos)
        if e < 0:
            return None
        limit = min(e + span, self.nextents)
        end = self.todo.next_clear(e, limit)
        return e, (limit if end < 0 else end)

    def copy_in_doubt(self, a: int, b: int) -> bool:
        """Some extent of [a, b) was copied but its data is not durable yet."""
        return self.landed.any(a, b)

    def may_differ(self) -> ExtentMap:
        return ExtentMap(self.nextents, (self.delta.bits & ~self.done.bits) | self.marks.bits)

    def differing(self) -> int:
        return self.delta.count()

    # -- copies (data durable -> done) ------------------------------------------------
    def mark_copied(self, a: int, b: int, still_current: Callable[[], bool]) -> Settle:
        """Extents [a, b) were copied: they leave todo now; the returned
        change sets their done bits and is applied once the data is durable
        (``Committer.note_landed``), unless ``still_current()`` says the job
        that copied them is gone."""
        self.todo.clear_range(a, b)
        self.landed.set_range(a, b)

        def settle() -> None:
            if still_current():
                self.landed.clear_range(a, b)
                self.done.set_range(a, b)
        return settle

    def mark_filled(self, extents: list[int], protected: bool,
                    still_current: Callable[[], bool]) -> Settle:
        """A host write covered these unrestored extents whole: restored
        without a copy (and host-written in a protected restore), once the
        write is durable."""
        for e in extents:
            self.todo.clear(e)
            self.landed.set(e)

        def settle() -> None:
            if not still_current():
                return
            bid = self.committer.next_id
            for e in extents:
                self.landed.clear(e)
                self.done.set(e)
                if protected:
                    self.marks.set(e)
                    self._pending_marks[e] = bid
        return settle

    # -- host marks: each returns the batch to wait for before writing, or 0 ------------
    def mark_host_written(self, extents: range | list[int]) -> int:
        """Protected restore map: the copier must never copy over these."""
        return self._mark_extents(extents)

    def mark_region_dirty(self, extents: range | list[int]) -> int:
        """Dirty-region log: a mirrored write may leave the legs differing."""
        return self._mark_extents(extents)

    def mark_tracked(self, a: int, b: int, covered: bool = False) -> int:
        """A write to a fractured pair's side: its exact delta bits are set
        in memory (they reach disk with a later batch); its write-intent
        region must be durable before the write is acknowledged -- in
        ``covered`` if the side's store keeps the fracture instant."""
        if not self.delta.all(a, b):
            self.delta.set_range(a, b)
        ra, rb = a // INTENT_EXTENTS, (b - 1) // INTENT_EXTENTS + 1
        if covered:
            return self._mark(self.covered, ra, rb, self._pending_covered)
        return self._mark(self.intent, ra, rb, self._pending_intent)

    def _mark_extents(self, extents: range | list[int]) -> int:
        if isinstance(extents, range):      # one run: one slice operation
            return self._mark(self.marks, extents.start, extents.stop, self._pending_marks)
        bid = 0
        for e in extents:
            bid = max(bid, self._mark(self.marks, e, e + 1, self._pending_marks))
        return bid

    def mark_written_since_restore(self, extents: range | list[int]) -> int:
        """Keep-undo: an abort must keep the host data of these extents."""
        if isinstance(extents, range):
            return self._mark(self.written, extents.start, extents.stop, self._pending_written)
        bid = 0
        for e in extents:
            bid = max(bid, self._mark(self.written, e, e + 1, self._pending_written))
        return bid

    def is_written_durably(self, a: int, b: int) -> bool:
        """Keep-undo: every extent of [a, b) durably counts as host-written."""
        return self.written.all(a, b) and not self._pending_batch(self._pending_written, a, b)

    # -- undo data (undo data durable -> saved) ---------------------------------------------
    def unsaved_runs(self, a: int, b: int) -> list[tuple[int, int]]:
        """Runs of [a, b) whose pre-restore data is not in the undo image yet."""
        if self.saved.all(a, b):
            return []
        runs: list[tuple[int, int]] = []
        for e in range(a, b):
            if self.saved.test(e):
                continue
            if runs and runs[-1][1] == e:
                runs[-1] = (runs[-1][0], e + 1)
            else:
                runs.append((e, e + 1))
        return runs

    def mark_saved(self, runs: list[tuple[int, int]]) -> int:
        """The undo data of these runs is durable; returns the batch that
        makes their bits durable (the overwrite waits for it)."""
        for ra, rb in runs:
            self.saved.set_range(ra, rb)
        return self.committer.next_id

    def is_host_written_durably(self, a: int, b: int) -> bool:
        """Protected restore map: every extent of [a, b) is marked and its
        mark is on disk (a write there needs no map change)."""
        return self.marks.all(a, b) and not self._pending_batch(self._pending_marks, a, b)

    def _pending_batch(self, pending: dict[int, int], a: int, b: int) -> int:
        """The batch still to reach disk that sets a bit of [a, b), or 0."""
        if not pending:
            return 0
        bid = 0
        for e in range(a, b):
            x = pending.get(e, 0)
            if x > bid:
                bid = x
        return bid if bid > self.committer.durable_id else 0

    def _mark(self, m: ExtentMap, a: int, b: int, pending: dict[int, int]) -> int:
        c = self.committer
        if m.all(a, b):
            return self._pending_batch(pending, a, b)
        m.set_range(a, b)
        bid = c.next_id
        for e in range(a, b):
            pending[e] = bid
        return bid

    def prune_pending(self, durable_id: int) -> None:
        """Forget marks whose batch is on disk."""
        for pm in (self._pending_marks, self._pending_intent, self._pending_covered,
                   self._pending_written):
            if pm:
                for e in [e for e, b in pm.items() if b <= durable_id]:
                    del pm[e]

    def clear_region(self, e: int) -> None:
        """Dirty-region log: both legs of extent e are durable and equal."""
        self.marks.clear(e)

    # -- job lifecycle (callers hold the volumes' I/O gates closed) ---------------------
    def start_todo(self, protected: bool, abort: bool = False) -> None:
        """todo = delta - done (- the protected restore map); an abort's:
        saved - done - the extents hosts wrote."""
        bits = (self.saved.bits if abort else self.delta.bits) & ~self.done.bits
        if protected or abort:
            bits &= ~self.marks.bits
        self.todo = ExtentMap(self.nextents, bits)
        self.landed.clear_all()

    def all_differ(self) -> None:
        self.delta.set_all()

    def add_differing(self, other: "RestoreMaps") -> None:
        """Everything ``other`` may change differs here too (a sibling's restore)."""
        self.delta.update_from(other.delta)

    def clear_intent(self) -> None:
        """The exact delta commits with this change: no region is dirty."""
        self.intent.clear_all()
        self.covered.clear_all()

    def begin_sync(self, synchronized: bool, full: bool) -> None:
        if synchronized:
            self.delta.update_from(self.marks)   # mirrored writes cut between the legs
            self.marks.clear_all()
        if full:
            self.delta.set_all()
        self.done.clear_all()
        self.clear_intent()

    def begin_restore(self, keep_undo: bool = False) -> None:
        self.done.clear_all()
        self.marks.clear_all()
        if keep_undo:
            self.saved.clear_all()
            self.written.clear_all()

    def begin_abort(self) -> None:
        """Put back the saved extents hosts have not written since the
        restore began. The delta after the abort is set now: what differed
        before the restore, what it changed, what hosts wrote."""
        self.delta.update_from(self.saved)
        self.delta.update_from(self.written)
        self.marks.assign(self.written)
        self.done.clear_all()

    def drop_undo(self) -> None:
        """The undo image is gone (commit, abort finished, acknowledge)."""
        self.saved.clear_all()
        self.written.clear_all()
        self._pending_written.clear()

    def recopy_dirty_regions(self, restart_job: bool) -> None:
        """After a crash in a mirroring state: extents of the dirty-region
        log may differ between the legs; copy them again."""
        if restart_job:
            self.done.clear_all()
        self.delta.update_from(self.marks)
        self.done.subtract(self.marks)
        self.marks.clear_all()

    def has_dirty_regions(self) -> bool:
        return self.marks.any(0, self.nextents)

    def any_differing(self) -> bool:
        return self.delta.any(0, self.nextents)

    def fracture(self, differ: ExtentMap | None) -> None:
        """The pair splits with ``differ`` as its delta (None: everything)."""
        if differ is None:
            self.delta.set_all()
        else:
            self.delta.assign(differ)
        self.done.clear_all()
        self.marks.clear_all()
        self.clear_intent()
        self.todo.clear_all()
        self.landed.clear_all()

    def finish_job(self, protected_restore: bool, keep_delta: bool = False) -> None:
        if keep_delta:
            # An abort: its delta was set when it began, plus what hosts
            # wrote during it.
            self.delta.update_from(self.marks)
            self.marks.clear_all()
        elif protected_restore:
            # The protected restore map is exactly the new delta map.
            self.delta.assign(self.marks)
            self.marks.clear_all()
        else:
            self.delta.clear_all()      # mirrored writes stay in the region log
        self.done.clear_all()

    def widen_delta_by_intent(self) -> bool:
        """After a crash: every extent of a dirty write-intent region may
        differ. Returns whether there was anything to widen."""
        if not self.intent.any(0, self.intent.nbits):
            return False
        self._widen(self.intent.runs())
        self.intent.clear_all()
        return True

    def covered_extents(self) -> list[tuple[int, int]]:
        """After a crash: the extent runs [a, b) of the covered regions,
        whose delta the stores' instants can say exactly (one dirty in
        ``intent`` too is widened with intent whatever they say)."""
        if not self.covered.any(0, self.covered.nbits):
            return []
        return [(ra * INTENT_EXTENTS, min(rb * INTENT_EXTENTS, self.nextents))
                for ra, rb in self.covered.runs()]

    def settle_covered(self, changed: list[tuple[int, int]] | None) -> None:
        """After a crash: ``changed`` -- the extent runs the instants say
        were written in the covered regions -- join the delta; None (an
        instant could not say) widens every covered region instead."""
        if changed is None:
            self._widen(self.covered.runs())
        else:
            for a, b in changed:
                self.delta.set_range(a, b)
        self.covered.clear_all()

    def _widen(self, regions: list[tuple[int, int]]) -> None:
        for ra, rb in list(regions):
            self.delta.set_range(ra * INTENT_EXTENTS, min(rb * INTENT_EXTENTS, self.nextents))

    def widen_damaged_chunk(self, name: str, chunk: int, protected_restore: bool) -> str:
        """A persisted chunk of map ``name`` failed its checksum: give it the
        content that can only cost extra copying, never hide a difference.
        Returns what was assumed, for the log."""
        m: ExtentMap = getattr(self, name)
        a = chunk * CHUNK_BITS
        b = min(a + CHUNK_BITS, m.nbits)
        where = "of it"
        if a >= m.nbits:
            # Its index is damaged too, so the chunk it belongs to is
            # unknown: widen the whole map; the bogus row goes at the next
            # commit.
            m.mark_chunk_dirty(chunk)
            a, b = 0, m.nbits
            where = "of the whole map (the chunk index itself is damaged)"
        if name == "done":
            m.clear_range(a, b)
            return f"every extent {where} counts as not yet copied"
        if name == "saved":
            # Unsaved is the safe side: an abort leaves such an extent as it
            # is, and a restore saves it (again) before overwriting it.
            m.clear_range(a, b)
            return f"every extent {where} counts as not saved in the undo image"
        if name == "written":
            m.set_range(a, b)
            return f"every extent {where} counts as host-written (an abort keeps it)"
        if name == "marks" and protected_restore:
            # Here a mark means "restored, then written by the host: never
            # copy over it". A host write restores its extent first, so every
            # extent that is not still to restore may carry host data.
            need = self.delta.bits[a:b] & ~self.done.bits[a:b]
            m.bits[a:b] = ~need
            for c in range(a // CHUNK_BITS, (b - 1) // CHUNK_BITS + 1):
                m.mark_chunk_dirty(c)
            return f"every extent {where} not still to restore counts as host-written"
        m.set_range(a, b)
        if name in ("intent", "covered"):
            return f"every region {where} counts as dirty"
        return f"every extent {where} counts as differing"
