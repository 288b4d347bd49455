"""Model test for syncs and mirrored writes under power cuts.

Host writes hit the source while a pair is syncing or synchronized (mirrored
through the dirty-region log) or fractured (tracked through write-intent
regions and lazily committed exact delta bits); power cuts freeze the engine at random points
and drop unflushed store writes. After recovery and a final fracture, every
extent where source and clone differ must have its delta bit set; after one
more sync they must be identical.
"""
from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from restore_core.pair import PairState

from .test_model import SIZE, Crash, bury, byte_range, freeze, power_cut, run_life
from .util import ES, Rig

# More examples in long runs: LIVERESTORE_MODEL_EXAMPLES=2000 pytest -m ...
EXAMPLES = int(os.environ.get("LIVERESTORE_MODEL_EXAMPLES", "120"))

# A power cut abandons coroutines mid-step; when they are collected Python
# reports their unfinished awaits. That is the point of the test, not a bug.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning",
                                        "ignore::RuntimeWarning")

NEXT = SIZE // ES

step = st.one_of(
    st.tuples(st.just("write"), byte_range(), st.booleans()),
    st.tuples(st.just("sleep"), st.integers(0, 20)),
    st.tuples(st.just("clean")),          # let the region cleaner run once
    st.tuples(st.just("resync")),
    st.tuples(st.just("fracture")),       # then writes are tracked, not mirrored
)
life = st.tuples(st.lists(step, min_size=1, max_size=10), st.booleans(), st.integers(0, 25))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lives=st.lists(life, min_size=1, max_size=5), full_first=st.booleans(),
       keep_seed=st.integers(0, 2**16))
def test_sync_and_mirror_model(lives, full_first, keep_seed):
    bury()
    rig = Rig(NEXT, seed=3)
    tag = iter(range(1, 10**6))
    loop = asyncio.new_event_loop()

    async def setup():
        eng = await rig.boot()
        pair = await eng.create_pair("src", rig.cln.name, extent_size=ES)
        if not full_first:
            await eng.wait_job(pair.id, 30)
        return eng, pair

    eng, pair = loop.run_until_complete(setup())

    async def one_life(steps, cut, cut_after):
        tasks = []
        for s in steps:
            if s[0] == "write":
                (off, n), fua = s[1], s[2]
                data = bytes([next(tag) % 251]) * n
                # half the plain writes try the synchronous fast path first
                # (as the SCSI layer does for non-FUA writes)
                if not fua and (off // 512) % 2 == 0 and rig.sio.try_write(off, [data]):
                    continue
                tasks.append(asyncio.ensure_future(rig.sio.write(off, data, fua=fua)))
            elif s[0] == "sleep":
                for _ in range(s[1]):
                    await asyncio.sleep(0)
            elif s[0] == "clean":
                # run one region-clean pass now instead of waiting 0.5 s
                rl = pair.regionlog
                if pair.mirroring and rl.candidates:
                    gen = rl.gen
                    await asyncio.gather(rig.src.flush(), rig.cln.flush())
                    if pair.mirroring and rl.clean(gen):
                        await eng.committer.commit()
            elif s[0] == "resync" and pair.state in (PairState.SYNCHRONIZED,
                                                      PairState.FRACTURED):
                await asyncio.gather(*tasks)
                await eng.sync(pair.id)
            elif s[0] == "fracture" and pair.state is PairState.SYNCHRONIZED:
                await asyncio.gather(*tasks)
                await eng.fracture(pair.id)
        if cut:
            for _ in range(cut_after):
                await asyncio.sleep(0)
            raise Crash
        await asyncio.gather(*tasks, return_exceptions=False)

    for steps, cut, cut_after in lives:
        if run_life(loop, one_life(steps, cut, cut_after)) == "crash":
            freeze(loop, eng)
            power_cut(rig, keep_seed)
            loop = asyncio.new_event_loop()
            eng = loop.run_until_complete(rig.boot())
            pair = eng.pair(pair.id)

    async def finish():
        if pair.job is not None:
            await eng.wait_job(pair.id, 30)
        assert pair.state in (PairState.SYNCHRONIZED, PairState.FRACTURED)
        await eng.fracture(pair.id)
        src, cln = bytes(rig.src.current), bytes(rig.cln.current)
        for e in range(NEXT):
            a, b = e * ES, (e + 1) * ES
            if src[a:b] != cln[a:b]:
                assert pair.maps.delta.test(e), f"extent {e} differs but its delta bit is clear"
        await eng.sync(pair.id)
        await eng.wait_job(pair.id, 30)
        assert bytes(rig.src.current) == bytes(rig.cln.current)
        await eng.close()

    loop.run_until_complete(finish())
    loop.close()
    bury()
