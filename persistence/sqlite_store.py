"""The engine's MetadataStore on SQLite: pair records and map chunks.

``commit`` applies one engine batch (all map chunks and pair records changed
since the last batch) in a single transaction, so group commit costs one WAL
fsync however many host writes share the batch.

Every chunk and record is stored with its checksum (persistence.checksum)
and verified on ``load``: a chunk that fails is left out of the snapshot and
listed in ``Snapshot.damaged`` for the engine to widen; a record that fails
but still parses is loaded on hold (``HOLD_FIELD``), since none of its
fields can be trusted to decide what is safe.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from restore_core.metadata import DAMAGED_FIELD, HOLD_FIELD, MetadataStore, Snapshot, Transaction

from .checksum import chunk_crc, record_crc
from .db import Database, DatabaseError

log = logging.getLogger(__name__)


class SqliteMetadataStore(MetadataStore):
    def __init__(self, database: Database) -> None:
        self.database = database

    def load(self) -> Snapshot:
        d = self.database
        pairs: dict[str, dict[str, Any]] = {}
        maps: dict[str, dict[int, bytes]] = {}
        damaged: dict[str, list[int]] = {}
        with d.lock:
            try:
                for pid, text, crc in d.conn.execute("SELECT id, record, crc FROM pairs"):
                    rec = _load_record(d.path, pid, text, crc)
                    if rec is not None:
                        pairs[pid] = rec
                for key, chunk, blob, crc in d.conn.execute(
                        "SELECT map_key, chunk, blob, crc FROM map_chunks"):
                    blob = bytes(blob)
                    if crc is None or chunk_crc(key, chunk, blob) != crc:
                        damaged.setdefault(key, []).append(chunk)
                    else:
                        maps.setdefault(key, {})[chunk] = blob
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot read pairs from {d.path}: {e}") from e
        return Snapshot(pairs, maps, {k: sorted(v) for k, v in damaged.items()})

    def commit(self, txn: Transaction) -> None:
        d = self.database
        try:
            with d.transaction() as c:
                for pid, rec in txn.pairs.items():
                    if rec is None:
                        d.delete_pair_rows(c, pid)
                    else:
                        d.put_pair_record(c, pid, rec)
                upserts = []
                deletes = []
                for key, chunks in txn.maps.items():
                    d.note_pair_change(key.split("/", 1)[0])
                    for chunk, blob in chunks.items():
                        if blob is None:
                            deletes.append((key, chunk))
                        else:
                            upserts.append((key, chunk, blob, chunk_crc(key, chunk, blob)))
                if upserts:
                    c.executemany("INSERT OR REPLACE INTO map_chunks (map_key, chunk, blob, crc) "
                                  "VALUES (?, ?, ?, ?)", upserts)
                if deletes:
                    c.executemany("DELETE FROM map_chunks WHERE map_key = ? AND chunk = ?",
                                  deletes)
        except sqlite3.Error as e:
            raise DatabaseError(f"metadata commit to {d.path} failed: {e}") from e


def _load_record(path: str, pid: str, text: str, crc: int | None) -> dict[str, Any] | None:
    """The pair record; on a checksum mismatch it comes back on hold, and
    when it does not even parse the pair cannot be loaded at all."""
    ok = crc is not None and record_crc(pid, text) == crc
    try:
        rec = json.loads(text)
        if not isinstance(rec, dict) or rec.get("id") != pid:
            raise ValueError("not this pair's record")
    except ValueError as e:
        if ok:
            raise DatabaseError(f"cannot read pair {pid} from {path}: {e}") from e
        log.error("pair %s: its record in %s failed its checksum and cannot be read (%s); "
                  "the pair is not loaded: re-create it (a full sync)", pid, path, e)
        return None
    if not ok:
        log.error("pair %s: its record in %s failed its checksum; the pair is held until "
                  "'liverestore pair acknowledge %s'", pid, path, pid)
        rec[HOLD_FIELD] = "its database record failed its checksum"
        rec[DAMAGED_FIELD] = "pair record failed its checksum"
    return rec
