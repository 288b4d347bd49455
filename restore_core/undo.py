"""Undo images of reversible restores (``restore --keep-undo``).

Before a keep-undo restore overwrites a source extent (background copy or
copy-on-demand), the extent's old data is saved to the pair's undo image and
its bit set in the pair's ``saved`` map, in this order:

    undo data durable -> saved bit durable -> overwrite of the source extent

so at any crash moment an extent the restore changed has its pre-restore
data durable in the undo image. An abort copies ``saved - written`` back
(``written``: extents hosts wrote since the restore began, which keep the
hosts' data); a commit discards the image.

An undo image is either a volume the admin names (it answers NOT READY to
hosts while it holds undo data) or an image an ``UndoImages`` makes: the
daemon creates a sparse one in its state directory; tests keep them in RAM.
"""
from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

from .blockstore import BlockStore, MemoryBlockStore
from .committer import Committer
from .copier import BufferPool


class UndoImages(ABC):
    """Where undo images the daemon makes live."""

    @abstractmethod
    def create(self, pair_id: str, like: BlockStore) -> tuple[BlockStore, dict[str, Any]]:
        """A new empty image as big as ``like`` (on the same kind of store),
        and the record that reopens it. Raises BlockStoreError or OSError."""

    @abstractmethod
    def open(self, record: dict[str, Any], size: int) -> BlockStore:
        """Reopen an image ``create`` made (after a restart)."""

    @abstractmethod
    def discard(self, record: dict[str, Any], store: BlockStore | None) -> None:
        """Close ``store`` (the image open, if it is) and remove the image
        for good (its pair no longer needs it)."""

    @abstractmethod
    def sweep(self, keep: list[dict[str, Any]]) -> list[str]:
        """Remove every image but those of ``keep`` (at start: a crash
        between forgetting an image and removing it leaves it behind).
        Returns the names of the images removed."""


class MemoryUndoImages(UndoImages):
    """Images in RAM, kept across simulated reboots (tests, crash models)."""

    def __init__(self) -> None:
        self.images: dict[str, MemoryBlockStore] = {}

    def create(self, pair_id: str, like: BlockStore) -> tuple[BlockStore, dict[str, Any]]:
        name = f"undo-{pair_id}"
        self.images[name] = MemoryBlockStore(like.size, name)
        return self.images[name], {"name": name}

    def open(self, record: dict[str, Any], size: int) -> BlockStore:
        return self.images[record["name"]]

    def discard(self, record: dict[str, Any], store: BlockStore | None) -> None:
        self.images.pop(record["name"], None)

    def sweep(self, keep: list[dict[str, Any]]) -> list[str]:
        names = {r.get("name") for r in keep}
        gone = [n for n in self.images if n not in names]
        for n in gone:
            del self.images[n]
        return gone


# Extents a save takes along past the ones about to be overwritten (those
# still to restore and not saved yet), and how far ahead of the copier the
# next such window is saved in the background: one undo flush and one map
# commit then cover 64 MiB at the default extent size, and the copier rarely
# waits for a save. Saving only what each copy overwrites ran at 0.14 of a
# plain restore (tests/bench/restore.py keep_undo).
SAVE_AHEAD = 1024
# Largest read/write of a save (the copier's own I/O size at 64 KiB extents),
# and how many of them are in flight at once.
SAVE_IO_EXTENTS = 16
SAVE_DEPTH = 4

log = logging.getLogger(__name__)


def _runs(extents: list[int], longest: int) -> list[tuple[int, int]]:
    """Sorted extents as runs of at most ``longest``."""
    runs: list[tuple[int, int]] = []
    for e in extents:
        if runs and runs[-1][1] == e and runs[-1][1] - runs[-1][0] < longest:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


class UndoSaver:
    """Saves a keep-undo restore's source extents before the copier
    overwrites them (the copier's ``before_overwrite``).

    A save reads the source without claiming the extents: the bytes of an
    extent still to restore are its pre-restore data, because nothing else
    writes it meanwhile -- a copy waits here for the save of its extents,
    and a host write filling a whole extent has made its ``written`` bit
    durable before writing, so an abort never puts back what such a save
    may have read."""

    def __init__(self, pair: Any, committer: Committer, buffers: BufferPool) -> None:
        self.pair = pair
        self.committer = committer
        self.buffers = buffers
        self._saving: dict[int, asyncio.Future[None]] = {}   # extent -> its save
        self._ahead: asyncio.Task[None] | None = None

    async def before_overwrite(self, a: int, b: int) -> None:
        """Returns once extents [a, b) are saved (their bits durable)."""
        maps = self.pair.maps
        while True:
            # Being saved first: a save sets its saved bits before they are
            # durable, and only its end says they are.
            busy = {self._saving[e] for e in range(a, b) if e in self._saving}
            if busy:
                await asyncio.wait([asyncio.shield(f) for f in busy])
                continue
            if maps.saved.all(a, b):
                break
            await self._save([e for e in range(a, b) if not maps.saved.test(e)]
                             + self._unsaved(b))
        self._save_ahead(b)

    def _unsaved(self, start: int) -> list[int]:
        """Extents of the window at ``start`` still to restore, not saved
        and not being saved."""
        p = self.pair
        return [e for e in p.maps.todo_in(start, min(start + SAVE_AHEAD, p.nextents))
                if not p.maps.saved.test(e) and e not in self._saving]

    def _save_ahead(self, start: int) -> None:
        if self._ahead is not None and not self._ahead.done():
            return
        extents = self._unsaved(start)
        if extents:
            self._ahead = asyncio.get_running_loop().create_task(self._save_quietly(extents))

    async def _save_quietly(self, extents: list[int]) -> None:
        try:
            await self._save(extents)
        except Exception as e:  # noqa: BLE001 - the copy that needs them saves them again
            log.warning("pair %s: saving ahead to the undo image failed: %s", self.pair.id, e)

    async def _save(self, extents: list[int]) -> None:
        p = self.pair
        fut = asyncio.get_running_loop().create_future()
        for e in extents:
            self._saving[e] = fut
        try:
            runs = _runs(extents, SAVE_IO_EXTENTS)
            for i in range(0, len(runs), SAVE_DEPTH):
                await asyncio.gather(*(self._copy(ra, rb) for ra, rb in runs[i:i + SAVE_DEPTH]))
            # undo data durable -> saved bits durable. Only the undo image
            # is flushed: settling the copier's copies here as well would
            # force the source's writeback at every save.
            await p.undo_store.flush()
            await self.committer.wait_durable(p.maps.mark_saved(runs))
        finally:
            for e in extents:
                if self._saving.get(e) is fut:
                    del self._saving[e]
            fut.set_result(None)

    async def _copy(self, a: int, b: int) -> None:
        p = self.pair
        off = a * p.extent_size
        length = min(b * p.extent_size, p.size) - off
        buf = self.buffers.take(length)
        try:
            view = memoryview(buf)[:length]
            await p.source_store.readinto(off, view)
            await p.undo_store.write(off, view)
        finally:
            self.buffers.give(buf)

    async def close(self) -> None:
        """Wait for a save ahead to end (before the job changes)."""
        if self._ahead is not None:
            await asyncio.gather(self._ahead, return_exceptions=True)
            self._ahead = None
