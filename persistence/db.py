"""The liverestore SQLite database: opening, checking, migrating.

One file holds everything that must survive a crash: volumes, pairs, their
extent maps (chunked bitmap blobs), restore progress, consistency groups,
exports, SCSI persistent reservations and settings. WAL mode with synchronous=FULL: a
commit is on disk when it returns, and readers never block the writer.

Opening refuses, with a message an operator can act on and without writing
anything, a missing file (unless asked to create one), a file that is not a
liverestore database, a corrupt one, and one from a newer liverestore.

Every write goes through ``transaction()``, which also advances the
database's generation and then rewrites the generation file (see
persistence.generation); opening a database older than that file puts the
pairs that changed since on hold (see ``HOLD_FIELD``) in one transaction.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import sqlite_utils

from restore_core.metadata import HOLD_FIELD, MetadataError

from .checksum import chunk_crc, record_crc
from .generation import FILE_NAME, GenerationFile, GenerationRecord, Rollback

log = logging.getLogger(__name__)

APPLICATION_ID = 0x4C525354          # "LRST" in the SQLite header
SCHEMA_VERSION = 4
ROLLBACK_KEY = "rollback"            # state row: the last rollback found (for status)


class DatabaseError(MetadataError):
    """The database cannot be used; the message says why and what to do."""


def _v1(db: sqlite_utils.Database) -> None:
    db["settings"].create({"key": str, "value": str}, pk="key")
    db["volumes"].create({"name": str, "path": str, "size": int, "extent_size": int,
                          "kind": str, "created_at": float}, pk="name")
    db["pairs"].create({"id": str, "record": str}, pk="id")
    db["map_chunks"].create({"map_key": str, "chunk": int, "blob": bytes},
                            pk=("map_key", "chunk"))
    db["targets"].create({"iqn": str, "config": str}, pk="iqn")
    db["reservations"].create({"device": str, "state": str}, pk="device")


def _v2(db: sqlite_utils.Database) -> None:
    """Checksums on map chunks and pair records; the generation counter."""
    c = db.conn
    c.execute("ALTER TABLE map_chunks ADD COLUMN crc INTEGER")
    c.execute("ALTER TABLE pairs ADD COLUMN crc INTEGER")
    c.executemany("UPDATE map_chunks SET crc = ? WHERE map_key = ? AND chunk = ?",
                  [(chunk_crc(k, n, bytes(b)), k, n) for k, n, b in
                   c.execute("SELECT map_key, chunk, blob FROM map_chunks").fetchall()])
    c.executemany("UPDATE pairs SET crc = ? WHERE id = ?",
                  [(record_crc(i, r), i) for i, r in
                   c.execute("SELECT id, record FROM pairs").fetchall()])
    c.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    c.execute("INSERT INTO state (key, value) VALUES ('generation', '0')")


def _v3(db: sqlite_utils.Database) -> None:
    """Pair notes: what the service remembers of a pair's history (its clone's
    point in time, the last job and its result, the point last restored
    from), each with a crc32c like the pair records."""
    db.conn.execute("CREATE TABLE pair_notes (id TEXT PRIMARY KEY, note TEXT NOT NULL, "
                    "crc INTEGER NOT NULL)")


def _v4(db: sqlite_utils.Database) -> None:
    """Consistency groups: a record (name, member pairs) with its checksum."""
    db.conn.execute("CREATE TABLE groups (name TEXT PRIMARY KEY, record TEXT NOT NULL, "
                    "crc INTEGER NOT NULL)")


# Migration N takes a database at version N-1 to version N.
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4}


class Database:
    def __init__(self, path: str, *, create: bool = False,
                 generation_path: str | None = None) -> None:
        self.path = path
        exists = os.path.exists(path)
        if not exists and not create:
            raise DatabaseError(
                f"no liverestore database at {path}; start with --init to create a new one "
                "(if one existed, restore it from backup: volumes and pairs are described there)")
        if exists:
            _check_header(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        except sqlite3.Error as e:
            raise DatabaseError(f"cannot open database {path}: {e}") from e
        self.conn = conn
        self.lock = threading.RLock()
        try:
            self._prepare(exists)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise DatabaseError(f"database {path} is corrupt or unreadable: {e}; "
                                "restore it from backup") from e
        except DatabaseError:
            conn.close()
            raise
        self.db = sqlite_utils.Database(conn)
        self.genfile = GenerationFile(generation_path or
                                      os.path.join(os.path.dirname(os.path.abspath(path)),
                                                   FILE_NAME))
        self.rollback: Rollback | None = None
        try:
            self._load_generations()
        except sqlite3.Error as e:
            conn.close()
            raise DatabaseError(f"cannot read the generation of {path}: {e}") from e

    # -- generations ----------------------------------------------------------------
    def _load_generations(self) -> None:
        c = self.conn
        self.generation = int(c.execute(
            "SELECT value FROM state WHERE key = 'generation'").fetchone()[0])
        pair_ids = [r[0] for r in c.execute("SELECT id FROM pairs")]
        self.volumes = {n: p for n, p in c.execute("SELECT name, path FROM volumes")}
        rec = self.genfile.read()
        if rec is not None and rec.generation > self.generation:
            self._on_rollback(Rollback(self.generation, rec.generation, rec.pairs, rec.volumes),
                              pair_ids)
            return
        # A pair whose last commit is unknown counts as changed at the current
        # generation: a later rollback then holds it rather than miss it.
        known = rec.pairs if rec is not None and rec.generation == self.generation else {}
        self.pair_generations = {p: known.get(p, self.generation) for p in pair_ids}
        if rec is None or rec.generation != self.generation:
            self._publish()

    def _on_rollback(self, rb: Rollback, pair_ids: list[str]) -> None:
        """Hold every pair that changed after the database's generation, note
        the volumes it forgot, and move past the file's generation -- all in
        one transaction, so a crash here finds the same rollback again."""
        self.rollback = rb
        held = rb.affected_pairs(pair_ids)
        vanished = rb.vanished_volumes(list(self.volumes))
        gone_pairs = rb.vanished_pairs(pair_ids)
        back = rb.resurrected_volumes(self.volumes)
        why = rb.describe()
        log.error("%s", why)
        for pid in held:
            log.error("pair %s changed after generation %d: it is held (its LUs answer NOT "
                      "READY) until 'liverestore pair acknowledge %s'", pid, rb.db_generation, pid)
        for name, path in vanished.items():
            log.error("volume %s (image %s) is missing from the rolled-back database: "
                      "re-create it with that --path to adopt the image", name, path)
        for name, path in back.items():
            log.error("volume %s (image %s) had been deleted but is back in the rolled-back "
                      "database: delete it again if its image is in other use", name, path)
        for pid in gone_pairs:
            log.error("pair %s is missing from the rolled-back database: re-create it "
                      "(a full sync)", pid)
        report = {"message": why, "found_at": time.time(),
                  "db_generation": rb.db_generation, "file_generation": rb.file_generation,
                  "held_pairs": held, "vanished_pairs": gone_pairs, "vanished_volumes": vanished,
                  "resurrected_volumes": back}
        self.generation = rb.file_generation      # the next commit moves past the file
        self.pair_generations = {p: rb.file_pairs.get(p, rb.file_generation) for p in pair_ids}
        with self.transaction() as c:
            for pid in held:
                text = c.execute("SELECT record FROM pairs WHERE id = ?", (pid,)).fetchone()[0]
                try:
                    rec = json.loads(text)
                except ValueError:
                    continue        # the store reports the unreadable record on load
                rec[HOLD_FIELD] = f"{why}; the pair changed after generation {rb.db_generation}"
                self.put_pair_record(c, pid, rec)
            c.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                      (ROLLBACK_KEY, json.dumps(report, sort_keys=True)))

    def rollback_report(self) -> dict[str, Any] | None:
        """The last rollback found (persisted: it outlives restarts)."""
        with self.lock:
            row = self.conn.execute("SELECT value FROM state WHERE key = ?",
                                    (ROLLBACK_KEY,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_pair_record(self, c: sqlite3.Connection, pid: str, rec: dict[str, Any]) -> None:
        """Write a pair record with its checksum (inside ``transaction``)."""
        text = json.dumps(rec, sort_keys=True)
        c.execute("INSERT OR REPLACE INTO pairs (id, record, crc) VALUES (?, ?, ?)",
                  (pid, text, record_crc(pid, text)))
        self._touched_pairs[pid] = True

    def delete_pair_rows(self, c: sqlite3.Connection, pid: str) -> None:
        c.execute("DELETE FROM pairs WHERE id = ?", (pid,))
        c.execute("DELETE FROM map_chunks WHERE map_key LIKE ? ESCAPE '\\'",
                  (_like_prefix(pid + "/"),))
        self._touched_pairs[pid] = False

    def note_pair_change(self, pid: str) -> None:
        """A map of pair ``pid`` changed in the current transaction."""
        self._touched_pairs.setdefault(pid, True)

    def note_volume(self, name: str, path: str | None) -> None:
        """Volume ``name`` was put (path) or deleted (None) in this transaction."""
        self._touched_volumes[name] = path

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that also advances the generation; the
        generation file follows once it is committed."""
        with self.lock:
            c = self.conn
            self._touched_pairs: dict[str, bool] = {}
            self._touched_volumes: dict[str, str | None] = {}
            c.execute("BEGIN IMMEDIATE")
            try:
                # Read, not only remembered: another connection (a CLI tool,
                # a test) may have committed since; after a rollback the
                # remembered value is the file's, ahead of the database.
                stored = int(c.execute(
                    "SELECT value FROM state WHERE key = 'generation'").fetchone()[0])
                gen = max(self.generation, stored) + 1
                yield c
                c.execute("UPDATE state SET value = ? WHERE key = 'generation'", (str(gen),))
                c.execute("COMMIT")
            except BaseException:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            self.generation = gen
            for pid, alive in self._touched_pairs.items():
                if alive:
                    self.pair_generations[pid] = gen
                else:
                    self.pair_generations.pop(pid, None)
            for name, path in self._touched_volumes.items():
                if path is None:
                    self.volumes.pop(name, None)
                else:
                    self.volumes[name] = path
            self._publish()

    def _publish(self) -> None:
        self.genfile.write(GenerationRecord(self.generation, dict(self.pair_generations),
                                            dict(self.volumes)))

    def _prepare(self, existed: bool) -> None:
        c = self.conn
        if existed:
            app = c.execute("PRAGMA application_id").fetchone()[0]
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if app != APPLICATION_ID:
                raise DatabaseError(f"{self.path} is not a liverestore database")
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    f"{self.path} has schema version {version}, newer than this liverestore "
                    f"understands ({SCHEMA_VERSION}); upgrade liverestore")
            ok = c.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise DatabaseError(f"database {self.path} failed its integrity check: {ok}; "
                                    "restore it from backup")
        else:
            version = 0
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        if version < SCHEMA_VERSION:
            db = sqlite_utils.Database(c)
            c.execute("BEGIN IMMEDIATE")
            try:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[v](db)
                c.execute(f"PRAGMA application_id={APPLICATION_ID}")
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self.lock:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            genfile = getattr(self, "genfile", None)
            if genfile is not None:
                genfile.close()


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _check_header(path: str) -> None:
    """Refuse non-SQLite files before sqlite3 would try to 'repair' anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as e:
        raise DatabaseError(f"cannot read database {path}: {e}") from e
    if len(head) == 0:
        raise DatabaseError(f"database {path} is empty (0 bytes); restore it from backup "
                            "or remove it and start with --init")
    if not head.startswith(b"SQLite format 3\x00"):
        raise DatabaseError(f"{path} is not an SQLite database (corrupt header); "
                            "restore it from backup")
