"""target.eager: a coroutine started at once, handed to a Task only when it
suspends, behaves as if it had been a Task from the start."""
from __future__ import annotations

import asyncio

import pytest

from target import eager


def test_a_coroutine_that_never_waits_runs_to_its_end_at_once():
    seen = []

    async def quick() -> None:
        seen.append(1)

    async def main() -> None:
        assert eager.start(quick()) is None
        assert seen == [1]
    asyncio.run(main())


def test_a_waiting_coroutine_goes_on_where_it_stopped_with_what_it_awaited():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        bad = loop.create_future()
        trail = []

        async def waits() -> str:
            trail.append("started")
            got = await fut
            trail.append(got)
            await asyncio.sleep(0)              # a bare yield on the way
            try:
                await bad
            except ValueError as e:
                trail.append(str(e))
            return "done"

        task = eager.start(waits(), loop)
        assert trail == ["started"] and isinstance(task, asyncio.Task)
        fut.set_result("value")
        for _ in range(3):
            await asyncio.sleep(0)
        assert trail == ["started", "value"]
        bad.set_exception(ValueError("boom"))
        assert await task == "done"
        assert trail == ["started", "value", "boom"]
        assert "waits" in repr(task) or task.get_stack() is not None
    asyncio.run(main())


@pytest.mark.parametrize("first_step_ran", [False, True])
def test_cancellation_reaches_the_coroutine_where_it_waits(first_step_ran):
    """Cancelled before or after its Task first ran, the coroutine gets the
    CancelledError at the await it is suspended in (so its clean-up runs),
    and the Task ends cancelled."""
    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        trail = []

        async def waits() -> None:
            try:
                await fut
            except asyncio.CancelledError:
                trail.append("cancelled")
                raise
            finally:
                trail.append("cleaned up")

        task = eager.start(waits())
        if first_step_ran:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trail == ["cancelled", "cleaned up"] and task.cancelled()
    asyncio.run(main())


def test_an_exception_before_the_first_suspension_propagates_to_the_caller():
    async def fails() -> None:
        raise KeyError("early")

    async def main() -> None:
        with pytest.raises(KeyError):
            eager.start(fails())
    asyncio.run(main())
