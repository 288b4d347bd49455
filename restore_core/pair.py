"""A source/clone pair: its state, its job and its maps (restoremaps).
"""
from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, TypeVar

from .blockstore import BlockStore
from .extentmap import extent_count
from .gate import IOGate
from .hostyield import HostYield
from .inflight import InFlightMap
from .instants import INSTANTS_FIELD, instants_of_record
from .metadata import DAMAGED_FIELD, HOLD_FIELD, UNDO_FIELD
from .regionlog import RegionLog
from .restoremaps import RestoreMaps
from .throttle import Throttle

T = TypeVar("T")


class RoutingEpoch:
    """Counts changes of what decides a host command's access and route: a
    pair's state or job, a volume's hold, offline reason, undo role or pair
    membership (the setters below count them, so no change is missed). A
    LU's host I/O path keeps its decision against this count
    (restore_core.volume_io: VolumeIO._routing): recomputed once per change,
    not for every command. Changes are rare; one count for every volume
    keeps a volume's decision right when another volume (its clone) goes
    offline. Who serves a LU's I/O from outside the loop (a direct lease's
    holder) is told of each change (``watch``) instead of polling for it."""
    n = 0
    _watchers: set[Callable[[], None]] = set()

    @classmethod
    def bump(cls) -> None:
        cls.n += 1
        for fn in tuple(cls._watchers):
            fn()

    @classmethod
    def watch(cls, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` (on the loop, where changes are made) after each
        change; returns what stops it."""
        cls._watchers.add(fn)
        return lambda: cls._watchers.discard(fn)


class RoutingField(Generic[T]):
    """A field a LU's host I/O routing depends on: setting it counts the
    change (RoutingEpoch). The value lives in the instance's ``_<name>``
    (hot paths that must not pay for the descriptor read that)."""
    __slots__ = ("attr",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> T:
        if obj is None:
            return self     # type: ignore[return-value]    (the class's own)
        return obj.__dict__[self.attr]      # type: ignore[no-any-return]

    def __set__(self, obj: Any, value: T) -> None:
        obj.__dict__[self.attr] = value
        RoutingEpoch.bump()


class PairState(str, enum.Enum):
    SYNCING = "syncing"              # copying source -> clone, host writes mirrored
    SYNCHRONIZED = "synchronized"    # in sync, host writes mirrored
    FRACTURED = "fractured"          # split: both sides usable, writes tracked
    RESTORING = "restoring"          # copying clone -> source under host I/O
    ABORTING = "aborting"            # putting back a keep-undo restore's saved data


class JobKind(str, enum.Enum):
    SYNC = "sync"
    RESTORE = "restore"
    ABORT = "abort"                  # undo image -> source (restore_core.undo)


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
    # keep-undo: the restore keeps an undo image (abort or commit it), and
    # whether the pair's last restore was aborted (set until its next job)
    undo: bool = False
    aborted: bool = False
    # bytes/s the copier makes with no host I/O, as it last measured (None:
    # not yet); while hosts are busy it keeps min_progress_pct of this
    idle_rate: float | None = None


class Pair:
    # what decides host I/O routing: changes are counted (RoutingEpoch)
    state: RoutingField[PairState] = RoutingField()
    job: RoutingField["Job | None"] = RoutingField()

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
        self.maps = RestoreMaps(n)
        self.inflight = InFlightMap()     # the copy-on-demand map
        self.regionlog = RegionLog(self.maps)
        self.job = None
        self.throttle = Throttle()
        self.created_at = time.time()
        self.hold: str | None = None       # refuses I/O and jobs until acknowledged
        self.damaged: str | None = None    # metadata damage widened on load
        # keep-undo restore: where its undo image is (UNDO_FIELD), until
        # the abort finishes or the admin commits
        self.undo: dict[str, Any] | None = None
        self.aborted = False               # runtime: an abort began since the last job start
        # a fractured pair's instants (restore_core.instants), by side
        # ("source", "clone"): the store's token of the mark it keeps
        self.instants: dict[str, str] = {}
        # runtime
        self.source_store: BlockStore | None = None
        self.clone_store: BlockStore | None = None
        self.undo_store: BlockStore | None = None
        self.copier = None
        self.bytes_copied = 0
        self.copied_extents = 0
        self.cod_extents = 0              # copied on demand for host I/O (metrics)
        self.cod_wait_seconds = 0.0       # host I/O time spent waiting on those copies
        self._rate_window: list[tuple[float, int]] = []
        self.last_host_io = 0.0

    # -- record ------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "clone": self.clone,
            "size": self.size, "extent_size": self.extent_size,
            "state": self.state.value, "created_at": self.created_at,
            "job": self.job.to_record() if self.job else None,
            "throttle": asdict(self.throttle),
            HOLD_FIELD: self.hold, DAMAGED_FIELD: self.damaged,
            UNDO_FIELD: self.undo, INSTANTS_FIELD: dict(self.instants),
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
        undo = r.get(UNDO_FIELD)
        if undo is not None and not isinstance(undo, dict):
            raise ValueError(f"pair {p.id}: bad undo image record {undo!r}")
        p.undo = undo
        p.instants = instants_of_record(r.get(INSTANTS_FIELD))
        return p

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
        """The copier writes the source and never copies over the extents
        hosts wrote (a protected restore, or an abort)."""
        if self.state is PairState.ABORTING:
            return True
        return self.state is PairState.RESTORING and self.job is not None and self.job.protected

    @property
    def to_source(self) -> bool:
        """A job copies into the source under host I/O (restore, abort)."""
        return self._state in (PairState.RESTORING, PairState.ABORTING)

    @property
    def copy_from(self) -> BlockStore | None:
        """The store the job copies from: the undo image during an abort."""
        state = self._state      # (read on every host read of a restoring LU)
        if state is PairState.ABORTING:
            return self.undo_store
        return self.clone_store if state is PairState.RESTORING else self.source_store

    @property
    def tracks_written(self) -> bool:
        """Host writes to the source must be marked in ``written`` (an
        abort keeps them): a keep-undo restore, or its end until commit."""
        return self.undo is not None and self.state in (PairState.RESTORING, PairState.FRACTURED)

    def compute_todo(self) -> None:
        self.maps.start_todo(self.protected_restore, self.state is PairState.ABORTING)

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
        remaining = self.maps.todo_left() if job else 0
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
            delta_extents=self.maps.may_differ().count(),
            undo=self.undo is not None, aborted=self.aborted,
            idle_rate=self.copier.hosts.idle_estimate() if self.copier is not None else None,
        )


class VolumeRuntime:
    """Per-volume runtime state shared by its pairs and its LU I/O path."""

    # What decides the LU's access and route: changes are counted (RoutingEpoch).
    held: RoutingField[str | None] = RoutingField()    # NOT READY reason while a pair of it is held
    as_source: RoutingField["tuple[Pair, ...]"] = RoutingField()    # replaced whole, never changed
    as_clone: RoutingField["Pair | None"] = RoutingField()
    # Why the volume is offline (image missing, wrong size, deleted or
    # replaced under us), or None. An offline volume answers NOT READY.
    offline: RoutingField[str | None] = RoutingField()
    # the pair whose undo image this volume holds: NOT READY to hosts
    undo_of: RoutingField[str | None] = RoutingField()

    def __init__(self, name: str, store: BlockStore) -> None:
        self.name = name
        self.store = store
        self.gate = IOGate()
        self.generation = 0
        self.held = None
        self.as_source = ()
        self.as_clone = None
        self.offline = None
        self.hosts = HostYield()          # the copier's view of this LU's host activity
        self.undo_of = None
