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


# How far ahead of the copier's walk the saver keeps the source saved, and
# the batch one undo flush and one map commit cover (at the default 64 KiB
# extent size: 64 MiB and 16 MiB). The saver runs on its own, batch after
# batch, so the copier finds its extents saved and seldom waits; batches, not
# one save per copy, keep the flushes and commits few. Saving only what each
# copy overwrites ran at 0.14 of a plain restore, one window saved at a time
# behind the copier at 0.47-0.53 (tests/bench/restore.py keep_undo).
SAVE_AHEAD = 1024
SAVE_BATCH = 256        # well under SAVE_AHEAD: a batch starts once the lead is one short
# Largest copy of a save (the copier's own I/O size at 64 KiB extents), and
# how many of them are in flight at once.
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
        self._reach = 0         # the end of the latest copy (mostly the walk's)
        self._closing = False

    async def before_overwrite(self, a: int, b: int) -> None:
        """Returns once extents [a, b) are saved (their bits durable)."""
        maps = self.pair.maps
        self._reach = b      # not the furthest: a host's copy far ahead must not take it
        self._save_ahead()
        while True:
            # Being saved first: a save sets its saved bits before they are
            # durable, and only its end says they are.
            busy = {self._saving[e] for e in range(a, b) if e in self._saving}
            if busy:
                await asyncio.wait([asyncio.shield(f) for f in busy])
                continue
            if maps.saved.all(a, b):
                return
            await self._save([e for e in range(a, b) if not maps.saved.test(e)])

    def _unsaved(self) -> list[int]:
        """The next batch: extents ahead of the copier's walk still to
        restore, not saved and not being saved -- none while what is saved
        ahead still reaches SAVE_AHEAD - SAVE_BATCH past the copier (else
        each copy would start a batch of the few extents it moved on)."""
        p = self.pair
        out: list[int] = []
        for e in p.maps.todo_in(self._reach, min(self._reach + SAVE_AHEAD, p.nextents)):
            if not p.maps.saved.test(e) and e not in self._saving:
                if not out and e >= self._reach + SAVE_AHEAD - SAVE_BATCH:
                    return out
                out.append(e)
                if len(out) == SAVE_BATCH:
                    break
        return out

    def _save_ahead(self) -> None:
        if self._closing or (self._ahead is not None and not self._ahead.done()):
            return
        if self._unsaved():
            self._ahead = asyncio.get_running_loop().create_task(self._save_batches())

    async def _save_batches(self) -> None:
        """Save batch after batch until SAVE_AHEAD past the copier is saved
        (the copier's next copy starts this again). A batch's copies run
        while the one before settles (undo flush, map commit): a flush
        covers only the writes completed before it starts, so each batch
        still settles after its own data."""
        settling: asyncio.Task[None] | None = None
        try:
            while not self._closing:
                extents = self._unsaved()
                if not extents:
                    break
                fut = self._claim(extents)
                try:
                    runs = await self._copy_runs(extents)
                    if settling is not None:
                        await settling      # one batch settling at a time, in order
                except BaseException:
                    self._release(extents, fut)
                    raise
                settling = asyncio.get_running_loop().create_task(
                    self._settle(runs, extents, fut))
            if settling is not None:
                await settling
        except Exception as e:  # noqa: BLE001 - the copy that needs them saves them again
            log.warning("pair %s: saving ahead to the undo image failed: %s", self.pair.id, e)

    async def _save(self, extents: list[int]) -> None:
        fut = self._claim(extents)
        try:
            runs = await self._copy_runs(extents)
        except BaseException:
            self._release(extents, fut)
            raise
        await self._settle(runs, extents, fut)

    def _claim(self, extents: list[int]) -> asyncio.Future[None]:
        """Mark extents as being saved until their saved bits are durable."""
        fut = asyncio.get_running_loop().create_future()
        for e in extents:
            self._saving[e] = fut
        return fut

    def _release(self, extents: list[int], fut: asyncio.Future[None]) -> None:
        for e in extents:
            if self._saving.get(e) is fut:
                del self._saving[e]
        fut.set_result(None)

    async def _copy_runs(self, extents: list[int]) -> list[tuple[int, int]]:
        runs = _runs(extents, SAVE_IO_EXTENTS)
        for i in range(0, len(runs), SAVE_DEPTH):
            await asyncio.gather(*(self._copy(ra, rb) for ra, rb in runs[i:i + SAVE_DEPTH]))
        return runs

    async def _settle(self, runs: list[tuple[int, int]], extents: list[int],
                      fut: asyncio.Future[None]) -> None:
        """undo data durable -> saved bits durable, then release. Only the
        undo image is flushed: settling the copier's copies here as well
        would force the source's writeback at every save."""
        try:
            await self.pair.undo_store.flush()
            await self.committer.wait_durable(self.pair.maps.mark_saved(runs))
        finally:
            self._release(extents, fut)

    async def _copy(self, a: int, b: int) -> None:
        p = self.pair
        off = a * p.extent_size
        length = min(b * p.extent_size, p.size) - off
        await self.buffers.copy(p.source_store, p.undo_store, off, length)

    async def close(self) -> None:
        """Stop saving ahead: wait for the batch being saved (before the
        job changes)."""
        self._closing = True
        if self._ahead is not None:
            await asyncio.gather(self._ahead, return_exceptions=True)
            self._ahead = None
