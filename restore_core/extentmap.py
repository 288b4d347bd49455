"""Extent maps: one bit per extent of a LU, on a C bit array.

Every range operation is a bitarray slice operation (C, word at a time), so
the I/O path never loops in Python per extent. A 64 TiB LU at 64 KiB extents
is 2**30 bits = 128 MiB per map.

For persistence a map is cut into fixed chunks of CHUNK_BITS extents; the map
remembers which chunks changed since the last ``take_dirty_chunks`` so a
commit writes only those (one 4 KiB blob per 2 GiB of LU at 64 KiB extents),
and an all-zero chunk is simply absent from the database.
"""
from __future__ import annotations

from typing import Iterator

from bitarray import bitarray
from bitarray.util import count_and, zeros

CHUNK_BITS = 32768          # 4 KiB of bits per persisted chunk
DEFAULT_EXTENT_SIZE = 64 * 1024


def extent_count(size: int, extent_size: int) -> int:
    return (size + extent_size - 1) // extent_size


def extents_of(offset: int, length: int, extent_size: int) -> tuple[int, int]:
    """[first, last+1) extent indexes touched by a byte range (length > 0)."""
    return offset // extent_size, (offset + length - 1) // extent_size + 1


def whole_extents_of(offset: int, length: int, extent_size: int, size: int) -> tuple[int, int]:
    """[first, end) extents fully covered by a byte range.

    The last extent of a LU may be short; covering up to the LU's end counts
    as covering it whole.
    """
    first = (offset + extent_size - 1) // extent_size
    end_byte = offset + length
    if end_byte >= size:
        end = extent_count(size, extent_size)
    else:
        end = end_byte // extent_size
    return first, max(first, end)


class ExtentMap:
    """A set of extents [0, nbits) with range ops and dirty-chunk tracking."""

    __slots__ = ("bits", "_dirty")

    def __init__(self, nbits: int, bits: bitarray | None = None) -> None:
        if bits is None:
            bits = zeros(nbits, endian="little")
        elif len(bits) != nbits:
            raise ValueError(f"bitarray has {len(bits)} bits, map needs {nbits}")
        self.bits = bits
        self._dirty: set[int] = set()

    # -- queries ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.bits)

    @property
    def nbits(self) -> int:
        return len(self.bits)

    def test(self, e: int) -> bool:
        return bool(self.bits[e])

    def any(self, start: int, end: int) -> bool:
        return self.bits.any() if (start, end) == (0, len(self.bits)) else \
            self.bits.find(1, start, end) >= 0

    def all(self, start: int, end: int) -> bool:
        return self.bits.find(0, start, end) < 0

    def count(self, start: int = 0, end: int | None = None) -> int:
        return self.bits.count(1, start, len(self.bits) if end is None else end)

    def next_set(self, start: int, end: int | None = None) -> int:
        """First set extent >= start (and < end), or -1."""
        if start >= len(self.bits):
            return -1
        return self.bits.find(1, start, len(self.bits) if end is None else end)

    def next_clear(self, start: int, end: int | None = None) -> int:
        if start >= len(self.bits):
            return -1
        return self.bits.find(0, start, len(self.bits) if end is None else end)

    def set_in(self, start: int, end: int) -> list[int]:
        """Indexes of set extents in [start, end): small ranges (one I/O)."""
        return list(self.bits.search(1, start, end))

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal runs [a, b) of set extents."""
        end = len(self.bits) if end is None else end
        pos = start
        while pos < end:
            a = self.bits.find(1, pos, end)
            if a < 0:
                return
            b = self.bits.find(0, a, end)
            if b < 0:
                b = end
            yield a, b
            pos = b

    def intersection_count(self, other: "ExtentMap") -> int:
        return count_and(self.bits, other.bits)

    # -- updates -----------------------------------------------------------
    def _touch(self, start: int, end: int) -> None:
        if end > start:
            self._dirty.update(range(start // CHUNK_BITS, (end - 1) // CHUNK_BITS + 1))

    def set_range(self, start: int, end: int) -> None:
        if end > start:
            self.bits[start:end] = 1
            self._touch(start, end)

    def clear_range(self, start: int, end: int) -> None:
        if end > start:
            self.bits[start:end] = 0
            self._touch(start, end)

    def set(self, e: int) -> None:
        self.bits[e] = 1
        self._dirty.add(e // CHUNK_BITS)

    def clear(self, e: int) -> None:
        self.bits[e] = 0
        self._dirty.add(e // CHUNK_BITS)

    def set_all(self) -> None:
        self.bits.setall(1)
        self._touch(0, len(self.bits))

    def clear_all(self) -> None:
        self.bits.setall(0)
        self._touch(0, len(self.bits))

    def update_from(self, other: "ExtentMap") -> None:
        """self |= other."""
        self.bits |= other.bits
        self._touch_nonzero(other)

    def subtract(self, other: "ExtentMap") -> None:
        """self -= other."""
        self.bits &= ~other.bits
        self._touch_nonzero(other)

    def assign(self, other: "ExtentMap") -> None:
        # A bitarray slice assignment would silently resize on a mismatch.
        if len(other.bits) != len(self.bits):
            raise ValueError(f"map of {len(other.bits)} extents assigned to one of {len(self.bits)}")
        self.bits[:] = other.bits
        self._touch(0, len(self.bits))

    def _touch_nonzero(self, other: "ExtentMap") -> None:
        for a, b in other.runs():
            self._touch(a, b)

    def copy(self) -> "ExtentMap":
        return ExtentMap(len(self.bits), self.bits.copy())

    # -- persistence helpers ----------------------------------------------------
    @property
    def nchunks(self) -> int:
        return (len(self.bits) + CHUNK_BITS - 1) // CHUNK_BITS

    def chunk_bytes(self, chunk: int) -> bytes | None:
        """The chunk's bits as bytes, or None when the chunk is all zero."""
        a = chunk * CHUNK_BITS
        piece = self.bits[a:a + CHUNK_BITS]
        if not piece.any():
            return None
        return piece.tobytes()

    def load_chunk(self, chunk: int, blob: bytes) -> None:
        a = chunk * CHUNK_BITS
        n = min(CHUNK_BITS, len(self.bits) - a)
        if n <= 0:
            raise ValueError(f"chunk {chunk} beyond a map of {len(self.bits)} extents")
        piece = bitarray(endian="little")
        piece.frombytes(blob)
        if len(piece) < n:
            raise ValueError(f"chunk {chunk} blob has {len(piece)} bits, needs {n}")
        self.bits[a:a + n] = piece[:n]

    def take_dirty_chunks(self) -> dict[int, bytes | None]:
        """Chunks changed since the last call, with their current content."""
        out = {c: self.chunk_bytes(c) for c in sorted(self._dirty)}
        self._dirty.clear()
        return out

    def mark_chunk_dirty(self, chunk: int) -> None:
        """Have ``chunk`` written (or deleted) by the next commit as it is."""
        self._dirty.add(chunk)

    def mark_all_dirty(self) -> None:
        self._touch(0, len(self.bits))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExtentMap) and self.bits == other.bits

    def __repr__(self) -> str:
        return f"ExtentMap({self.count()}/{len(self.bits)} set)"
