"""Copying extents of a pair's running job: background walk and on demand.

Both paths claim extents in the pair's copy-on-demand map (InFlightMap)
before copying, so an extent is never copied twice at once and host I/O that
overlaps a copy waits for it to land. Copied extents leave ``todo`` and
enter ``done`` in memory the moment their data is written; the committer
makes ``done`` durable only after flushing that data (data durable -> map
durable), so a crash re-copies at most the extents of the last batch.
"""
from __future__ import annotations

import asyncio
import logging
import time

from .blockstore import BlockStore, BlockStoreError
from .committer import Committer
from .pair import JobKind, Pair

log = logging.getLogger(__name__)

# Background progress commits: after this many batches of copying, or this
# long, whichever first (dm-clone commits about once a second).
COMMIT_EVERY_BATCHES = 32
COMMIT_INTERVAL_S = 0.5


class Copier:
    def __init__(self, pair: Pair, committer: Committer) -> None:
        self.pair = pair
        self.committer = committer
        self.resume_event = asyncio.Event()
        self.resume_event.set()
        self.wake = asyncio.Event()     # new work (or a throttle change)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- direction -----------------------------------------------------------
    @property
    def src(self) -> BlockStore:
        p = self.pair
        assert p.job is not None and p.source_store and p.clone_store
        return p.clone_store if p.job.kind is JobKind.RESTORE else p.source_store

    @property
    def dst(self) -> BlockStore:
        p = self.pair
        assert p.job is not None and p.source_store and p.clone_store
        return p.source_store if p.job.kind is JobKind.RESTORE else p.clone_store

    def _range(self, a: int, b: int) -> tuple[int, int]:
        es = self.pair.extent_size
        off = a * es
        return off, min(b * es, self.pair.size) - off

    # -- the copy primitive (claims held by the caller) -------------------------------
    async def copy_run(self, a: int, b: int) -> int:
        off, length = self._range(a, b)
        buf = await self.src.read(off, length)
        await self.dst.write(off, buf)
        p = self.pair
        p.todo.clear_range(a, b)
        p.done.set_range(a, b)
        # Both sides must be durable before "copied" is: the source of the
        # copy may hold acknowledged but unflushed host writes, and if a
        # power cut took them the two sides would differ with no bit set.
        self.committer.note_unflushed(self.dst)
        self.committer.note_unflushed(self.src)
        p.note_copied(length, b - a)
        return length

    async def _copy_claimed(self, extents: list[int]) -> None:
        """Copy claimed extents, merging adjacent ones into one I/O."""
        i = 0
        while i < len(extents):
            j = i + 1
            while j < len(extents) and extents[j] == extents[j - 1] + 1:
                j += 1
            await self.copy_run(extents[i], extents[j - 1] + 1)
            i = j

    # -- copy-on-demand ---------------------------------------------------------------
    async def ensure_copied(self, first: int, end: int, skip: tuple[int, int] = (0, 0)) -> list[int]:
        """Copy every extent in [first, end) still to do, except those in
        ``skip`` (a write covers them whole): those are claimed instead and
        returned, still in todo, for the caller to fill and release.

        Extents claimed by someone else are waited for, never copied twice.
        Our own fill claims are dropped before waiting (no hold-and-wait, so
        two writes covering the same extents cannot deadlock).
        """
        p = self.pair
        fills: list[int] = []
        t0 = 0.0       # when host I/O started waiting here (metrics: cod_wait_seconds)
        try:
            while True:
                need = [e for e in p.todo.set_in(first, end) if e not in fills]
                if not need:
                    if t0:
                        p.cod_wait_seconds += time.perf_counter() - t0
                    return fills
                t0 = t0 or time.perf_counter()
                busy: list[int] = []
                to_copy: list[int] = []
                for e in need:
                    if p.inflight.try_claim(e):
                        (fills if skip[0] <= e < skip[1] else to_copy).append(e)
                    else:
                        busy.append(e)
                if to_copy:
                    p.cod_extents += len(to_copy)
                    try:
                        await self._copy_claimed(to_copy)
                    finally:
                        p.inflight.release_all(to_copy)
                if busy:
                    p.inflight.release_all(fills)
                    fills.clear()
                    await self._wait_each(busy)
        except BaseException:
            p.inflight.release_all(fills)
            raise

    async def _wait_each(self, extents: list[int]) -> None:
        for e in extents:
            await self.pair.inflight.wait(e, e + 1)

    # -- background walk -------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"copier:{self.pair.id}")

    async def stop(self) -> None:
        self._stopping = True
        self.resume_event.set()
        self.wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_finished(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    on_finished = None   # set by the engine: async callable(pair)
    on_error = None      # set by the engine: async callable(pair, message)

    async def _run(self) -> None:
        p = self.pair
        tasks: set[asyncio.Task[int]] = set()
        pos = 0
        since_commit = 0
        last_commit = time.monotonic()
        due = time.monotonic()     # token bucket: when the next copy may start
        commit: asyncio.Task[None] | None = None   # at most one in flight
        try:
            while not self._stopping:
                if p.job is None:
                    return
                if p.job.paused:
                    await asyncio.gather(*tasks, return_exceptions=True)
                    tasks.clear()
                    self.resume_event.clear()
                    await self.resume_event.wait()
                    continue
                th = p.throttle
                recent_host = (time.monotonic() - p.last_host_io) * 1000 < th.host_yield_ms
                # Host I/O seen lately: one small copy at a time, so a host
                # command never queues behind much copy work.
                depth = 1 if recent_host else th.depth
                span = 1 if recent_host else th.batch_extents
                while len(tasks) >= depth:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        tasks.discard(t)
                        t.result()  # re-raise copy errors
                e = p.todo.next_set(pos)
                if e < 0:
                    if tasks:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            tasks.discard(t)
                            t.result()
                        continue
                    if not p.todo.any(0, p.nextents):
                        break
                    # What is left is claimed by copy-on-demand: wait for it.
                    await p.inflight.wait(0, p.nextents)
                    pos = 0
                    continue
                end = p.todo.next_clear(e, min(e + span, p.nextents))
                if end < 0:
                    end = min(e + span, p.nextents)
                b = e
                while b < end and p.inflight.try_claim(b):
                    b += 1
                if b == e:          # claimed by a copy-on-demand: skip past it
                    pos = e + 1
                    continue
                pos = b
                tasks.add(asyncio.get_running_loop().create_task(self._copy_and_release(e, b)))
                since_commit += b - e
                # Rate limit (token bucket, at most 1 s of saved-up credit):
                # each copy pushes the next one's start by its size / rate.
                # A throttle change wakes the wait and starts a new bucket.
                if th.rate > 0:
                    now = time.monotonic()
                    due = max(due, now - 1.0) + self._range(e, b)[1] / th.rate
                    if due > now:
                        self.wake.clear()
                        try:
                            await asyncio.wait_for(self.wake.wait(), due - now)
                            due = time.monotonic()
                        except asyncio.TimeoutError:
                            pass
                if recent_host and th.host_pause_us:
                    await asyncio.sleep(th.host_pause_us / 1e6)
                # Bound the work a crash can lose and let progress reach
                # disk -- in the background: the commit snapshots what has
                # landed, flushes it and commits while copying goes on.
                if since_commit >= th.batch_extents * COMMIT_EVERY_BATCHES or \
                        time.monotonic() - last_commit > COMMIT_INTERVAL_S:
                    if commit is not None:
                        await commit
                    commit = asyncio.get_running_loop().create_task(self.committer.commit())
                    since_commit = 0
                    last_commit = time.monotonic()
            await asyncio.gather(*tasks)
            if commit is not None:
                await commit
            for t in tasks:
                t.result()
            tasks.clear()
            if self._stopping:
                return
            await self.committer.commit()
            if self.on_finished is not None:
                await self.on_finished(p)
        except asyncio.CancelledError:
            if commit is not None:
                commit.cancel()    # only our wait: the batch itself is shielded
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except BlockStoreError as e:
            await asyncio.gather(*tasks, return_exceptions=True)
            log.error("pair %s: copy failed: %s", p.id, e)
            if self.on_error is not None:
                await self.on_error(p, str(e))
        except Exception as e:  # noqa: BLE001 - metadata failure etc.
            await asyncio.gather(*tasks, return_exceptions=True)
            log.exception("pair %s: copier stopped", p.id)
            if self.on_error is not None:
                await self.on_error(p, f"{type(e).__name__}: {e}")

    async def _copy_and_release(self, a: int, b: int) -> int:
        try:
            return await self.copy_run(a, b)
        finally:
            self.pair.inflight.release_all(range(a, b))
