"""Group commit of map changes, ordered after the data they describe.

Callers change in-memory maps and pair records, then await ``commit()``.
Requests that arrive while a batch is being written join the next batch, so
concurrent writes needing map changes share one transaction. Each batch:

  1. snapshots the dirty chunks of every registered map, the changed pair
     records and the set of block stores holding data the maps now claim
     (copies, whole-extent fills) -- all in one loop step;
  2. flushes those stores (data durable), then
  3. commits the transaction in the metadata thread (map durable),
  4. wakes the waiters (who may then acknowledge the host).

A failed batch poisons the committer: every later commit fails too, as in
dm-clone's fail mode, because memory and disk no longer agree.
"""
from __future__ import annotations

import asyncio
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .blockstore import BlockStore
from .extentmap import ExtentMap
from .metadata import ALL_ONES, MetadataError, MetadataStore, Transaction

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta
        self._maps: dict[str, ExtentMap] = {}
        self._pairs: dict[str, dict[str, Any] | None] = {}
        self._unflushed: set[BlockStore] = set()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lr-meta")
        self.next_id = 1            # batch that takes changes made now
        self.durable_id = 0         # last batch on disk
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None
        self.on_durable: list[Callable[[int], None]] = []
        self.batches = 0

    # -- registration -----------------------------------------------------
    def register_map(self, key: str, m: ExtentMap) -> None:
        self._maps[key] = m

    def unregister_prefix(self, prefix: str) -> None:
        for k in [k for k in self._maps if k.startswith(prefix)]:
            del self._maps[k]

    def put_pair(self, pair_id: str, record: dict[str, Any] | None) -> None:
        self._pairs[pair_id] = copy.deepcopy(record)

    def note_unflushed(self, store: BlockStore) -> None:
        """Data just written to store must be durable before the next commit."""
        self._unflushed.add(store)

    def has_changes(self) -> bool:
        return bool(self._pairs or self._unflushed or any(m._dirty for m in self._maps.values()))

    # -- committing -----------------------------------------------------------
    async def commit(self) -> None:
        """Make every change made so far durable."""
        await self.wait_durable(self.next_id)

    async def wait_durable(self, batch_id: int) -> None:
        if self.failed is not None:
            raise MetadataError(f"metadata store failed earlier: {self.failed}")
        if batch_id <= self.durable_id:
            return
        fut = self._waiters.get(batch_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[batch_id] = fut
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(fut)

    async def _run(self) -> None:
        while self._waiters and self.failed is None:
            batch_id = self.next_id
            self.next_id += 1
            txn = Transaction(pairs=self._pairs)
            self._pairs = {}
            for key, m in self._maps.items():
                dirty = m.take_dirty_chunks()
                if dirty:
                    txn.maps[key] = {c: (ALL_ONES if b is not None and _full(m, c) else b)
                                     for c, b in dirty.items()}
            stores = self._unflushed
            self._unflushed = set()
            try:
                if stores:
                    await asyncio.gather(*(s.flush() for s in stores))
                if txn.empty():
                    pass
                elif self.meta.inline:
                    await asyncio.sleep(0)
                    self.meta.commit(txn)
                else:
                    await asyncio.get_running_loop().run_in_executor(
                        self._db, self.meta.commit, txn)
            except Exception as e:  # noqa: BLE001 - poison, then report to all
                log.error("metadata batch %d failed: %s", batch_id, e)
                self.failed = e
                for fut in self._waiters.values():
                    if not fut.done():
                        fut.set_exception(MetadataError(f"metadata commit failed: {e}"))
                self._waiters.clear()
                return
            self.batches += 1
            self.durable_id = batch_id
            for cb in self.on_durable:
                cb(batch_id)
            for bid in [b for b in self._waiters if b <= batch_id]:
                fut = self._waiters.pop(bid)
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> None:
        if self.failed is None and (self._pairs or any(m._dirty for m in self._maps.values())
                                    or self._unflushed):
            await self.commit()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        self._db.shutdown(wait=True)


def _full(m: ExtentMap, chunk: int) -> bool:
    from .extentmap import CHUNK_BITS
    a = chunk * CHUNK_BITS
    return m.all(a, min(a + CHUNK_BITS, m.nbits))


def load_map(nbits: int, chunks: dict[int, bytes]) -> ExtentMap:
    from .extentmap import CHUNK_BITS
    m = ExtentMap(nbits)
    for c, blob in chunks.items():
        if c * CHUNK_BITS >= nbits:
            raise MetadataError(f"map chunk {c} beyond {nbits} extents")
        if blob == ALL_ONES:
            m.set_range(c * CHUNK_BITS, min(nbits, (c + 1) * CHUNK_BITS))
        else:
            m.load_chunk(c, blob)
    m.take_dirty_chunks()
    return m
