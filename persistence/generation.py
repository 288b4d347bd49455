"""The generation file: notices a database that went back in time.

Every metadata transaction increments a generation counter stored in the
database. After each commit the new generation, the generation of each
pair's last commit and the volume names (with their image paths) are
written to a small file in the state directory -- by the committing thread,
without fsync: a kill -9 keeps page-cache writes, and with synchronous=FULL
a power cut cannot take back a committed WAL frame. What can is someone
deleting the ``-wal`` file (or restoring an old copy of the database): the
database then reports an older generation than the file, and the file says
which pairs changed after the database's generation and which volumes the
database no longer knows.

A torn or unreadable file only loses this check until the next commit
rewrites it; it never stops the service. A missing file on an existing
database (an upgrade from a version without it) is not a rollback.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from crc32c import crc32c

log = logging.getLogger(__name__)

MAGIC = "LRGEN1"
FILE_NAME = "generation"


class GenerationFileError(Exception):
    """The file is torn or not a generation file."""


@dataclass
class GenerationRecord:
    generation: int
    pairs: dict[str, int] = field(default_factory=dict)     # pair id -> generation of last commit
    volumes: dict[str, str] = field(default_factory=dict)   # volume name -> image path

    def encode(self) -> bytes:
        body = json.dumps({"generation": self.generation, "pairs": self.pairs,
                           "volumes": self.volumes}, sort_keys=True).encode()
        # Length and crc first: the file is overwritten in place, so a
        # shorter record leaves old bytes behind it until the truncate.
        return f"{MAGIC} {len(body)} {crc32c(body):08x}\n".encode() + body

    @classmethod
    def decode(cls, data: bytes) -> "GenerationRecord":
        head, sep, rest = data.partition(b"\n")
        parts = head.split(b" ")
        if not sep or len(parts) != 3 or parts[0] != MAGIC.encode():
            raise GenerationFileError("no generation header")
        try:
            length, crc = int(parts[1]), int(parts[2], 16)
        except ValueError:
            raise GenerationFileError("bad generation header") from None
        body = rest[:length]
        if len(body) != length or crc32c(body) != crc:
            raise GenerationFileError("torn generation record (checksum mismatch)")
        try:
            d = json.loads(body)
            return cls(int(d["generation"]), {str(k): int(v) for k, v in d["pairs"].items()},
                       {str(k): str(v) for k, v in d["volumes"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GenerationFileError(f"bad generation record: {e}") from None


@dataclass
class Rollback:
    """The database is older than the generation file says it should be."""

    db_generation: int
    file_generation: int
    file_pairs: dict[str, int]
    file_volumes: dict[str, str]

    def affected_pairs(self, db_pairs: list[str]) -> list[str]:
        """Pairs in the database that changed after its generation (or
        were deleted since): their maps may claim less than differs."""
        return sorted(p for p in db_pairs
                      if self.file_pairs.get(p, self.file_generation) > self.db_generation)

    def vanished_pairs(self, db_pairs: list[str]) -> list[str]:
        return sorted(set(self.file_pairs) - set(db_pairs))

    def vanished_volumes(self, db_volumes: list[str]) -> dict[str, str]:
        return {n: p for n, p in sorted(self.file_volumes.items()) if n not in db_volumes}

    def resurrected_volumes(self, db_volumes: dict[str, str]) -> dict[str, str]:
        """Volumes deleted after the database's generation: it still has them."""
        return {n: p for n, p in sorted(db_volumes.items()) if n not in self.file_volumes}

    def describe(self) -> str:
        return (f"the database was rolled back from generation {self.file_generation} to "
                f"{self.db_generation} (its -wal file was lost, or an older copy was restored)")


class GenerationFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._len = 0
        self._warned = False

    def read(self) -> GenerationRecord | None:
        """The record, or None when there is none usable (missing: silently;
        torn or unreadable: with one warning)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(16 << 20)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn(f"cannot read generation file {self.path}: {e.strerror or e}; "
                       "rollback detection is off until it is rewritten")
            return None
        try:
            return GenerationRecord.decode(data)
        except GenerationFileError as e:
            self._warn(f"generation file {self.path}: {e}; ignoring it and rewriting it "
                       "at the next commit")
            return None

    def write(self, rec: GenerationRecord) -> None:
        """Overwrite in place (no fsync: see the module docstring). Errors are
        logged once and otherwise ignored: the commit itself is durable."""
        data = rec.encode()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._len = os.fstat(self._fd).st_size
            os.pwrite(self._fd, data, 0)
            if len(data) < self._len:
                os.ftruncate(self._fd, len(data))
            self._len = len(data)
        except OSError as e:
            self._warn(f"cannot write generation file {self.path}: {e.strerror or e}; "
                       "a rolled-back database may go unnoticed")

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s", message)
