"""Consistency group records in SQLite (restore_core.groups.GroupStore).

One row per group: its JSON record and a crc32c over name and record
(persistence.checksum), written through ``Database.transaction`` so each
change advances the generation like every other. A record that fails its
checksum but parses is loaded marked damaged (the group then allows only
show and delete); one that does not parse is left out with an ERROR line.
A rolled-back database (persistence.generation) may hold an older
membership: groups are not held like pairs, since membership decides which
pairs move together, never which extents are safe to serve.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from restore_core.groups import GroupStore
from restore_core.metadata import DAMAGED_FIELD

from .checksum import group_crc
from .db import Database, DatabaseError

log = logging.getLogger(__name__)


class SqliteGroupStore(GroupStore):
    def __init__(self, database: Database) -> None:
        self.database = database

    def load(self) -> dict[str, dict[str, Any]]:
        d = self.database
        out: dict[str, dict[str, Any]] = {}
        with d.lock:
            try:
                rows = d.conn.execute("SELECT name, record, crc FROM groups").fetchall()
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot read groups from {d.path}: {e}") from e
        for name, text, crc in rows:
            try:
                rec = json.loads(text)
                if not isinstance(rec, dict) or rec.get("name") != name \
                        or not isinstance(rec.get("pairs"), list):
                    raise ValueError("not this group's record")
            except ValueError as e:
                log.error("group %s: its record in %s cannot be read (%s); the group is left "
                          "out and its pairs are free: create it again", name, d.path, e)
                continue
            if group_crc(name, text) != crc:
                log.error("group %s: its record in %s failed its checksum", name, d.path)
                rec[DAMAGED_FIELD] = ("its database record failed its checksum, so its "
                                      "members may be wrong")
            out[name] = rec
        return out

    def put(self, name: str, record: dict[str, Any] | None) -> None:
        d = self.database
        try:
            with d.transaction() as c:
                if record is None:
                    c.execute("DELETE FROM groups WHERE name = ?", (name,))
                else:
                    text = json.dumps(record, sort_keys=True)
                    c.execute("INSERT OR REPLACE INTO groups (name, record, crc) VALUES (?, ?, ?)",
                              (name, text, group_crc(name, text)))
        except sqlite3.Error as e:
            raise DatabaseError(f"group change in {d.path} failed: {e}") from e
