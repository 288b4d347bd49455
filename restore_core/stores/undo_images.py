"""Undo images the daemon makes for keep-undo restores (restore_core.undo).

An undo image lives on the same kind of store as the source it saves:
beside an RBD source, an RBD image in the same pool (``<image>.undo``);
for an image file or block device, a sparse file in the daemon's undo
directory (``<pair>.undo.img``), which costs only what the restore
overwrites. The record an image is reopened from is a volume record's
(kind, path): the same strict spec parsing guards both.

An RBD undo image lives outside the state directory, so which ones this
daemon made is recorded there: a mark ``<pair>.undo.rbd`` naming the image,
written durably once the image is made, removed after the image. Only
marked images are ever removed (a discard, or the sweep at start of those no
pair refers to any more); an image of that name this daemon did not make is
never used, the restore is refused instead.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Any

from ..blockstore import BlockStore, BlockStoreError
from ..undo import UndoImages
from . import open_store
from .owners import forget_owner, read_owner, write_owner
from .rbd import ImageMissingError, RbdStore, remove_image
from .spec import FILE_KINDS, RBD_KIND, FileSpec, RbdSpec, spec_of_record

FILE_SUFFIX = ".undo.img"
RBD_SUFFIX = ".undo"
RBD_MARK_SUFFIX = ".undo.rbd"   # a mark in the undo directory: an RBD image we made
MARK_LIMIT = 8192               # a mark holds one image location (a ceph.conf path in it)

log = logging.getLogger(__name__)


class StoreUndoImages(UndoImages):
    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)

    def create(self, pair_id: str, like: BlockStore) -> tuple[BlockStore, dict[str, Any]]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if isinstance(like, RbdStore):
            return self._create_rbd(pair_id, like)
        spec = FileSpec(os.path.join(self.directory, pair_id + FILE_SUFFIX))
        _unlink(spec.path)      # a leftover of an earlier restore holds stale data
        return open_store(spec, like.size, create=True), {"kind": FILE_KINDS[0],
                                                          "path": spec.location}

    def _create_rbd(self, pair_id: str, like: RbdStore) -> tuple[BlockStore, dict[str, Any]]:
        s = like.spec
        spec = RbdSpec(s.pool, s.image + RBD_SUFFIX, s.conf, s.client_id)
        mark = os.path.join(self.directory, pair_id + RBD_MARK_SUFFIX)
        ours = read_owner(mark, MARK_LIMIT) == spec.location  # left by us (removal failed)
        store = open_store(spec, like.size, create=True)
        if not store.created and not ours:
            store.close()
            raise BlockStoreError(f"RBD image {spec.image_name} exists and is no undo image "
                                  "this daemon made: remove or rename it, or name an undo "
                                  "volume")
        try:
            write_owner(mark, spec.location)      # durable before anyone relies on the image
        except OSError:
            store.abandon()
            raise
        return store, {"kind": RBD_KIND, "path": spec.location}

    def open(self, record: dict[str, Any], size: int) -> BlockStore:
        return open_store(spec_of_record(str(record["kind"]), str(record["path"])), size)

    def discard(self, record: dict[str, Any], store: BlockStore | None) -> None:
        if store is not None:
            store.close()
        spec = spec_of_record(str(record["kind"]), str(record["path"]))
        if isinstance(spec, RbdSpec):
            self._remove_rbd(spec, [m for m, where in self._rbd_marks() if where == spec.location])
        else:
            _unlink(spec.path)

    def sweep(self, keep: list[dict[str, Any]]) -> list[str]:
        """Undo files of this directory, and RBD undo images it marks, that
        no record keeps. An RBD image that cannot be removed now (its
        cluster is down) keeps its mark: the next start tries again."""
        kept = {str(r.get("path")) for r in keep}
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        gone = []
        for n in names:
            path = os.path.join(self.directory, n)
            if n.endswith(FILE_SUFFIX) and path not in kept:
                _unlink(path)
                gone.append(path)
        for mark, where in self._rbd_marks():
            if where in kept:
                continue
            try:
                spec = spec_of_record(RBD_KIND, where)
                if not isinstance(spec, RbdSpec):
                    raise ValueError("not an RBD image")
                self._remove_rbd(spec, [mark])
            except (BlockStoreError, ValueError) as e:
                log.warning("undo image %s (marked by %s) could not be removed: %s", where, mark, e)
                continue
            gone.append(where)
        return gone

    def _rbd_marks(self) -> list[tuple[str, str]]:
        """(mark, image location) of every RBD undo image this daemon made."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        marks = [os.path.join(self.directory, n) for n in names if n.endswith(RBD_MARK_SUFFIX)]
        return [(m, where) for m in marks if (where := read_owner(m, MARK_LIMIT)) is not None]

    @staticmethod
    def _remove_rbd(spec: RbdSpec, marks: list[str]) -> None:
        """Remove the image, then the marks naming it (a crash between
        leaves a mark of a missing image: the sweep drops it)."""
        try:
            remove_image(spec)
        except ImageMissingError:
            pass
        for m in marks:
            forget_owner(m)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise BlockStoreError(f"cannot remove undo image {path}: {e.strerror}") from e
