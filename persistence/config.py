"""Configuration kept in the database: volumes, iSCSI targets, settings and
SCSI persistent reservations. Small, rarely written; each call is one
transaction (``Database.transaction``: it advances the generation too)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from .checksum import note_crc
from .db import Database


@dataclass
class VolumeRecord:
    name: str
    path: str
    size: int
    extent_size: int
    kind: str = "file"          # "file" or "blockdev"
    created_at: float = 0.0


class StoredValueError(ValueError):
    """A stored value the daemon cannot read back; names the row and says so
    in one line (the database was edited by hand or by a damaged writer)."""


def _decode(what: str, text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise StoredValueError(f"{what}: the stored value is not valid JSON") from None


class ConfigStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def _db(self):
        return self.database.db

    # -- volumes ------------------------------------------------------------------
    def volumes(self) -> list[VolumeRecord]:
        with self.database.lock:
            return [VolumeRecord(**row) for row in self._db["volumes"].rows_where(order_by="name")]

    def volume(self, name: str) -> VolumeRecord | None:
        with self.database.lock:
            rows = list(self._db["volumes"].rows_where("name = ?", [name]))
        return VolumeRecord(**rows[0]) if rows else None

    def put_volume(self, rec: VolumeRecord) -> None:
        if not rec.created_at:
            rec.created_at = time.time()
        row = asdict(rec)
        with self.database.transaction() as c:
            c.execute(f"INSERT OR REPLACE INTO volumes ({', '.join(row)}) "
                      f"VALUES ({', '.join('?' * len(row))})", list(row.values()))
            self.database.note_volume(rec.name, rec.path)

    def delete_volume(self, name: str) -> None:
        with self.database.transaction() as c:
            c.execute("DELETE FROM volumes WHERE name = ?", (name,))
            self.database.note_volume(name, None)

    # -- iSCSI targets ---------------------------------------------------------------
    def targets(self) -> dict[str, dict[str, Any]]:
        with self.database.lock:
            rows = list(self._db["targets"].rows)
        return {r["iqn"]: _decode(f"target {r['iqn']}", r["config"]) for r in rows}

    def put_target(self, iqn: str, config: dict[str, Any]) -> None:
        with self.database.transaction() as c:
            c.execute("INSERT OR REPLACE INTO targets (iqn, config) VALUES (?, ?)",
                      (iqn, json.dumps(config, sort_keys=True)))

    def delete_target(self, iqn: str) -> None:
        with self.database.transaction() as c:
            c.execute("DELETE FROM targets WHERE iqn = ?", (iqn,))

    # -- settings ------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        with self.database.lock:
            rows = list(self._db["settings"].rows_where("key = ?", [key]))
        return _decode(f"setting {key}", rows[0]["value"]) if rows else default

    def set(self, key: str, value: Any) -> None:
        self.set_many({key: value})

    def set_many(self, values: dict[str, Any]) -> None:
        """Several settings in one transaction: all of them or none."""
        rows = [(key, json.dumps(value)) for key, value in values.items()]
        with self.database.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", rows)

    # -- pair notes ------------------------------------------------------------------------
    def pair_notes(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Every pair's note, and the ids of those that failed their check
        (left out: a note is history, never needed to keep data safe)."""
        with self.database.lock:
            rows = list(self._db["pair_notes"].rows)
        good: dict[str, dict[str, Any]] = {}
        bad: list[str] = []
        for r in rows:
            try:
                note = json.loads(r["note"]) if note_crc(r["id"], r["note"]) == r["crc"] else None
            except ValueError:
                note = None
            if isinstance(note, dict):
                good[r["id"]] = note
            else:
                bad.append(r["id"])
        return good, bad

    def put_pair_note(self, pair_id: str, note: dict[str, Any]) -> None:
        text = json.dumps(note, sort_keys=True)
        with self.database.transaction() as c:
            c.execute("INSERT OR REPLACE INTO pair_notes (id, note, crc) VALUES (?, ?, ?)",
                      (pair_id, text, note_crc(pair_id, text)))

    def delete_pair_note(self, pair_id: str) -> None:
        with self.database.transaction() as c:
            c.execute("DELETE FROM pair_notes WHERE id = ?", (pair_id,))

    # -- persistent reservations ---------------------------------------------------------
    def reservation_state(self, device: str) -> dict[str, Any]:
        with self.database.lock:
            rows = list(self._db["reservations"].rows_where("device = ?", [device]))
        return json.loads(rows[0]["state"]) if rows else {}

    def put_reservation_state(self, device: str, state: dict[str, Any]) -> None:
        with self.database.transaction() as c:
            c.execute("INSERT OR REPLACE INTO reservations (device, state) VALUES (?, ?)",
                      (device, json.dumps(state, sort_keys=True)))


class SqliteReservationStore:
    """The SCSI layer's ReservationStore (load/save) for one device."""

    def __init__(self, config: ConfigStore, device: str) -> None:
        self.config = config
        self.device = device

    def load(self) -> dict[str, Any]:
        return self.config.reservation_state(self.device)

    def save(self, state: dict[str, Any]) -> None:
        self.config.put_reservation_state(self.device, state)
