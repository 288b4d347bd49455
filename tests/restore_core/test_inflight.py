"""The copy-on-demand map: claims, and waiters woken when a claim ends."""
import asyncio

from restore_core.inflight import InFlightMap


def test_a_claim_makes_no_future_until_someone_waits():
    # The background copier claims every extent it copies; a future (and on
    # Python 3.11 a getpid() system call) per claim was loop work per
    # extent while hosts waited. Outside a running loop a future could not
    # be made at all.
    m = InFlightMap()
    assert m.try_claim(3) and not m.try_claim(3) and 3 in m
    m.release_all([3])
    assert len(m) == 0 and m.try_claim(3)


def test_waiters_are_woken_when_the_claim_ends_and_a_cancelled_one_cancels_nothing():
    async def main() -> None:
        m = InFlightMap()
        assert m.try_claim(5) and m.try_claim(6)
        assert not await m.wait(0, 5)                 # nothing claimed there: no wait
        first = asyncio.create_task(m.wait(5, 6))
        second = asyncio.create_task(m.wait(0, 100))  # the long-range scan
        quitter = asyncio.create_task(m.wait(6, 7))
        await asyncio.sleep(0.01)
        assert not (first.done() or second.done() or quitter.done())
        quitter.cancel()                              # an aborted host task
        m.release(5)
        assert await asyncio.wait_for(first, 1) is True
        await asyncio.sleep(0.01)
        assert not second.done()                      # 6 is still claimed
        m.release(6)
        assert await asyncio.wait_for(second, 1) is True
        assert len(m) == 0
    asyncio.run(main())
