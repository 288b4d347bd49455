"""The copier yields to hosts over a time window, with a minimum progress rate."""
import asyncio
import time

import pytest

from restore_core import hostyield
from restore_core.blockstore import MemoryBlockStore
from restore_core.copier import BUSY_COPY_BYTES, BUSY_LOOK_S
from restore_core.hostyield import (CALIBRATE_HOLD_S, CALIBRATE_MIN_COPIES, CALIBRATE_S,
                                    FLOOR_AHEAD_S, FLOOR_AIM, FLOOR_BEHIND_S, FLOOR_OWED_S,
                                    IDLE_SAMPLE_S, MIN_WINDOW_S, HostYield)
from restore_core.throttle import Throttle

from .util import ES, Rig, pattern


def test_busy_is_a_window_of_round_trips_not_an_in_flight_count():
    h = HostYield()
    h.idle_rate = 100 << 20                           # measured (no full-speed window first)
    h.note_copy(64 << 10, 0.002, busy=False)          # one copy: 2 ms round trip
    assert h.window(8) == pytest.approx(0.016)
    # a QD1 host: nothing in flight right now, its last command 5 ms ago
    assert h.busy(now=10.0, last_host_io=9.995, host_window=8)
    assert not h.busy(now=10.0, last_host_io=9.98, host_window=8)
    assert not h.busy(now=10.0, last_host_io=10.0, host_window=0)   # yielding off
    h.note_copy(64 << 10, 1e-6, busy=False)
    assert h.window(1) >= MIN_WINDOW_S


def idle_measured(h: HostYield, rate: float) -> None:
    """One second of idle copies at ``rate`` bytes/s (1 MiB each, each
    taking the copier's time at that rate), then a host arrives."""
    assert not h.busy(0.0, -1.0, 8)
    n = 1 << 20
    for i in range(int(rate // n)):
        h.note_copy(n, n / rate, busy=False, now=(i + 1) * n / rate)
    assert h.busy(61.0, 61.0, 8)                      # a host arrives: the idle stretch ends


def busy_copy_rate(h: HostYield, start: float, secs: float, n: int, copy_s: float) -> float:
    """Bytes/s of busy copies of ``n`` bytes, each taking ``copy_s``, made
    whenever the floor asks for one, over ``secs`` from ``start``."""
    now, copied = start, 0
    while now < start + secs:
        wait = h.floor_wait(now, 10)
        if wait > 0:
            now += max(wait, 1e-6)      # the loop sleeps at least a little
            continue
        h.note_started(now, n, 10)
        copied += n
        now += copy_s
    return copied / secs


def test_busy_copies_keep_the_minimum_progress_rate_of_an_idle_rate_above_the_estimate():
    """An estimate can read low: idle moments between host bursts read
    0.88x the bench's idle restore in a traced run (10% of the estimate
    alone was 7.6-9.3% of the idle rate), a held calibration 0.87-1.21x in
    eight. The copier aims above the floor by that error."""
    h = HostYield()
    idle_measured(h, 100 << 20)
    assert h.idle_rate == pytest.approx(100 << 20)
    true_idle_rate = (100 << 20) / 0.88
    rate = busy_copy_rate(h, 61.0, 4.0, 1 << 20, 0.001)
    assert rate >= true_idle_rate * 0.10
    assert rate <= (100 << 20) * 0.10 * FLOOR_AIM * 1.05     # and no more than aimed at


def test_the_floor_is_a_budget_copies_while_hosts_paused_count_for_a_while():
    h = HostYield()
    h.idle_rate = 100 << 20                           # floor 10 MiB/s, aimed above
    floor = h.floor_rate(10)
    h.note_started(0.0, 0, 10)
    for i in range(50):                               # a host pause: 50 MiB in 0.5 s
        h.note_started(i * 0.01, 1 << 20, 10)
    # hosts are back: the pause paid the floor ahead, but only for
    # FLOOR_AHEAD_S, not for the 5 s its bytes would cover
    wait = h.floor_wait(0.5, 10)
    assert wait == pytest.approx(FLOOR_AHEAD_S, rel=0.05)
    # owing is bounded too: after 3 s in which no copy could be made, the
    # copier makes up FLOOR_OWED_S of the floor, not 3 s
    assert h.floor_wait(3.5, 10) == 0.0
    burst = 0
    while h.floor_wait(3.5, 10) == 0.0:
        h.note_started(3.5, 1 << 20, 10)
        burst += 1 << 20
    assert floor * FLOOR_OWED_S <= burst <= floor * FLOOR_OWED_S + (1 << 20)


def test_a_stretch_on_a_loaded_machine_lowers_the_idle_rate_slowly():
    h = HostYield()
    idle_measured(h, 100 << 20)
    assert not h.busy(100.0, 0.0, 8)
    for i in range(10):                               # 10 MiB in 0.2 s: other load
        h.note_copy(1 << 20, 0.02, busy=False, now=100.0 + (i + 1) * 0.02)
    assert h.busy(100.3, 100.3, 8)
    assert (100 << 20) * 0.9 <= h.idle_rate < 100 << 20
    # one idle copy's own rate is no throughput: not taken over a stretch's
    h.idle_copy_rate = 200 << 20
    assert h.floor_rate(10) == pytest.approx(h.idle_rate / 10 * FLOOR_AIM)
    h.idle_rate = None
    assert h.floor_rate(10) == pytest.approx((20 << 20) * FLOOR_AIM)


def test_the_idle_rate_counts_only_time_with_a_copy_in_flight():
    """Gaps in which the copier waited (for a CPU, a commit) are no copying
    time; copies overlapping at depth 2 count their time once."""
    h = HostYield()
    assert not h.busy(0.0, -1.0, 8)
    for i in range(20):                               # 1 MiB per 10 ms, 10 ms gaps
        h.note_copy(1 << 20, 0.01, busy=False, now=0.05 + i * 0.02)
    for i in range(20):                               # then two at a time, 20 ms each
        end = 1.0 + (i // 2 + 1) * 0.02
        h.note_copy(1 << 20, 0.02, busy=False, now=end)
    assert h.busy(2.0, 2.0, 8)
    assert h.idle_rate == pytest.approx((40 << 20) / 0.4)


def test_floor_before_an_idle_rate_was_measured_uses_one_copy_streams_rate():
    h = HostYield()
    assert h.floor_rate(10) == 0.0                    # nothing timed: the first copy goes now
    assert h.floor_wait(0.0, 10) == 0.0
    h.note_copy(64 << 10, 0.001, busy=True)
    assert h.floor_rate(10) == pytest.approx((64 << 10) / 0.001 / 10 * FLOOR_AIM)


def test_an_lu_whose_hosts_never_pause_measures_its_idle_rate_in_a_full_speed_window():
    """Else its floor came from one busy copy stream (a bench restore:
    0.68 GB/s against an idle restore's 2.2)."""
    h = HostYield()
    t = 0.0
    while not h.busy(t, t, 8):                        # a host command right now, always
        for _ in range(2):                            # two copies in flight, 2 ms each
            h.note_copy(1 << 20, 0.002, busy=False, now=t + 0.002)
        t += 0.002
        assert t < 1.0, "the full-speed window never ends"
    assert t == pytest.approx(IDLE_SAMPLE_S, abs=0.0021)
    assert h.idle_rate == pytest.approx((2 << 20) / 0.002)
    assert h.busy(t + 1.0, t + 1.0, 8)                # once: hosts first from now on


def test_the_full_speed_window_is_bounded_when_copies_stall():
    h = HostYield()
    assert not h.busy(0.0, 0.0, 8)
    assert not h.busy(CALIBRATE_S * 0.9, CALIBRATE_S * 0.9, 8)
    assert h.busy(CALIBRATE_S, CALIBRATE_S, 8)        # nothing copied: hosts first anyway
    assert h.idle_rate is None
    assert h.busy(CALIBRATE_S + 1.0, CALIBRATE_S + 1.0, 8)


def test_copies_at_low_priority_do_not_time_the_store():
    """A background copy (low CPU priority on a file store) that waited
    long for a CPU says nothing about the store: taken as a copy rate, each
    stall lowered the floor, so the next copies stalled longer."""
    h = HostYield()
    assert h.behind(0.0, 10)       # nothing timed: the first copy goes at normal priority
    h.note_copy(1 << 20, 0.001, busy=True)
    floor = h.floor_rate(10)
    rtt = h.rtt
    for _ in range(20):            # hosts keep every CPU busy: 200 ms per copy
        h.note_copy(1 << 20, 0.2, busy=True, background=True)
    assert h.floor_rate(10) == floor and h.rtt == rtt


def test_behind_the_floor_by_more_than_a_little_is_behind():
    h = HostYield()
    h.idle_rate = 100 << 20
    h.note_started(0.0, 1 << 20, 10)                  # pays ahead
    assert not h.behind(0.0, 10)
    late = (1 << 20) / h.floor_rate(10) + FLOOR_BEHIND_S
    assert not h.behind(late * 0.9, 10)
    assert h.behind(late * 1.1, 10)


class CountingStore(MemoryBlockStore):
    """Notes each write's size and whether it was background I/O."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__(size, name)
        self.sizes: list[int] = []
        self.background: list[int] = []

    async def write(self, offset, data):
        self.sizes.append(len(data))
        await super().write(offset, data)

    async def write_background(self, offset, data):
        self.background.append(len(data))
        await super().write(offset, data)


class CopyingWithin(MemoryBlockStore):
    """A clone that copies to the source by itself (as file to file does in
    the kernel): one write of the copy's size, no buffer of the copier's."""

    def copies_within(self, dst) -> bool:
        return True

    async def copy_within(self, dst, offset, length, background=False) -> bool:
        data = bytes(self.current[offset:offset + length])
        await (dst.write_background if background else dst.write)(offset, data)
        return True


async def differing_pair(n: int, store: type[CountingStore] = CountingStore,
                         clone: type[MemoryBlockStore] = MemoryBlockStore):
    """A fractured pair whose every extent differs, its source counting
    the sizes of the writes it gets."""
    r = Rig(n)
    c = store(r.size, "src")
    c.current[:] = r.src.current
    c.durable[:] = r.src.durable
    r.src = c
    if clone is not MemoryBlockStore:
        r.clones = [clone(r.size, "cln0")]
    eng = await r.boot()
    p = await r.fractured_pair()
    for e in range(n):
        await r.sio.write(e * ES, pattern(e, ES))
    return r, c, eng, p


async def restore_under_a_busy_host(r, eng, p, counting: CountingStore) -> float:
    """Restore the pair while a host reads back to back (QD1, never
    pausing) on an LU whose idle rate is known (no full-speed window
    first); the seconds from the copier's start to the job's end."""
    hosts = eng.volumes["src"].hosts
    hosts.idle_rate = 100 << 20
    # no held calibration: it would replace that rate
    await eng.set_throttle(p.id, batch_extents=16, depth=2, min_progress_pct=10, calibrate_ms=0)
    stop = asyncio.Event()

    async def host() -> None:
        while not stop.is_set():
            await r.sio.read(0, 512)
            await asyncio.sleep(0.0001)

    await eng.restore(p.id, paused=True)
    h = asyncio.ensure_future(host())
    await asyncio.sleep(0.05)                      # the host is at it
    counting.sizes.clear()
    t0 = time.monotonic()
    await eng.resume(p.id)
    await eng.wait_job(p.id, 60)                   # the floor lets it finish
    took = time.monotonic() - t0
    stop.set()
    await h
    return took


@pytest.mark.parametrize("clone", [MemoryBlockStore, CopyingWithin])
def test_a_restore_under_a_host_that_never_pauses_still_finishes_by_background_io(clone):
    async def go():
        r, counting, eng, p = await differing_pair(256, clone=clone)
        await restore_under_a_busy_host(r, eng, p, counting)
        # Under host load the copies are background I/O (off the loop on a
        # file); a shared machine's stalls may let a few go as idle copies.
        assert len(counting.background) > len(counting.sizes), \
            f"background {counting.background}, loop {counting.sizes}"
        # Stores that copy within: fewer, bigger copies than a batch (16
        # extents), less loop work per byte; through memory a batch each.
        want = min(BUSY_COPY_BYTES, 256 * ES) if clone is CopyingWithin else 16 * ES
        assert max(counting.background) == want, counting.background
        await eng.close()
    asyncio.run(go())


class StallingStore(CountingStore):
    """Background writes wait 0.5 s first: low CPU priority on a machine
    whose hosts keep every CPU busy."""

    async def write_background(self, offset, data):
        await asyncio.sleep(0.5)
        await super().write_background(offset, data)


def test_copies_stalled_at_low_priority_do_not_hold_up_the_floor():
    """Behind the floor, the copier copies at normal priority beside the
    stalled background copy: 16 copies that each stalled 0.5 s took 8 s."""
    async def go():
        r, stalling, eng, p = await differing_pair(256, StallingStore)
        await asyncio.sleep(0.2)                   # the writes above are history
        took = await restore_under_a_busy_host(r, eng, p, stalling)
        assert took < 3.0, f"restore took {took:.1f} s, {len(stalling.background)} background copies"
        await eng.close()
    asyncio.run(go())


def test_while_hosts_are_busy_the_copier_looks_again_at_most_every_busy_look():
    """Each look (hosts gone? behind the floor?) is loop work between host
    commands: every host window (2 ms here) it was hundreds a second."""
    async def go():
        r, counting, eng, p = await differing_pair(4096)
        hosts = eng.volumes["src"].hosts
        # End the idle stretch the pair's first sync left open: closed by
        # the restore's first look, it raised the idle rate set below to
        # the sync's (~800 MB/s: a copy per look) whenever the sync had
        # copied for IDLE_SAMPLE_S (a loaded machine).
        hosts.busy(time.monotonic(), time.monotonic(), 1)
        hosts.idle_rate = 1 << 20          # floor ~115 KiB/s: the copier mostly waits
        await eng.set_throttle(p.id, batch_extents=16, depth=2, min_progress_pct=10,
                               calibrate_ms=0)
        looks = 0
        busy = hosts.busy

        def counted(*args):
            nonlocal looks
            looks += 1
            return busy(*args)
        hosts.busy = counted
        stop = asyncio.Event()

        async def host() -> None:
            while not stop.is_set():
                await r.sio.read(0, 512)
                await asyncio.sleep(0.0001)

        h = asyncio.ensure_future(host())
        await asyncio.sleep(0.02)
        await eng.restore(p.id)
        await asyncio.sleep(0.5)
        stop.set()
        await h
        assert looks <= 0.5 / BUSY_LOOK_S * 1.5 + 10, f"{looks} looks in 0.5 s"
        await eng.close()
    asyncio.run(go())


def test_with_no_host_io_the_copier_copies_in_batches_on_the_loop():
    async def go():
        n = 256
        r, counting, eng, p = await differing_pair(n)
        await eng.set_throttle(p.id, batch_extents=16, depth=2)
        await asyncio.sleep(0.2)                        # the writes above are history
        counting.sizes.clear()
        await eng.restore(p.id)
        await eng.wait_job(p.id, 60)
        assert max(counting.sizes) == 16 * ES
        assert len(counting.sizes) <= n // 16 + 2
        assert not counting.background
        await eng.close()
    asyncio.run(go())


def test_a_held_calibration_takes_its_best_part():
    """Hosts' processes (an initiator logging in as the restore starts)
    still take CPUs from a held calibration: its rate is the best of its
    parts, as the copier's capacity; too few copies measure nothing."""
    h = HostYield()
    mib = 1 << 20
    # 20 ms at 1 GiB/s (1 MiB per ms), then 20 ms at half that
    landed = [(0.001 * (i + 1), mib) for i in range(20)]
    landed += [(0.02 + 0.002 * (i + 1), mib) for i in range(10)]
    assert h.note_calibration(landed) == pytest.approx(1000 * mib, rel=0.01)
    assert h.idle_rate == pytest.approx(1000 * mib, rel=0.01)
    assert h.note_calibration(landed[:CALIBRATE_MIN_COPIES]) is None
    assert h.idle_rate == pytest.approx(1000 * mib, rel=0.01)


class SlowWrites(CountingStore):
    """Each write takes 5 ms: the copier's idle rate is known."""

    async def write(self, offset, data):
        await asyncio.sleep(0.005)
        await super().write(offset, data)


async def restore_under_qd1_reads(r, eng, p, secs: float) -> float:
    """Start the pair's restore under a host reading at QD1 (never pausing
    long) and keep reading ``secs``; the longest the host waited for an
    answer once the restore began."""
    answered: list[float] = []
    stop = asyncio.Event()

    async def host() -> None:
        while not stop.is_set():
            await r.sio.read(r.size - 512, 512)
            answered.append(time.monotonic())
            await asyncio.sleep(0.001)

    h = asyncio.ensure_future(host())
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await eng.restore(p.id)
    await asyncio.sleep(secs)
    stop.set()
    await h
    return max(b - a for a, b in zip(answered, answered[1:]) if b > t0)


def test_a_job_measures_its_idle_rate_first_with_the_hosts_held(monkeypatch):
    """Measured between a host's commands the idle rate read 0.38-0.66 of
    an idle restore's (tests/bench/restore_latency.py), and the floor, a
    share of it, fell short. So a job starts with CALIBRATE_HOLD_S of
    full-depth copying while host commands wait at the gate, and the rate
    it measured is what progress shows."""
    monkeypatch.setattr(hostyield, "CALIBRATE_MIN_JOB", 0)     # a test-sized LU

    async def go():
        n = 512
        r, slow, eng, p = await differing_pair(n, SlowWrites)
        await eng.set_throttle(p.id, batch_extents=16, depth=2)
        eng.volumes["src"].hosts.idle_rate = 1.0     # what an earlier job learnt: replaced
        held = await restore_under_qd1_reads(r, eng, p, CALIBRATE_HOLD_S + 0.1)
        assert held >= CALIBRATE_HOLD_S * 0.9, f"hosts waited at most {held * 1e3:.1f} ms"
        full_depth = 2 * (16 * ES) / 0.005          # two 16-extent copies per 5 ms write
        rate = eng.progress(p.id).idle_rate
        assert rate is not None and 0.5 * full_depth < rate < 1.2 * full_depth, \
            f"idle rate {rate / 1e6:.0f} MB/s, full depth makes {full_depth / 1e6:.0f}"
        await eng.wait_job(p.id, 60)
        await eng.close()
    asyncio.run(go())


def test_the_hold_is_the_pairs_calibrate_ms_and_0_holds_nothing(monkeypatch):
    """calibrate_ms is the storage admin's: how long a job's start holds
    the hosts to measure the idle rate, 0 for no hold at all."""
    monkeypatch.setattr(hostyield, "CALIBRATE_MIN_JOB", 0)     # a test-sized LU

    async def go(ms: int) -> tuple[float, int]:
        n = 512
        r, slow, eng, p = await differing_pair(n, SlowWrites)
        # 4-extent copies, two per 5 ms: 320 ms of copying, longer than the hold
        await eng.set_throttle(p.id, batch_extents=4, depth=2, calibrate_ms=ms)
        gate = eng.volumes["src"].gate
        closed, closures = gate.closed, []

        def counted():
            closures.append(time.monotonic())
            return closed()
        gate.closed = counted
        held = await restore_under_qd1_reads(r, eng, p, ms / 1000 + 0.1)
        await eng.wait_job(p.id, 60)
        await eng.close()
        return held, len(closures)

    held, with_hold = asyncio.run(go(150))
    assert held >= 0.135, f"hosts waited at most {held * 1e3:.1f} ms"
    _, without = asyncio.run(go(0))
    assert with_hold == without + 1        # the job start's own hold(s) only
    with pytest.raises(ValueError, match="calibrate_ms"):
        Throttle(calibrate_ms=-1).validate()


def test_throttle_knobs_are_validated():
    with pytest.raises(ValueError, match="min_progress_pct"):
        Throttle(min_progress_pct=0).validate()
    with pytest.raises(ValueError, match="host_window"):
        Throttle(host_window=-1).validate()
