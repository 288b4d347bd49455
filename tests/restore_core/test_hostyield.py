"""The copier yields to hosts over a time window, with a minimum progress rate."""
import asyncio

import pytest

from restore_core.blockstore import MemoryBlockStore
from restore_core.hostyield import MIN_WINDOW_S, HostYield
from restore_core.pair import Throttle

from .util import ES, Rig, pattern


def test_busy_is_a_window_of_round_trips_not_an_in_flight_count():
    h = HostYield()
    h.note_copy(64 << 10, 0.002, busy=False)          # one copy: 2 ms round trip
    assert h.window(8) == pytest.approx(0.016)
    # a QD1 host: nothing in flight right now, its last command 5 ms ago
    assert h.busy(now=10.0, last_host_io=9.995, host_window=8)
    assert not h.busy(now=10.0, last_host_io=9.98, host_window=8)
    assert not h.busy(now=10.0, last_host_io=10.0, host_window=0)   # yielding off
    h.note_copy(64 << 10, 1e-6, busy=False)
    assert h.window(1) >= MIN_WINDOW_S


def test_busy_copies_are_paced_to_the_minimum_progress_rate():
    h = HostYield()
    # idle: 100 MiB copied in 1 s -> idle rate 100 MiB/s
    assert not h.busy(0.0, -1.0, 8)
    for i in range(100):
        h.note_copy(1 << 20, 0.01, busy=False, now=(i + 1) * 0.01)
    # the job ended; the next one starts a minute later under host load
    assert h.busy(61.0, 61.0, 8)                      # a host arrives: the idle stretch ends
    assert h.idle_rate == pytest.approx(100 << 20)
    assert h.floor_rate(10) == pytest.approx(10 << 20)
    # busy for 2 s, copies of 64 KiB whenever the pacing allows
    now, copied = 61.0, 0
    while now < 63.0:
        now += h.busy_delay(now, 64 << 10, 10)
        copied += 64 << 10
    rate = copied / 2.0
    assert (10 << 20) * 0.95 <= rate <= (10 << 20) * 1.05


def test_busy_copies_grow_until_they_meet_the_floor():
    """Host I/O queues each small copy behind it: 64 KiB copies that take
    50 ms each make 1.3 MB/s; the span grows until the floor is met."""
    h = HostYield()
    h.idle_rate = 100 << 20                           # floor 10 MiB/s
    assert h.busy(0.0, 0.0, 8)
    now, copied, es = 0.0, 0, 64 << 10
    while now < 5.0:
        n = h.busy_span(es, 10, 64) * es
        wait = h.busy_delay(now, n, 10)
        h.note_copy(n, 0.05, busy=True)               # each copy takes 50 ms
        now += max(0.05, wait)
        copied += n
    assert h.busy_span(es, 10, 64) == 16              # 2 x 10 MiB/s x 50 ms / 64 KiB
    assert copied / 5.0 >= (10 << 20) * 0.9


def test_floor_before_an_idle_rate_was_measured_uses_one_copy_streams_rate():
    h = HostYield()
    assert h.floor_rate(10) == 0.0                    # nothing timed: the first copy just goes
    h.note_copy(64 << 10, 0.001, busy=True)
    assert h.floor_rate(10) == pytest.approx((64 << 10) / 0.001 / 10)


class CountingStore(MemoryBlockStore):
    def __init__(self, size: int, name: str) -> None:
        super().__init__(size, name)
        self.sizes: list[int] = []

    async def write(self, offset, data):
        self.sizes.append(len(data))
        await super().write(offset, data)


async def differing_pair(n: int):
    """A fractured pair whose every extent differs, its source counting
    the sizes of the writes it gets."""
    r = Rig(n)
    c = CountingStore(r.size, "src")
    c.current[:] = r.src.current
    c.durable[:] = r.src.durable
    r.src = c
    eng = await r.boot()
    p = await r.fractured_pair()
    for e in range(n):
        await r.sio.write(e * ES, pattern(e, ES))
    return r, c, eng, p


def test_a_restore_under_a_host_that_never_pauses_still_finishes_in_small_copies():
    async def go():
        n = 256
        r, counting, eng, p = await differing_pair(n)
        await eng.set_throttle(p.id, batch_extents=16, depth=2, min_progress_pct=10)
        stop = asyncio.Event()

        async def host() -> None:                      # QD1 reads, back to back
            while not stop.is_set():
                await r.sio.read(0, 512)
                await asyncio.sleep(0.0001)

        await eng.restore(p.id, paused=True)
        h = asyncio.ensure_future(host())
        await asyncio.sleep(0.05)                      # the host is at it
        counting.sizes.clear()
        await eng.resume(p.id)
        await eng.wait_job(p.id, 60)                   # the floor lets it finish
        stop.set()
        await h
        # Busy copies are one extent unless that cannot meet the floor; a
        # shared machine's stalls may make a few bigger: the median is one.
        sizes = sorted(counting.sizes)
        assert sizes[len(sizes) // 2] == ES, f"copies under host load: {sizes}"
        await eng.close()
    asyncio.run(go())


def test_with_no_host_io_the_copier_copies_in_batches():
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
        await eng.close()
    asyncio.run(go())


def test_throttle_knobs_are_validated():
    with pytest.raises(ValueError, match="min_progress_pct"):
        Throttle(min_progress_pct=0).validate()
    with pytest.raises(ValueError, match="host_window"):
        Throttle(host_window=-1).validate()
