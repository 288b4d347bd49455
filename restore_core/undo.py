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


async def save_before_overwrite(pair: Any, committer: Committer, buffers: BufferPool,
                                a: int, b: int) -> None:
    """Save the source's data of the extents of [a, b) not saved yet to the
    pair's undo image; returns once their ``saved`` bits are durable (the
    caller overwrites them next). Claims on [a, b) are held by the caller,
    so no one else saves or overwrites these extents meanwhile."""
    undo = pair.undo_store
    src = pair.source_store
    runs = pair.maps.unsaved_runs(a, b)
    if not runs:
        return
    es = pair.extent_size
    for ra, rb in runs:
        off = ra * es
        length = min(rb * es, pair.size) - off
        buf = buffers.take(length)
        try:
            view = memoryview(buf)[:length]
            await src.readinto(off, view)
            await undo.write(off, view)
        finally:
            buffers.give(buf)
    await undo.flush()                      # undo data durable ...
    bid = pair.maps.mark_saved(runs)
    await committer.wait_durable(bid)       # ... then the map saying so
