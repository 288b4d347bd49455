"""Checksums of what the database stores for the engine.

SQLite's own checks (quick_check) see the b-tree, not the bytes inside a
row: a flipped bit in a map chunk blob or a pair record passes them and
silently hides extents that differ. Each map chunk, pair record and group
record therefore carries a crc32c over its key and content; the key is
included so a row that ends up under another key does not verify either.
"""
from __future__ import annotations

from crc32c import crc32c


def chunk_crc(map_key: str, chunk: int, blob: bytes) -> int:
    return crc32c(blob, crc32c(f"chunk\0{map_key}\0{chunk}\0".encode()))


def record_crc(pair_id: str, record_json: str) -> int:
    return crc32c(record_json.encode(), crc32c(f"pair\0{pair_id}\0".encode()))


def note_crc(pair_id: str, note_json: str) -> int:
    """A pair's note (its history: fracture time, last job, last restore)."""
    return crc32c(note_json.encode(), crc32c(f"note\0{pair_id}\0".encode()))


def group_crc(name: str, record_json: str) -> int:
    return crc32c(record_json.encode(), crc32c(f"group\0{name}\0".encode()))
