"""Power cuts during a group fracture or restore start: all members or none.

Every cut point is tried in turn, from the first loop step of the group
operation to past its end, with host writes to both sources in flight: the
engine is frozen there (each life in its own event loop, see test_model),
every unflushed store write is dropped, and after a reboot the members'
states must be either all as before or all changed.
"""
from __future__ import annotations

import asyncio

import pytest

from .group_rig import LUS, GroupRig
from .test_model import Crash, bury, freeze, run_life
from .util import ES, pattern

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning",
                                        "ignore::RuntimeWarning")

BEFORE_AFTER = {"fracture": ("synchronized", "fractured"),
                "restore": ("fractured", "restoring")}
MAX_STEPS = 200


def life(op: str, cut: int) -> tuple[list[str], bool]:
    """One engine life cut ``cut`` loop steps into the group operation:
    the states after reboot, and whether the operation had returned."""
    r = GroupRig(seed=cut)
    loop = asyncio.new_event_loop()

    async def setup():
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        if op == "restore":
            await groups.fracture("db")
            for lu in LUS:
                await r.ios[lu].write(0, pattern(9, 3 * ES), fua=True)
        return eng, groups

    eng, groups = loop.run_until_complete(setup())
    done: list[bool] = [False]

    async def cut_short():
        task = asyncio.ensure_future(getattr(groups, op)("db"))
        writes = [asyncio.ensure_future(r.ios[lu].write(ES, pattern(5, ES))) for lu in LUS]
        for _ in range(cut):
            await asyncio.sleep(0)
        done[0] = task.done() and task.exception() is None
        del writes
        raise Crash

    assert run_life(loop, cut_short()) == "crash"
    freeze(loop, eng)
    r.power_cut()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(r.boot())
    states = r.states()
    loop.run_until_complete(r.engine.close())
    loop.close()
    return states, done[0]


@pytest.mark.parametrize("op", ["fracture", "restore"])
def test_power_cut_during_a_group_operation_changes_all_members_or_none(op):
    before, after = BEFORE_AFTER[op]
    seen = set()
    for cut in range(MAX_STEPS):
        bury()
        states, returned = life(op, cut)
        assert states in ([before] * 2, [after] * 2), \
            f"cut {cut} steps into group {op}: members are {states}"
        if returned:
            assert states == [after] * 2, f"group {op} returned but did not last"
        seen.add(states[0])
        if returned:
            break
    else:
        pytest.fail(f"group {op} did not finish in {MAX_STEPS} loop steps")
    assert seen == {before, after}, "the cuts never fell on both sides of the commit"
    bury()
