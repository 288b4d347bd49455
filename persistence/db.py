"""The liverestore SQLite database: opening, checking, migrating.

One file holds everything that must survive a crash: volumes, pairs, their
extent maps (chunked bitmap blobs), restore progress, exports, SCSI
persistent reservations and settings. WAL mode with synchronous=FULL: a
commit is on disk when it returns, and readers never block the writer.

Opening refuses, with a message an operator can act on and without writing
anything, a missing file (unless asked to create one), a file that is not a
liverestore database, a corrupt one, and one from a newer liverestore.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from typing import Callable

import sqlite_utils

from restore_core.metadata import MetadataError

APPLICATION_ID = 0x4C525354          # "LRST" in the SQLite header
SCHEMA_VERSION = 1


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


# Migration N takes a database at version N-1 to version N.
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _v1}


class Database:
    def __init__(self, path: str, *, create: bool = False) -> None:
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
