"""Unit attention conditions, queued per I_T nexus (SAM-5 5.14).

Each I_T nexus that has talked to the LU has its own FIFO. A nexus seen for
the first time starts with POWER ON, RESET OR BUS DEVICE RESET OCCURRED, so
every host learns that whatever it cached about this LU is stale. Events
(resets, generation or capacity changes, PR preemption, mode changes) are
queued on the nexuses they concern; the device reports and pops one per
command that is not exempt (INQUIRY, REPORT LUNS; REQUEST SENSE returns it
as parameter data instead of CHECK CONDITION).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Iterable

from . import constants as c

NexusKey = Hashable
_MAX_QUEUED = 16     # a nexus that never polls must not grow without bound


class UnitAttentions:
    def __init__(self) -> None:
        self._queues: dict[NexusKey, deque[tuple[int, int]]] = {}
        #: called after a UA is queued on nexuses that may not know yet
        #: (ScsiDevice.route_changed: a transport answering plain READs
        #: itself must stop before their next command)
        self.on_queue: Callable[[], None] | None = None

    def known(self, key: NexusKey) -> bool:
        return key in self._queues

    def nexuses(self) -> list[NexusKey]:
        return list(self._queues)

    def register(self, key: NexusKey) -> deque[tuple[int, int]]:
        """The nexus's queue (kept for its life: pop from it directly); on
        its first command a nexus starts with a power-on/reset UA."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque([c.ASC_POWER_ON_RESET])
        return q

    def forget(self, key: NexusKey) -> None:
        self._queues.pop(key, None)

    def establish(self, asc_ascq: tuple[int, int], keys: Iterable[NexusKey] | None = None,
                  *, exclude: NexusKey | None = None) -> None:
        """Queue a UA on the given nexuses (default: every known one)."""
        queued = False
        for key in list(self._queues) if keys is None else keys:
            if key == exclude:
                continue
            q = self._queues.get(key)
            if q is None:
                continue   # an unknown nexus gets the power-on UA anyway
            if asc_ascq in q:
                continue   # one pending instance says it all
            if len(q) >= _MAX_QUEUED:
                q.popleft()
            q.append(asc_ascq)
            queued = True
        if queued and self.on_queue is not None:
            self.on_queue()

    def reset(self, asc_ascq: tuple[int, int]) -> None:
        """A reset supersedes whatever was pending: it is the one thing to report."""
        for q in self._queues.values():
            q.clear()
            q.append(asc_ascq)
        if self.on_queue is not None:
            self.on_queue()

    def pop(self, key: NexusKey) -> tuple[int, int] | None:
        q = self._queues.get(key)
        if q:
            return q.popleft()
        return None

    def pending(self, key: NexusKey) -> list[tuple[int, int]]:
        return list(self._queues.get(key, ()))

    def clear(self, key: NexusKey, asc_ascq: tuple[int, int]) -> None:
        q = self._queues.get(key)
        if q and asc_ascq in q:
            q.remove(asc_ascq)
