"""The engine's MetadataStore on SQLite: pair records and map chunks.

``commit`` applies one engine batch (all map chunks and pair records changed
since the last batch) in a single transaction, so group commit costs one WAL
fsync however many host writes share the batch.
"""
from __future__ import annotations

import json
import sqlite3

from restore_core.metadata import MetadataStore, Snapshot, Transaction

from .db import Database, DatabaseError


class SqliteMetadataStore(MetadataStore):
    def __init__(self, database: Database) -> None:
        self.database = database

    def load(self) -> Snapshot:
        d = self.database
        with d.lock:
            try:
                pairs = {pid: json.loads(rec) for pid, rec in
                         d.conn.execute("SELECT id, record FROM pairs")}
                maps: dict[str, dict[int, bytes]] = {}
                for key, chunk, blob in d.conn.execute(
                        "SELECT map_key, chunk, blob FROM map_chunks"):
                    maps.setdefault(key, {})[chunk] = bytes(blob)
            except (sqlite3.Error, ValueError) as e:
                raise DatabaseError(f"cannot read pairs from {d.path}: {e}") from e
        return Snapshot(pairs, maps)

    def commit(self, txn: Transaction) -> None:
        d = self.database
        c = d.conn
        with d.lock:
            try:
                c.execute("BEGIN IMMEDIATE")
                for pid, rec in txn.pairs.items():
                    if rec is None:
                        c.execute("DELETE FROM pairs WHERE id = ?", (pid,))
                        c.execute("DELETE FROM map_chunks WHERE map_key LIKE ? ESCAPE '\\'",
                                  (_like_prefix(pid + "/"),))
                    else:
                        c.execute("INSERT OR REPLACE INTO pairs (id, record) VALUES (?, ?)",
                                  (pid, json.dumps(rec, sort_keys=True)))
                upserts = []
                deletes = []
                for key, chunks in txn.maps.items():
                    for chunk, blob in chunks.items():
                        if blob is None:
                            deletes.append((key, chunk))
                        else:
                            upserts.append((key, chunk, blob))
                if upserts:
                    c.executemany("INSERT OR REPLACE INTO map_chunks (map_key, chunk, blob) "
                                  "VALUES (?, ?, ?)", upserts)
                if deletes:
                    c.executemany("DELETE FROM map_chunks WHERE map_key = ? AND chunk = ?", deletes)
                c.execute("COMMIT")
            except BaseException as e:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(e, sqlite3.Error):
                    raise DatabaseError(f"metadata commit to {d.path} failed: {e}") from e
                raise


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
