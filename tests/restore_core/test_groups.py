"""Consistency groups in the engine: membership, ownership, one instant."""
from __future__ import annotations

import asyncio

import pytest

from restore_core.engine import EngineError
from restore_core.pair import PairState

from .group_rig import LUS, GroupRig
from .util import ES, pattern


def run(coro):
    return asyncio.run(coro)


def test_membership_is_persisted_and_a_pair_is_in_one_group_only():
    async def go():
        r = GroupRig()
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        with pytest.raises(EngineError, match="already exists"):
            await groups.create("db")
        await groups.create("other")
        with pytest.raises(EngineError, match="pair a-clone is in group db"):
            await groups.add("other", ["a-clone"])
        with pytest.raises(EngineError, match="no pair 'nope'"):
            await groups.add("other", ["nope"])
        with pytest.raises(EngineError, match="invalid group name"):
            await groups.create("bad name\n")
        await groups.remove("db", ["b-clone"])
        await groups.add("other", ["b-clone"])
        await eng.close()
        eng, groups = await r.boot()          # a restart reads the same groups
        assert groups.show("db")["pairs"] == ["a-clone"]
        assert groups.show("other")["pairs"] == ["b-clone"]
        await groups.delete("other")
        await eng.fracture("b-clone")         # free again
        assert [g["name"] for g in groups.list()] == ["db"]
        await eng.close()
    run(go())


def test_members_cannot_be_operated_one_by_one_except_remove():
    async def go():
        r = GroupRig()
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        for op in (eng.fracture("a-clone"), eng.sync("a-clone"), eng.restore("a-clone"),
                   eng.pause("a-clone"), eng.resume("a-clone"), eng.delete_pair("a-clone")):
            with pytest.raises(EngineError, match="belongs to group db.*group remove db a-clone"):
                await op
        assert r.states() == ["synchronized", "synchronized"]
        await groups.remove("db", ["a-clone"])
        await eng.fracture("a-clone")
        await eng.close()
    run(go())


def test_group_fracture_is_one_transaction_at_one_instant():
    async def go():
        r = GroupRig()
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        records: list[dict] = []      # the pair records of each metadata transaction
        commit = r.meta.commit
        r.meta.commit = lambda txn: (records.append(dict(txn.pairs)), commit(txn))[1]
        # A write in flight when the fracture starts completes first and is
        # in the clone; one issued after waits at the gate and is not.
        before = asyncio.ensure_future(r.ios["a"].write(0, pattern(1, ES)))
        fracture = asyncio.ensure_future(groups.fracture("db"))
        while not eng.volumes["b-clone"].gate.is_closed:     # the last gate in name order
            await asyncio.sleep(0)
        after = asyncio.ensure_future(r.ios["b"].write(0, pattern(2, ES)))
        await asyncio.gather(before, fracture, after)
        changes = [{p: rec["state"] for p, rec in t.items()} for t in records if t]
        assert changes == [{"a-clone": "fractured", "b-clone": "fractured"}]
        assert r.states() == ["fractured", "fractured"]
        assert bytes(r.stores["a-clone"].current[:ES]) == pattern(1, ES)
        assert bytes(r.stores["b-clone"].current[:ES]) != pattern(2, ES)
        assert eng.pair("b-clone").delta.test(0)
        await groups.fracture("db")           # already fractured: nothing to do
        assert len([t for t in records if t]) == 1
        await eng.close()
    run(go())


def test_group_restore_sync_pause_resume_wait_act_on_every_member():
    async def go():
        r = GroupRig()
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        await groups.fracture("db")
        for lu in LUS:
            await r.ios[lu].write(ES, pattern(7, 2 * ES))
        await groups.restore("db", paused=True)
        assert r.states() == ["restoring", "restoring"]
        await groups.pause("db")
        await groups.resume("db")
        await groups.wait("db", 30)
        assert r.states() == ["fractured", "fractured"]
        for lu in LUS:
            assert r.stores[lu].current == r.stores[lu + "-clone"].current
        with pytest.raises(EngineError, match="group db has no sync or restore running"):
            await groups.pause("db")
        await groups.sync("db")
        await groups.wait("db", 30)
        assert r.states() == ["synchronized", "synchronized"]
        await eng.close()
    run(go())


def test_group_restore_refuses_unless_every_member_can():
    async def go():
        r = GroupRig()
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        await groups.remove("db", ["a-clone"])
        await eng.fracture("a-clone")
        await groups.add("db", ["a-clone"])
        with pytest.raises(EngineError, match="pair b-clone is synchronized; only a fractured"):
            await groups.restore("db")
        assert r.states() == ["fractured", "synchronized"]
        await groups.delete("db")
        await eng.close()
    run(go())
