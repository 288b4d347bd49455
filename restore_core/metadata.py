"""What the engine needs from a metadata store, and an in-memory one.

The engine never talks SQL: it hands the store a Transaction (changed map
chunks + changed pair records) and the store applies it atomically and
durably before ``commit`` returns. ``persistence.sqlite_store`` is the real
implementation; ``MemoryMetadataStore`` serves tests and the crash models.
"""
from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

# A chunk blob of exactly this value means "every bit set": a full sync of a
# 64 TiB LU must not write 128 MiB of 0xff to start. Empty, because a real
# chunk with any bit set is at least one byte long (an all-zero chunk is
# not stored at all).
ALL_ONES = b""

# Pair record field naming why the pair must not serve until the admin
# acknowledges (a rolled-back database, a pair record that failed its
# checksum). The store sets it; the engine clears it on acknowledge.
HOLD_FIELD = "hold"
# Pair record field naming metadata damage found on load; the extents it
# could hide were widened to "differ". Cleared when the next job completes.
DAMAGED_FIELD = "damaged"
# Pair record field naming a keep-undo restore's undo image (restore_core.undo).
UNDO_FIELD = "undo"


class MetadataError(Exception):
    """The metadata store is unusable (corrupt, missing, newer schema, I/O)."""


@dataclass
class Transaction:
    # map key ("<pair id>/<map name>") -> chunk index -> blob (None: all zero)
    maps: dict[str, dict[int, bytes | None]] = field(default_factory=dict)
    # pair id -> JSON-serialisable record, or None to delete the pair
    pairs: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def empty(self) -> bool:
        return not self.maps and not self.pairs


@dataclass
class Snapshot:
    pairs: dict[str, dict[str, Any]]
    maps: dict[str, dict[int, bytes]]
    # map key -> chunks that failed their checksum (absent from ``maps``):
    # the engine widens them to the safe side and rewrites them.
    damaged: dict[str, list[int]] = field(default_factory=dict)


class MetadataStore(ABC):
    # True for stores whose commit never blocks (RAM): the committer calls
    # them inline, which also makes test interleavings deterministic.
    inline = False

    @abstractmethod
    def load(self) -> Snapshot:
        """Everything persisted (called once at start)."""

    @abstractmethod
    def commit(self, txn: Transaction) -> None:
        """Apply txn atomically; durable when this returns. Blocking."""

    def close(self) -> None:
        pass


class MemoryMetadataStore(MetadataStore):
    """Atomic, 'durable' on commit; nothing else survives a simulated crash."""

    inline = True

    def __init__(self) -> None:
        self._pairs: dict[str, dict[str, Any]] = {}
        self._maps: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()
        self.commits = 0
        self.fail_next = 0     # make the next N commits raise (I/O error tests)

    def load(self) -> Snapshot:
        with self._lock:
            return Snapshot(copy.deepcopy(self._pairs),
                            {k: dict(v) for k, v in self._maps.items()})

    def commit(self, txn: Transaction) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise MetadataError("injected metadata commit failure")
            for pid, rec in txn.pairs.items():
                if rec is None:
                    self._pairs.pop(pid, None)
                    prefix = pid + "/"
                    for k in [k for k in self._maps if k.startswith(prefix)]:
                        del self._maps[k]
                else:
                    self._pairs[pid] = copy.deepcopy(rec)
            for key, chunks in txn.maps.items():
                m = self._maps.setdefault(key, {})
                for c, blob in chunks.items():
                    if blob is None:
                        m.pop(c, None)
                    else:
                        m[c] = bytes(blob)
            self.commits += 1
