"""What the service remembers of each pair's history, from the engine's
events: when the clone was split off (its point in time), the last sync or
restore and how it ended, and which point in time the source was last
restored from.

`pair show` prints it, and it makes the Ansible `state: restored`
idempotent: once a restore from the clone's current point in time has
finished, the source already holds that point and another run reports ok
(a restore of the same point again needs force). The notes are kept in
the database (persistence.config: pair_notes, crc-checked); a note that
fails its check is history lost, logged and dropped, never data.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from persistence.config import ConfigStore
from restore_core.engine import Engine

log = logging.getLogger(__name__)

#: How a job ended (the words `pair show` and the CLI's --wait use).
RUNNING, FINISHED, FAILED, PAUSED = "running", "finished", "failed", "paused"


class PairJournal:
    def __init__(self, engine: Engine, config: ConfigStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.notes, bad = config.pair_notes()
        for pid in bad:
            log.error("pair %s: its stored history failed its check and is dropped "
                      "(fracture time and last job unknown until the next ones)", pid)
            config.delete_pair_note(pid)
        for pid in set(self.notes) - set(engine.pairs):     # pairs deleted while we were away
            del self.notes[pid]
            config.delete_pair_note(pid)
        engine.listeners.append(self.on_event)

    def note(self, pair_id: str) -> dict[str, Any]:
        """The pair's history: fractured_at (its clone's point in time, or
        None while the clone follows the source), last_job, restored_from,
        current_point_restored."""
        n = self.notes.get(pair_id, {})
        point = n.get("fractured_at")
        return {"fractured_at": point, "last_job": n.get("last_job"),
                "restored_from": n.get("restored_from"),
                # a finished restore copied the clone's current point in time
                "current_point_restored": point is not None and n.get("restored_from") == point}

    # -- engine events ------------------------------------------------------------------
    def on_event(self, event: str, pair_id: str) -> None:
        if event == "pair-deleted":
            if self.notes.pop(pair_id, None) is not None:
                self.config.delete_pair_note(pair_id)
            return
        pair = self.engine.pairs.get(pair_id)
        if pair is None:
            return
        n = dict(self.notes.get(pair_id, {}))
        now = self.clock()
        job = dict(n.get("last_job") or {})
        if event == "pair-created":
            n = {}
            if pair.job is None:                  # created fractured (no sync)
                n["fractured_at"] = now
            else:
                n["last_job"] = {"kind": "sync", "started_at": now, "result": RUNNING}
        elif event == "sync-started":
            n["fractured_at"] = None              # the clone follows the source again
            n["last_job"] = {"kind": "sync", "started_at": now, "result": RUNNING}
        elif event == "fractured":
            n["fractured_at"] = now               # a new point in time
        elif event == "restore-started":
            n["last_job"] = {"kind": "restore", "protected": bool(pair.job.protected),
                             "started_at": now, "result": RUNNING,
                             "from_point": n.get("fractured_at")}
        elif event == "abort-started":
            # the restore is undone: the source no longer holds that point
            n["restored_from"] = None
            n["last_job"] = {"kind": "abort", "started_at": now, "result": RUNNING}
        elif event in ("restore-finished", "sync-finished", "abort-finished"):
            job.update(result=FINISHED, ended_at=now, error=None)
            n["last_job"] = job
            if event == "restore-finished":
                n["restored_from"] = job.get("from_point")
            if pair.state.value == "synchronized":
                n["fractured_at"] = None          # an unprotected restore ends mirrored
        elif event == "job-failed":
            job.update(result=FAILED, error=pair.job.error if pair.job else None)
            n["last_job"] = job
        elif event == "paused" and job:
            n["last_job"] = {**job, "result": PAUSED}
        elif event == "resumed" and job:
            n["last_job"] = {**job, "result": RUNNING, "error": None}
        else:
            return
        self.notes[pair_id] = n
        try:
            self.config.put_pair_note(pair_id, n)
        except Exception as e:  # noqa: BLE001 - history only: never fail the job over it
            log.error("pair %s: could not store its history (%s): %s", pair_id, event, e)
