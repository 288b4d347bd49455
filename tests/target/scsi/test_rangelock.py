import asyncio

import pytest

from target.scsi.rangelock import RangeLock

from .util import asynctest


@asynctest
async def test_shared_holders_do_not_wait_for_each_other():
    lock = RangeLock()
    a = await lock.acquire(0, 100)
    b = await lock.acquire(50, 100)
    lock.release(a)
    lock.release(b)


@asynctest
async def test_exclusive_waits_for_overlapping_shared_and_blocks_later_shared():
    lock = RangeLock()
    order: list[str] = []
    w = await lock.acquire(0, 10)

    async def caw():
        async with lock.hold(5, 10, exclusive=True):
            order.append("caw")

    async def late_write():
        async with lock.hold(8, 1):
            order.append("write")

    t1 = asyncio.create_task(caw())
    await asyncio.sleep(0)
    t2 = asyncio.create_task(late_write())
    await asyncio.sleep(0)
    assert order == []            # CAW waits for the write; the late write queues behind CAW
    lock.release(w)
    await asyncio.gather(t1, t2)
    assert order == ["caw", "write"]


@asynctest
async def test_disjoint_ranges_proceed_while_exclusive_held():
    lock = RangeLock()
    x = await lock.acquire(0, 10, exclusive=True)
    y = await asyncio.wait_for(lock.acquire(10, 10), 5)   # adjacent, no overlap
    z = await asyncio.wait_for(lock.acquire(100, 10, exclusive=True), 5)
    for r in (x, y, z):
        lock.release(r)


@asynctest
async def test_cancelled_waiter_leaves_no_trace():
    lock = RangeLock()
    x = await lock.acquire(0, 10, exclusive=True)
    t = asyncio.create_task(lock.acquire(0, 10))
    await asyncio.sleep(0)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    lock.release(x)
    assert not lock._waiting and not lock._held and lock._exclusive_count == 0
    y = await asyncio.wait_for(lock.acquire(0, 10, exclusive=True), 5)
    lock.release(y)
