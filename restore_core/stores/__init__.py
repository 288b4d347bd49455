"""The stores a volume's data can live on, and the one place that opens a
store from a volume's spec. A new kind of store is one module here plus
its spec (``spec.py``); the engine and the SCSI layer only see BlockStore.
"""
from __future__ import annotations

from ..blockstore import BlockStore
from .file import FileBlockStore
from .rbd import RbdStore
from .spec import FileSpec, RbdSpec, StoreSpec


def open_store(spec: StoreSpec, size: int | None = None, *, create: bool = False,
               stale_owner: str | None = None) -> BlockStore:
    """Open the store ``spec`` names. ``size``, when given, must be the
    existing store's size; with ``create`` a missing one is made that big.
    Never resizes an existing store. ``stale_owner``: see RbdStore.
    Raises BlockStoreError or OSError."""
    if isinstance(spec, RbdSpec):
        return RbdStore(spec, size, create=create, stale_owner=stale_owner)
    return FileBlockStore(spec.path, size, create=create, nofollow=True)
