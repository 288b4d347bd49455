"""A source/clone pair: its state, its persisted maps and its job.

Maps (persisted, one bit per extent):
  delta  -- extents that may differ between source and clone; frozen while
            a job runs so that starting a restore writes no map chunks.
  done   -- extents the running job has copied (or a host write filled whole).
  marks  -- protected restore: the protected restore map (host-written
            extents, never overwritten by the copier, the new delta at the
            end). Mirroring states (sync, synchronized, unprotected restore):
            the dirty-region log of mirrored writes.
  intent -- write-intent regions of a fractured pair (INTENT_EXTENTS
            extents each, like md's write-intent bitmap): a host write makes
            its region bit durable before it is acknowledged, while its exact
            delta bits stay in memory and reach disk with a later batch. A
            crash widens the delta by the dirty regions (never less than
            what changed); every state change commits the exact delta and
            clears the regions in the same transaction.
The extents still to copy are ``delta - done`` (minus ``marks`` in a
protected restore); "may differ" is always ``(delta - done) | marks``.
"""
from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .blockstore import BlockStore
from .extentmap import CHUNK_BITS, ExtentMap, extent_count
from .gate import IOGate
from .inflight import InFlightMap
from .metadata import DAMAGED_FIELD, HOLD_FIELD
from .regionlog import RegionLog


# 256 extents: 16 MiB regions at the default 64 KiB extent size.
INTENT_EXTENTS = 256
PERSISTED_MAPS = ("delta", "done", "marks", "intent")


class PairState(str, enum.Enum):
    SYNCING = "syncing"              # copying source -> clone, host writes mirrored
    SYNCHRONIZED = "synchronized"    # in sync, host writes mirrored
    FRACTURED = "fractured"          # split: both sides usable, writes tracked
    RESTORING = "restoring"          # copying clone -> source under host I/O


class JobKind(str, enum.Enum):
    SYNC = "sync"
    RESTORE = "restore"


@dataclass
class Throttle:
    """Background copier knobs.

    rate: bytes/s, 0 for unlimited. batch_extents: adjacent extents merged
    into one copy I/O and copied between map commits (dm-clone's
    hydration_batch_size). depth: copy I/Os in flight at once (dm-clone's
    hydration_threshold). host_yield_ms: while host I/O was seen within this
    window the copier copies one extent at a time with a single I/O in
    flight and pauses host_pause_us between copies, so host latency wins
    over restore speed (0 turns the pause off).
    """

    rate: int = 0
    batch_extents: int = 16
    depth: int = 2
    host_yield_ms: int = 20
    host_pause_us: int = 200

    def validate(self) -> None:
        if self.rate < 0:
            raise ValueError("throttle rate must be >= 0 bytes/s")
        if not 1 <= self.batch_extents <= 4096:
            raise ValueError("batch_extents must be 1..4096")
        if not 1 <= self.depth <= 64:
            raise ValueError("depth must be 1..64")
        if not 0 <= self.host_yield_ms <= 10000:
            raise ValueError("host_yield_ms must be 0..10000")
        if not 0 <= self.host_pause_us <= 1_000_000:
            raise ValueError("host_pause_us must be 0..1000000")


@dataclass
class Job:
    kind: JobKind
    protected: bool = True
    total: int = 0                  # extents to copy when the job started
    started_at: float = field(default_factory=time.time)
    paused: bool = False
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "Job":
        return cls(kind=JobKind(d["kind"]), protected=bool(d.get("protected", True)),
                   total=int(d.get("total", 0)), started_at=float(d.get("started_at", 0)),
                   paused=bool(d.get("paused", False)), error=d.get("error"))


@dataclass
class Progress:
    state: str
    job: str | None
    protected: bool | None
    paused: bool
    extents_total: int
    extents_done: int
    bytes_copied: int
    rate: float           # bytes/s over the recent window
    eta: float | None     # seconds
    error: str | None
    delta_extents: int


class Pair:
    def __init__(self, pair_id: str, source: str, clone: str, size: int,
                 extent_size: int, state: PairState) -> None:
        self.id = pair_id
        self.source = source
        self.clone = clone
        self.size = size
        self.extent_size = extent_size
        self.state = state
        n = extent_count(size, extent_size)
        self.nextents = n
        self.delta = ExtentMap(n)
        self.done = ExtentMap(n)
        self.marks = ExtentMap(n)
        self.intent = ExtentMap((n + INTENT_EXTENTS - 1) // INTENT_EXTENTS)
        self.todo = ExtentMap(n)          # memory only: still to copy
        self.inflight = InFlightMap()     # the copy-on-demand map
        self.regionlog = RegionLog(self.marks)
        self.job: Job | None = None
        self.throttle = Throttle()
        self.created_at = time.time()
        self.hold: str | None = None       # refuses I/O and jobs until acknowledged
        self.damaged: str | None = None    # metadata damage widened on load
        # runtime
        self.source_store: BlockStore | None = None
        self.clone_store: BlockStore | None = None
        self.copier = None
        self.bytes_copied = 0
        self.copied_extents = 0
        self.cod_extents = 0              # copied on demand for host I/O (metrics)
        self.cod_wait_seconds = 0.0       # host I/O time spent waiting on those copies
        self._rate_window: list[tuple[float, int]] = []
        self.last_host_io = 0.0
        self.pending_marks: dict[int, int] = {}   # extent -> batch making its mark durable
        self.pending_intent: dict[int, int] = {}  # region -> batch making its bit durable

    # -- record ------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "clone": self.clone,
            "size": self.size, "extent_size": self.extent_size,
            "state": self.state.value, "created_at": self.created_at,
            "job": self.job.to_record() if self.job else None,
            "throttle": asdict(self.throttle),
            HOLD_FIELD: self.hold, DAMAGED_FIELD: self.damaged,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> "Pair":
        p = cls(r["id"], r["source"], r["clone"], int(r["size"]), int(r["extent_size"]),
                PairState(r["state"]))
        p.created_at = float(r.get("created_at", time.time()))
        p.job = Job.from_record(r["job"]) if r.get("job") else None
        t = r.get("throttle") or {}
        p.throttle = Throttle(**{k: int(v) for k, v in t.items() if k in Throttle.__dataclass_fields__})
        p.hold = r.get(HOLD_FIELD)
        p.damaged = r.get(DAMAGED_FIELD)
        return p

    def widen_damaged_chunk(self, name: str, chunk: int) -> str:
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
        if name == "marks" and self.protected_restore:
            # Here a mark means "restored, then written by the host: never
            # copy over it". A host write restores its extent first, so every
            # extent that is not still to restore may carry host data.
            need = self.delta.bits[a:b] & ~self.done.bits[a:b]
            m.bits[a:b] = ~need
            for c in range(a // CHUNK_BITS, (b - 1) // CHUNK_BITS + 1):
                m.mark_chunk_dirty(c)
            return f"every extent {where} not still to restore counts as host-written"
        m.set_range(a, b)
        if name == "intent":
            return f"every region {where} counts as dirty"
        return f"every extent {where} counts as differing"

    def widen_delta_by_intent(self) -> bool:
        """After a crash: every extent of a dirty write-intent region may
        differ. Returns whether there was anything to widen."""
        if not self.intent.any(0, self.intent.nbits):
            return False
        for ra, rb in list(self.intent.runs()):
            self.delta.set_range(ra * INTENT_EXTENTS, min(rb * INTENT_EXTENTS, self.nextents))
        self.intent.clear_all()
        return True

    def map_key(self, name: str) -> str:
        return f"{self.id}/{name}"

    # -- derived -------------------------------------------------------------------
    @property
    def mirroring(self) -> bool:
        """Host writes to the source go to the clone too."""
        if self.state in (PairState.SYNCING, PairState.SYNCHRONIZED):
            return True
        return self.state is PairState.RESTORING and self.job is not None and not self.job.protected

    @property
    def protected_restore(self) -> bool:
        return self.state is PairState.RESTORING and self.job is not None and self.job.protected

    def compute_todo(self) -> None:
        """todo = delta - done (- marks in a protected restore)."""
        bits = self.delta.bits & ~self.done.bits
        if self.protected_restore:
            bits &= ~self.marks.bits
        self.todo = ExtentMap(self.nextents, bits)

    def may_differ(self) -> ExtentMap:
        bits = (self.delta.bits & ~self.done.bits) | self.marks.bits
        return ExtentMap(self.nextents, bits)

    def note_copied(self, nbytes: int, nextents: int) -> None:
        now = time.monotonic()
        self.bytes_copied += nbytes
        self.copied_extents += nextents
        self._rate_window.append((now, nbytes))
        while self._rate_window and now - self._rate_window[0][0] > 5.0:
            self._rate_window.pop(0)

    def progress(self) -> Progress:
        job = self.job
        rate = 0.0
        if len(self._rate_window) >= 2:
            span = self._rate_window[-1][0] - self._rate_window[0][0]
            if span > 0:
                rate = sum(n for _, n in self._rate_window[1:]) / span
        remaining = self.todo.count() if job else 0
        total = job.total if job else 0
        eta = None
        if job and rate > 0:
            eta = remaining * self.extent_size / rate
        return Progress(
            state=self.state.value,
            job=job.kind.value if job else None,
            protected=job.protected if job else None,
            paused=job.paused if job else False,
            extents_total=total,
            extents_done=max(0, total - remaining) if job else 0,
            bytes_copied=self.bytes_copied,
            rate=rate, eta=eta,
            error=job.error if job else None,
            delta_extents=self.may_differ().count(),
        )


class VolumeRuntime:
    """Per-volume runtime state shared by its pairs and its LU I/O path."""

    def __init__(self, name: str, store: BlockStore) -> None:
        self.name = name
        self.store = store
        self.gate = IOGate()
        self.generation = 0
        self.held: str | None = None      # NOT READY reason while a pair of it is held
        self.as_source: list[Pair] = []
        self.as_clone: Pair | None = None
        # Why the volume is offline (image missing, wrong size, deleted or
        # replaced under us), or None. An offline volume answers NOT READY.
        self.offline: str | None = None
