"""Copying extents of a pair's running job: background walk and on demand.

Both paths claim extents in the pair's copy-on-demand map (InFlightMap)
before copying, so an extent is never copied twice at once and host I/O that
overlaps a copy waits for it to land. Copied extents leave ``todo`` the
moment their data is written and are *landed*; they enter ``done`` only when
the committer has flushed that data (data durable -> map durable), so a
crash re-copies at most the extents copied since the last settle.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from typing import Awaitable, Callable

from .blockstore import BlockStore, BlockStoreError
from .committer import Committer
from .hostyield import HostYield
from .pair import JobKind, Pair

log = logging.getLogger(__name__)

# Background progress commits this often (dm-clone: about once a second).
# Each one fdatasyncs both images, so it goes by time, not by bytes: at
# 2 GB/s a commit per 32 MiB forced a synchronous writeback 60 times a
# second. A crash re-copies at most what landed since the last one.
COMMIT_INTERVAL_S = 0.5
# While hosts are busy the floor's copies are this big (at least a batch):
# each copy costs the event loop a task, a thread hand-off, a completion
# and its map marks, landing between host commands. Against 1 MiB (the
# default batch) at the same floor (2 GiB bench, tests/bench/
# restore_latency.py, 2 runs each, load 1.6-3.8): loop CPU per QD32 command
# 26.4-28.3 -> 21.3-23.0 us, qd32_iops_ratio 0.67-0.69 -> 0.84-0.85, QD1
# p99_ratio 2.7-3.0 -> 0.78-1.37; 4 MiB made 0.82-0.85 and 0.86-1.61. A
# host write to an extent in such a copy waits for it: copies stay
# bounded here, not a multiple of a batch that may itself be big. Only
# between stores that copy within (one kernel job, no buffer): through
# memory (RBD, at copy depth 8) such copies held 8 x 8 MiB of buffers per
# pair, and each is as many I/Os as batches anyway.
BUSY_COPY_BYTES = 8 << 20
# While hosts are busy the copier looks again (hosts gone? behind the
# floor?) this often at most, not every host window (2-4 ms on a file: 200+
# looks a second, each loop work between host commands). Noticing hosts gone
# 20 ms later costs an idle stretch 20 ms of full speed; behind the floor
# is FLOOR_BEHIND_S of it anyway. 2 GiB bench, 2 runs each, quiet machine:
# loop CPU per QD32 command +2.7/+3.4 -> +2.0/+2.9 us over idle,
# qd32_iops_ratio 0.80/0.82 -> 0.86/0.81 (within the noise, not beyond it).
BUSY_LOOK_S = 0.02
# Copy buffers kept for reuse (a fresh 1 MiB bytearray per copy costs an
# mmap, 256 page faults and a munmap).
KEEP_BUFFERS = 8


class BufferPool:
    def __init__(self, keep: int = KEEP_BUFFERS) -> None:
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self, n: int) -> bytearray:
        for i, buf in enumerate(self._free):
            if len(buf) >= n:
                return self._free.pop(i)
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)

    async def copy(self, src: BlockStore, dst: BlockStore, offset: int, length: int,
                   background: bool = False) -> None:
        """Copy ``length`` bytes at ``offset`` from ``src`` to ``dst``: by
        the stores themselves where they can (no buffer), else through one
        of these buffers."""
        if await src.copy_within(dst, offset, length, background):
            return
        buf = self.take(length)
        try:
            await src.copy_to(dst, offset, memoryview(buf)[:length], background)
        finally:
            self.give(buf)


class Copier:
    def __init__(self, pair: Pair, committer: Committer, hosts: HostYield | None = None) -> None:
        self.pair = pair
        self.committer = committer
        self.resume_event = asyncio.Event()
        self.resume_event.set()
        self.wake = asyncio.Event()     # new work (or a throttle change)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._finishing = False     # in on_finished (see drain)
        # what the copier learnt about the LU's hosts and its idle rate
        self.hosts = hosts if hosts is not None else HostYield()
        self.buffers = BufferPool()
        self._last_commit = 0.0         # when the walk last started a progress commit

    # -- direction -----------------------------------------------------------
    @property
    def src(self) -> BlockStore:
        p = self.pair
        assert p.job is not None and p.copy_from is not None
        return p.copy_from

    @property
    def dst(self) -> BlockStore:
        p = self.pair
        assert p.job is not None and p.source_store and p.clone_store
        return p.source_store if p.to_source else p.clone_store

    def _range(self, a: int, b: int) -> tuple[int, int]:
        es = self.pair.extent_size
        off = a * es
        return off, min(b * es, self.pair.size) - off

    # -- the copy primitive (claims held by the caller) -------------------------------
    async def copy_run(self, a: int, b: int, background: bool = False) -> int:
        """Copy extents [a, b); ``background``: while hosts are busy, by the
        stores' background I/O (off the event loop, behind host I/O)."""
        off, length = self._range(a, b)
        p = self.pair
        if (self.before_overwrite is not None and p.job is not None
                and p.job.kind is JobKind.RESTORE):
            await self.before_overwrite(a, b)     # keep-undo: save the old data first
        # The stores copy between themselves where they can (file to file:
        # one worker job, no buffer through Python, cheaper for hosts
        # sharing the CPU), else through one of our buffers.
        await self.buffers.copy(self.src, self.dst, off, length, background)
        job = p.job
        settle = p.maps.mark_copied(a, b, lambda: p.job is job)   # not a job stopped since
        # Both sides must be durable before "copied" is: the source of the
        # copy may hold acknowledged but unflushed host writes, and if a
        # power cut took them the two sides would differ with no bit set.
        self.committer.note_landed((self.dst, self.src), settle)
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
                need = [e for e in p.maps.todo_in(first, end) if e not in fills]
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

    async def drain(self) -> None:
        """Stop once the copies in flight have landed: unlike ``stop``, no
        write is cut off in a worker thread to land after this returns.
        The caller holds the engine's lock (abort, delete)."""
        self._stopping = True
        self.resume_event.set()
        self.wake.set()
        if self._task is not None:
            if self._finishing:
                # The walk ended and its finish waits for the engine's lock,
                # which every drainer holds: that finish has not begun and
                # cannot (waiting for it would deadlock); the drainer's own
                # state change decides what follows the finished walk.
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

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
    # set by the engine for a keep-undo restore: async callable(a, b) that
    # returns once extents [a, b) of the source are saved (restore_core.undo)
    before_overwrite: Callable[[int, int], Awaitable[None]] | None = None
    # set by the engine: holds the host I/O of the pair's volumes (their I/O
    # gates closed) while entered; the copier measures its idle rate so
    hold_hosts: Callable[[], AbstractAsyncContextManager[None]] | None = None

    async def _run(self) -> None:
        p = self.pair
        tasks: set[asyncio.Task[int]] = set()
        self._last_commit = time.monotonic()
        due = time.monotonic()     # token bucket: when the next copy may start
        commit: asyncio.Task[None] | None = None   # at most one in flight
        try:
            pos = await self._calibrate()
            self.hosts.start_budget()
            while not self._stopping:
                if p.job is None:
                    return
                if p.job.paused:
                    await asyncio.gather(*tasks, return_exceptions=True)
                    tasks.clear()
                    self.resume_event.clear()
                    await self.resume_event.wait()
                    self.hosts.start_budget()
                    continue
                commit = self._commit_due(commit)
                th = p.throttle
                now = time.monotonic()
                busy = self.hosts.busy(now, p.last_host_io, th.host_window)
                if busy:
                    # Hosts first: copy only while behind the minimum
                    # progress rate, else look again within the host window.
                    wait = self.hosts.floor_wait(now, th.min_progress_pct)
                    if wait > 0:
                        await asyncio.sleep(min(wait, self._busy_look(th.host_window)))
                        continue
                # Hosts busy: copies by background I/O (a file store: at
                # low CPU priority), so a host command never waits behind
                # copy work, on the loop or for a CPU; and one at a time:
                # two copies could take both CPUs of a small machine from
                # the hosts at once, and one stream (copy_file_range:
                # hundreds of MB/s) keeps well above the floor. Behind the
                # floor (low priority got too little CPU: hosts keep them all
                # busy), one more copy, at normal priority: the floor is a
                # guarantee.
                behind = busy and self.hosts.behind(now, th.min_progress_pct)
                span = max(th.batch_extents, BUSY_COPY_BYTES // p.extent_size) \
                    if busy and self.src.copies_within(self.dst) else th.batch_extents
                # A store that pays a round trip per I/O (RBD) needs its
                # copy depth even while hosts are busy, or it falls under
                # the floor.
                store_depth = max(self.src.copy_depth, self.dst.copy_depth)
                if len(tasks) >= (store_depth + (1 if behind else 0) if busy else max(th.depth, store_depth)):
                    # busy: look again within the window (behind yet?)
                    done, _ = await asyncio.wait(
                        tasks, timeout=self._busy_look(th.host_window) if busy else None,
                        return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        tasks.discard(t)
                        t.result()  # re-raise copy errors
                    continue
                run = p.maps.next_todo_run(pos, span)
                if run is None:
                    if tasks:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            tasks.discard(t)
                            t.result()
                        continue
                    if not p.maps.any_todo():
                        break
                    # What is left is claimed by copy-on-demand: wait for it.
                    await p.inflight.wait(0, p.nextents)
                    pos = 0
                    continue
                e, end = run
                b = self._claim(e, end)
                if b == e:          # claimed by a copy-on-demand: skip past it
                    pos = e + 1
                    continue
                pos = b
                self.hosts.note_started(time.monotonic(), self._range(e, b)[1], th.min_progress_pct)
                tasks.add(asyncio.get_running_loop().create_task(
                    self._copy_and_release(e, b, busy, background=busy and not behind)))
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
            await asyncio.gather(*tasks)
            if commit is not None:
                await commit
            for t in tasks:
                t.result()
            tasks.clear()
            if self._stopping:
                return
            await self.committer.commit()
            if self._stopping:      # drained while the last commit ran
                return
            est = self.hosts.idle_estimate()
            if est is not None:     # what the floor was a share of (the bench compares)
                log.info("pair %s: copier's idle rate estimate %.0f MB/s", p.id, est / 1e6)
            if self.on_finished is not None:
                self._finishing = True
                try:
                    await self.on_finished(p)
                finally:
                    self._finishing = False
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

    async def _calibrate(self) -> int:
        """Measure the idle rate, with the LU's host I/O held: copy at full
        depth for the throttle's ``calibrate_ms``, hosts' commands waiting at
        the volumes' I/O gates (the job's start held them too, while it
        committed).
        Returns where the walk goes on.

        The floor is a share of the idle rate, so the rate must be the one
        an idle restore makes. Measured between host bursts instead (the
        hosts' processes and the loop sharing the CPUs) it read 0.38-0.66 of
        the bench's idle restores, and the copier kept 5-8% of the idle rate
        under load against a 10% floor. A hold is 50 ms once per job; a
        job the hosts may not wait for (a rate limit: the copier never runs
        at full speed; host_window 0: it never yields, so has no floor) or
        a small one (HostYield.calibrates) measures nothing."""
        p, th = self.pair, self.pair.throttle
        hold_s = th.calibrate_ms / 1000
        if (self.hold_hosts is None or th.rate > 0 or th.host_window == 0
                or p.job is None or p.job.paused or self._stopping
                or not self.hosts.calibrates(p.maps.todo_left() * p.extent_size, hold_s)):
            return 0
        loop = asyncio.get_running_loop()
        depth = max(th.depth, self.src.copy_depth, self.dst.copy_depth)
        tasks: set[asyncio.Task[int]] = set()
        landed: list[tuple[float, int]] = []     # (when, bytes) of each copy
        pos = 0
        try:
            async with self.hold_hosts():
                stop_at = time.monotonic() + hold_s
                while tasks or (not self._stopping and time.monotonic() < stop_at):
                    more = len(tasks) < depth and not self._stopping and time.monotonic() < stop_at
                    run = p.maps.next_todo_run(pos, th.batch_extents) if more else None
                    if run is None:
                        if not tasks:
                            break           # nothing (unclaimed) left to copy
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        now = time.monotonic()
                        for t in done:
                            tasks.discard(t)
                            landed.append((now, t.result()))    # re-raise copy errors
                        continue
                    e, end = run
                    b = self._claim(e, end)
                    pos = b if b > e else e + 1
                    if b > e:
                        tasks.add(loop.create_task(self._copy_and_release(e, b, False, False)))
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except BaseException:
            await asyncio.gather(*tasks, return_exceptions=True)    # as the walk: let them land
            raise
        rate = self.hosts.note_calibration(landed)
        if rate is not None:
            log.info("pair %s: idle copy rate %.0f MB/s (measured with host I/O held)",
                     p.id, rate / 1e6)
        return pos

    def _claim(self, e: int, end: int) -> int:
        """Claim the extents of todo run [e, end) from ``e`` on while no
        copy-on-demand holds them: returns where the claimed ones end (``e``:
        none, a copy-on-demand holds ``e``)."""
        b = e
        while b < end and self.pair.inflight.try_claim(b):
            b += 1
        return b

    def _busy_look(self, host_window: int) -> float:
        """How long the copier waits, hosts busy, before it looks again
        (hosts gone? behind the floor?): a host window, BUSY_LOOK_S at least.
        Each look is loop work between host commands."""
        return max(self.hosts.window(host_window), BUSY_LOOK_S)

    def _commit_due(self, commit: asyncio.Task[None] | None) -> asyncio.Task[None] | None:
        """Bound the work a crash can lose and let progress reach disk -- in
        the background: the commit settles what has landed (flush, done
        bits) and commits while copying goes on. One at a time; a slow one
        is not waited for here. Returns the commit in flight."""
        if time.monotonic() - self._last_commit <= COMMIT_INTERVAL_S or (
                commit is not None and not commit.done()):
            return commit
        if commit is not None:
            commit.result()     # re-raise a failed commit
        self._last_commit = time.monotonic()
        return asyncio.get_running_loop().create_task(self.committer.commit())

    async def _copy_and_release(self, a: int, b: int, busy: bool, background: bool) -> int:
        try:
            t0 = time.monotonic()
            n = await self.copy_run(a, b, background=background)
            self.hosts.note_copy(n, time.monotonic() - t0, busy, background=background)
            return n
        finally:
            self.pair.inflight.release_all(range(a, b))
