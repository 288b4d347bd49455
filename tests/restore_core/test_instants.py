"""A fractured pair's instants (restore_core.instants) over a RAM store that
keeps them the way an RBD image keeps snapshots: the engine's side of the
exact post-crash delta, its fallbacks and the instants' lifetime."""
from __future__ import annotations

import asyncio
import logging

from restore_core.blockstore import BlockStoreError, MemoryBlockStore
from restore_core.committer import load_map
from restore_core.engine import Engine
from restore_core import instants
from restore_core.instants import PREFIX
from restore_core.pair import Pair
from restore_core.restoremaps import INTENT_EXTENTS
from restore_core.stores.missing import MissingBlockStore

from .group_rig import LUS, GroupRig
from .util import ES, Rig, pattern


class InstantStore(MemoryBlockStore):
    """Keeps instants: for each, the (offset, length) of every write since."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__(size, name)
        self.snaps: dict[str, list[tuple[int, int]]] = {}
        self.refuse: str | None = None      # mark_instant's error, if set
        self._n = 0

    def _apply(self, offset: int, blob: bytes) -> None:
        super()._apply(offset, blob)
        for written in self.snaps.values():
            written.append((offset, len(blob)))

    async def mark_instant(self, name: str) -> str | None:
        if self.refuse is not None:
            raise BlockStoreError(f"{self.name}: {self.refuse}")
        self._n += 1
        token = f"{name}@{self._n}"
        self.snaps[token] = []
        return token

    async def changed_since(self, instant, ranges):
        if instant not in self.snaps:
            raise BlockStoreError(f"{self.name}: snapshot {instant} is gone")
        out = []
        for off, n in self.snaps[instant]:
            for a, m in ranges:
                lo, hi = max(off, a), min(off + n, a + m)
                if lo < hi:
                    out.append((lo, hi - lo))
        return out

    async def drop_instant(self, instant: str) -> None:
        self.snaps.pop(instant, None)

    async def instants(self, prefix: str) -> list[str]:
        return [t for t in self.snaps if t.startswith(prefix)]


def run(coro):
    return asyncio.run(coro)


def rig(nextents: int = 3 * INTENT_EXTENTS) -> Rig:
    r = Rig(nextents)
    r.clones[0] = InstantStore(r.size, "cln0")
    return r


def crash(r: Rig) -> None:
    """The engine stops with no close: nothing more reaches the metadata."""
    eng = r.engine
    eng._lazy.cancel()
    eng._watch.cancel()


async def restart(r: Rig, p: Pair) -> tuple[Engine, Pair]:
    """A crash, then a start on the same metadata and stores."""
    crash(r)
    eng = await r.boot()
    return eng, eng.pair(p.id)


async def fractured_then_written(r: Rig) -> Pair:
    """Boot, a fractured pair, and a write to its clone's extent 3."""
    await r.boot()
    p = await r.fractured_pair()
    await r.cios[0].write(3 * ES, pattern(1, ES))
    return p


#: what widening makes of a write in the first region
FIRST_REGION = list(range(INTENT_EXTENTS))


def persisted_delta(r: Rig, p) -> set[int]:
    snap = r.meta.load()
    return set(load_map(p.nextents, snap.maps.get(p.map_key("delta"), {})).set_in(0, p.nextents))


def test_a_crash_takes_the_clone_side_delta_from_the_instant_not_whole_regions():
    async def go():
        r = rig()
        await r.boot()
        p = await r.fractured_pair()
        assert list(p.instants) == ["clone"]
        await r.sio.write(520 * ES, pattern(9, ES))      # a file source: no instant
        clone_written = [5, 17, 100, 101]
        for e in clone_written:
            await r.cios[0].write(e * ES + 7, pattern(e, 100))
        # the first write of a region committed with its region; the rest
        # of the exact bits are only in memory when the daemon dies
        assert not {17, 100, 101} & persisted_delta(r, p)
        eng2, p2 = await restart(r, p)
        got = set(p2.maps.delta.set_in(0, p2.nextents))
        # exactly the clone's writes, plus the source's whole region
        assert got == set(clone_written) | set(range(2 * INTENT_EXTENTS, p2.nextents))
        assert not p2.maps.covered.any(0, p2.maps.covered.nbits)
        assert persisted_delta(r, p2) == got                  # and durable
        await eng2.close()
    run(go())


def test_a_region_written_on_both_sides_widens():
    async def go():
        r = rig()
        p = await fractured_then_written(r)
        await r.sio.write(200 * ES, pattern(2, ES))      # same region, the file side
        eng2, p2 = await restart(r, p)
        assert p2.maps.delta.set_in(0, p2.nextents) == FIRST_REGION
        await eng2.close()
    run(go())


def test_a_refused_instant_falls_back_to_widening_with_one_warning(caplog):
    async def go():
        r = rig()
        r.cln.refuse = "no space left for a snapshot"
        await r.boot()
        with caplog.at_level(logging.WARNING, "restore_core.instants"):
            p = await r.fractured_pair()
        why = [m for m in caplog.messages if "no space left for a snapshot" in m]
        assert len(why) == 1 and "widens" in why[0]
        assert p.instants == {} and r.cln.snaps == {}
        await r.cios[0].write(3 * ES, pattern(1, ES))
        eng2, p2 = await restart(r, p)
        assert p2.maps.delta.set_in(0, p.nextents) == FIRST_REGION
        await eng2.close()
    run(go())


def test_an_instant_gone_at_restart_widens_and_is_forgotten():
    async def go():
        r = rig()
        p = await fractured_then_written(r)
        r.cln.snaps.clear()                 # an operator removed the snapshot
        eng2, p2 = await restart(r, p)
        assert p2.maps.delta.set_in(0, p.nextents) == FIRST_REGION
        assert p2.instants == {}
        assert r.meta.load().pairs[p.id]["instants"] == {}
        await eng2.close()
    run(go())


def test_instants_live_from_fracture_to_the_next_sync_restore_or_delete():
    async def go():
        r = rig(16)
        eng = await r.boot()
        p = await r.fractured_pair()
        first = p.instants["clone"]
        assert list(r.cln.snaps) == [first]
        await eng.sync(p.id)
        assert p.instants == {} and r.cln.snaps == {}
        await eng.wait_job(p.id, 10)
        await eng.fracture(p.id)
        assert list(r.cln.snaps) == [p.instants["clone"]] != [first]
        await eng.restore(p.id)
        assert p.instants == {} and r.cln.snaps == {}
        await eng.wait_job(p.id, 10)
        # a protected restore ends fractured, with no instant (see _job_finished)
        assert p.instants == {} and r.cln.snaps == {}
        await eng.fracture(p.id)                # already fractured: nothing changes
        assert r.cln.snaps == {}
        await eng.sync(p.id)
        await eng.wait_job(p.id, 10)
        await eng.fracture(p.id)
        assert list(r.cln.snaps) == [p.instants["clone"]]
        await eng.delete_pair(p.id)
        assert r.cln.snaps == {}
        await eng.close()
    run(go())


def test_a_restart_removes_stale_instants_and_keeps_the_recorded_and_foreign_ones():
    async def go():
        r = rig(16)
        await r.boot()
        p = await r.fractured_pair()
        kept = p.instants["clone"]
        stale = await r.cln.mark_instant(f"{PREFIX}1.{p.id}")    # a crash before its commit
        other = await r.cln.mark_instant(f"{PREFIX}2.gone-pair")  # of a pair deleted meanwhile
        user = await r.cln.mark_instant(f"{PREFIX}before-upgrade")   # not in our form
        crash(r)
        eng2 = await r.boot()
        assert set(r.cln.snaps) == {kept, user}
        assert stale not in r.cln.snaps and other not in r.cln.snaps
        await eng2.delete_pair(p.id)
        await eng2.forget_instants(eng2.remove_volume("cln0"))
        assert set(r.cln.snaps) == {user}       # a volume delete leaves only the user's
        await eng2.close()
    run(go())


def test_a_record_from_before_instants_loads_with_none():
    p = Pair.from_record({"id": "c", "source": "s", "clone": "c", "size": 16 * ES,
                          "extent_size": ES, "state": "fractured"})
    assert p.instants == {}
    bad = Pair.from_record({"id": "c", "source": "s", "clone": "c", "size": 16 * ES,
                            "extent_size": ES, "state": "fractured",
                            "instants": {"clone": 5, "elsewhere": "x"}})
    assert bad.instants == {}


def test_a_group_fracture_marks_every_members_clone_and_its_restore_drops_them():
    async def go():
        r = GroupRig()
        for lu in LUS:
            name = lu + "-clone"
            r.stores[name] = InstantStore(r.size, name)
        eng, groups = await r.boot()
        await r.synchronized_group("db")
        await groups.fracture("db")
        for lu in LUS:
            p = eng.pair(lu + "-clone")
            assert list(r.stores[p.clone].snaps) == [p.instants["clone"]]
        await groups.restore("db")
        for lu in LUS:
            assert eng.pair(lu + "-clone").instants == {} and r.stores[lu + "-clone"].snaps == {}
        await eng.close()
    run(go())


def test_with_the_clone_offline_at_restart_the_exact_delta_waits_for_relink():
    async def go():
        r = rig()
        p = await fractured_then_written(r)
        await r.cios[0].write(9 * ES, pattern(2, ES))
        crash(r)
        eng = Engine(r.meta, r.undo_images)
        eng.add_volume("src", r.src)
        eng.add_volume("cln0", MissingBlockStore("cln0", r.size, "cluster down"),
                       offline="cluster down")
        await eng.start()
        p2 = eng.pair(p.id)
        assert not p2.maps.delta.test(9) and p2.maps.covered.test(0)
        await eng.relink("cln0", r.cln)
        assert p2.maps.delta.set_in(0, p2.nextents) == [3, 9]
        assert p2.instants == p.instants
        await eng.close()
    run(go())


def test_with_both_sides_keeping_instants_both_sides_are_exact():
    async def go():
        r = rig()
        src = InstantStore(r.size, "src")
        src.current[:] = r.src.current
        src.durable[:] = r.src.durable
        r.src = src
        await r.boot()
        p = await r.fractured_pair()
        assert sorted(p.instants) == ["clone", "source"]
        await r.sio.write(260 * ES, pattern(1, ES))      # the first write of each region
        await r.cios[0].write(2 * ES, pattern(2, ES))
        await r.sio.write(7 * ES, pattern(3, 10))
        await r.cios[0].write(300 * ES, pattern(4, 10))
        eng2, p2 = await restart(r, p)
        assert p2.maps.delta.set_in(0, p2.nextents) == [2, 7, 260, 300]
        await eng2.close()
    run(go())


def test_a_snapshot_that_takes_too_long_leaves_the_fracture_to_widening(monkeypatch, caplog):
    """Hosts are held while the fracture waits for it: a cluster in trouble
    must not hold them for its whole op timeout."""
    monkeypatch.setattr(instants, "MARK_TIMEOUT_S", 0.05)

    async def go():
        r = rig(16)
        marked = r.cln.mark_instant

        async def slow(name: str) -> str | None:
            await asyncio.sleep(30)
            return await marked(name)
        r.cln.mark_instant = slow
        await r.boot()
        with caplog.at_level(logging.WARNING, "restore_core.instants"):
            p = await asyncio.wait_for(r.fractured_pair(), 10)
        assert p.state.value == "fractured" and p.instants == {}
        assert [m for m in caplog.messages if "did not answer within 0.05 s" in m]
        await r.engine.close()
    run(go())
