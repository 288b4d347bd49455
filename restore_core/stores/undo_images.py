"""Undo images the daemon makes for keep-undo restores (restore_core.undo).

An undo image lives on the same kind of store as the source it saves:
beside an RBD source, an RBD image in the same pool (``<image>.undo``);
for an image file or block device, a sparse file in the daemon's undo
directory (``<pair>.undo.img``), which costs only what the restore
overwrites. The record an image is reopened from is a volume record's
(kind, path): the same strict spec parsing guards both.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from ..blockstore import BlockStore, BlockStoreError
from ..undo import UndoImages
from . import open_store
from .rbd import RbdStore, remove_image
from .spec import FILE_KINDS, RBD_KIND, FileSpec, RbdSpec, spec_of_record

FILE_SUFFIX = ".undo.img"
RBD_SUFFIX = ".undo"


class StoreUndoImages(UndoImages):
    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)

    def create(self, pair_id: str, like: BlockStore) -> tuple[BlockStore, dict[str, Any]]:
        if isinstance(like, RbdStore):
            s = like.spec
            spec: FileSpec | RbdSpec = RbdSpec(s.pool, s.image + RBD_SUFFIX, s.conf, s.client_id)
            kind = RBD_KIND
        else:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            spec = FileSpec(os.path.join(self.directory, pair_id + FILE_SUFFIX))
            kind = FILE_KINDS[0]
            _unlink(spec.path)      # a leftover of an earlier restore holds stale data
        return open_store(spec, like.size, create=True), {"kind": kind, "path": spec.location}

    def open(self, record: dict[str, Any], size: int) -> BlockStore:
        return open_store(spec_of_record(str(record["kind"]), str(record["path"])), size)

    def discard(self, record: dict[str, Any], store: BlockStore | None) -> None:
        if store is not None:
            store.close()
        spec = spec_of_record(str(record["kind"]), str(record["path"]))
        if isinstance(spec, RbdSpec):
            remove_image(spec)
        else:
            _unlink(spec.path)

    def sweep(self, keep: list[dict[str, Any]]) -> list[str]:
        """Undo files of this directory no record keeps (RBD images are
        named after their source and reused by its next keep-undo restore)."""
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
        return gone


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise BlockStoreError(f"cannot remove undo image {path}: {e.strerror}") from e
