"""Group commit of map changes, ordered after the data they describe.

Callers change in-memory maps and pair records, then await
``wait_durable(batch)`` or ``commit()``. Requests that arrive while a batch
is being written join the next batch, so concurrent writes needing map
changes share one transaction. Each batch snapshots the dirty chunks of
every registered map and the changed pair records in one loop step, commits
them in the metadata thread (map durable) and wakes the waiters (who may
then acknowledge the host).

A batch flushes no block store: a host write's map bit is durable *before*
its data is written, so it needs no flush, and it must not wait behind the
copier's data. Changes that claim data (a copy's done bit, a whole-extent
fill) are *landed* instead: ``note_landed`` records the stores holding the
data and the change to apply once they are durable; ``settle_landed``
flushes those stores and applies the changes, which then go with the next
batch (data durable -> map durable). ``commit()`` settles, then commits.

A failed batch poisons the committer: every later commit fails too, as in
dm-clone's fail mode, because memory and disk no longer agree.
"""
from __future__ import annotations

import asyncio
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from .blockstore import BlockStore
from .extentmap import ExtentMap
from .metadata import ALL_ONES, MetadataError, MetadataStore, Transaction

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta
        self._maps: dict[str, ExtentMap] = {}
        self._pairs: dict[str, dict[str, Any] | None] = {}
        # data written, not yet flushed: (its stores, the map change it allows)
        self._landed: list[tuple[Iterable[BlockStore], Callable[[], None]]] = []
        self._landed_seq = 0            # landings so far
        self._settled_seq = 0           # landings durable and applied
        self._settling = asyncio.Lock()
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

    def note_landed(self, stores: Iterable[BlockStore], apply: Callable[[], None]) -> None:
        """Data just written to ``stores`` allows a map change: ``apply`` it
        once they are flushed (by the next ``settle_landed``)."""
        self._landed.append((stores, apply))
        self._landed_seq += 1

    def has_changes(self) -> bool:
        return bool(self._pairs or self._landed or any(m._dirty for m in self._maps.values()))

    # -- committing -----------------------------------------------------------
    async def commit(self) -> None:
        """Make every change made so far durable, landed data included."""
        await self.settle_landed()
        await self.wait_durable(self.next_id)

    async def settle_landed(self) -> None:
        """Flush the stores of everything landed so far and apply the map
        changes it allows (they reach disk with the next batch). Callers
        arriving during a flush share the next one."""
        if self.failed is not None:
            raise MetadataError(f"metadata store failed earlier: {self.failed}")
        want = self._landed_seq
        async with self._settling:
            if self._settled_seq >= want:
                return
            if self.failed is not None:
                raise MetadataError(f"metadata store failed earlier: {self.failed}")
            landed, self._landed = self._landed, []
            seq = self._landed_seq
            stores = {s for group, _ in landed for s in group}
            try:
                await asyncio.gather(*(s.flush() for s in stores))
            except Exception as e:  # noqa: BLE001 - poison: the maps cannot follow
                self._poison(f"flush of landed data failed: {e}", e)
                raise MetadataError(f"flush of landed data failed: {e}") from e
            for _, apply in landed:
                apply()
            self._settled_seq = seq

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
            try:
                if txn.empty():
                    pass
                elif self.meta.inline:
                    await asyncio.sleep(0)
                    self.meta.commit(txn)
                else:
                    await asyncio.get_running_loop().run_in_executor(
                        self._db, self.meta.commit, txn)
            except Exception as e:  # noqa: BLE001 - poison, then report to all
                self._poison(f"metadata batch {batch_id} failed: {e}", e)
                return
            self.batches += 1
            self.durable_id = batch_id
            for cb in self.on_durable:
                cb(batch_id)
            for bid in [b for b in self._waiters if b <= batch_id]:
                fut = self._waiters.pop(bid)
                if not fut.done():
                    fut.set_result(None)

    def _poison(self, what: str, e: BaseException) -> None:
        log.error("%s", what)
        self.failed = e
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(MetadataError(f"metadata commit failed: {e}"))
        self._waiters.clear()

    async def close(self) -> None:
        if self.failed is None and self.has_changes():
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
