"""VolumeIO's one routing decision per host I/O (route_read/route_write):
straight to the store when nothing has to happen first -- including the
restored, durably marked extents of a protected restore -- else the work,
with nothing a host could see done by the decision."""
import asyncio
import random

import pytest

from restore_core.lunio import Access, NotReadyError
from restore_core.pair import PairState

from .util import ES, Rig, pattern


def run(coro):
    return asyncio.run(coro)


def test_writes_to_restored_marked_extents_of_a_protected_restore_go_straight_to_the_store():
    async def go():
        r = Rig(32)
        eng = await r.boot()
        p = await r.fractured_pair()
        for e in range(32):
            await r.sio.write(e * ES, pattern(0xEE, ES))
        clone_img = bytes(r.cln.current)
        await eng.restore(p.id, paused=True)          # copy-on-demand only
        await r.sio.write(10 * ES, pattern(0x10, ES))          # fills extent 10 and marks it
        await r.sio.write(12 * ES + 1, b"x")                   # copies 12 first, marks it
        await p.copier.ensure_copied(14, 15)                   # restored, not host-written
        before, copied = bytes(r.src.current), p.bytes_copied
        # unrestored (11), or restored but not marked (14): work, and the
        # decision changed nothing
        assert not r.sio.try_write(11 * ES, [b"u" * 512])
        assert not r.sio.try_write(14 * ES, [b"u" * 512])
        assert bytes(r.src.current) == before and p.bytes_copied == copied
        # restored and durably marked: done at once, no commit, no copy
        durable = r.engine.committer.durable_id
        assert r.sio.try_write(10 * ES + 512, [b"d" * 512])
        assert r.sio.try_write(12 * ES, [memoryview(b"e" * 1024)])
        assert r.engine.committer.durable_id == durable and p.bytes_copied == copied
        # FUA always takes the work path (it must flush)
        work = r.sio.route_write(10 * ES, memoryview(b"f" * 512), True)
        assert work is not None
        work.close()
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.FRACTURED
        want = bytearray(clone_img)
        want[10 * ES:11 * ES] = pattern(0x10, ES)
        want[10 * ES + 512:10 * ES + 1024] = b"d" * 512
        want[12 * ES:12 * ES + 1024] = b"e" * 1024
        want[12 * ES + 1] = ord("e")            # the direct write came after the 1-byte one
        assert bytes(r.src.current) == bytes(want)
        assert p.maps.delta.set_in(0, 32) == [10, 12]      # only the host-written extents
        await eng.close()
    run(go())


def test_mirroring_and_unmarked_writes_need_work():
    async def go():
        r = Rig(16)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 16 * ES))
        await eng.restore(p.id, protected=False, paused=True)
        await r.sio.write(2 * ES, pattern(2, ES))             # restored (filled) and region-logged
        assert not r.sio.try_write(2 * ES, [b"m" * 512])      # both legs to write: work
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.SYNCHRONIZED
        await eng.close()
    run(go())


@pytest.mark.parametrize("protected", [True, False])
def test_reads_of_unrestored_extents_are_served_from_the_clone_without_a_copy(protected):
    async def go():
        r = Rig(16)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 16 * ES))          # every extent differs from the clone
        want = bytearray(r.cln.current)                   # what the source must end up holding
        await eng.restore(p.id, protected=protected, paused=True)
        copied = p.bytes_copied
        await r.sio.write(4 * ES, pattern(9, ES))          # fills extent 4: restored, no copy
        want[4 * ES:5 * ES] = pattern(9, ES)
        lo, hi = 3 * ES - 100, 6 * ES + 100               # extents 2..6: clone, own store, clone
        a, b = bytearray(1000), bytearray(hi - lo - 1000)   # scattered buffers, split mid-extent
        assert r.sio.try_readinto(lo, [memoryview(a), memoryview(b)])
        assert bytes(a + b) == want[lo:hi]
        assert bytes(await r.sio.read(lo, hi - lo)) == want[lo:hi]
        assert p.bytes_copied == copied                    # the reads copied nothing
        # a read issued after a write's acknowledgement sees it, on either path
        await r.sio.write(5 * ES + 10, b"w" * 10)          # partial: copies extent 5 first
        want[5 * ES + 10:5 * ES + 20] = b"w" * 10
        buf = bytearray(ES)
        assert r.sio.try_readinto(5 * ES, [memoryview(buf)]) and buf == want[5 * ES:6 * ES]
        assert bytes(await r.sio.read(lo, hi - lo)) == want[lo:hi]
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert bytes(r.src.current) == bytes(want)
        await eng.close()
    run(go())


@pytest.mark.parametrize("protected", [True, False])
def test_reads_after_acknowledged_writes_see_them_while_copies_run(protected):
    """One writer (each write followed by reads of its range, issued after
    its acknowledgement) and a reader of never-written extents, both during
    a running restore with the copier's copies interleaved: every read
    returns the acknowledged write's data or the clone's."""
    async def go():
        r = Rig(64, seed=3)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 64 * ES))
        want = bytearray(r.cln.current)
        written: set[int] = set()
        during = {"writes": 0, "reads": 0}            # done while the restore ran
        # one extent per copy: on RAM stores even the copier's minimum
        # progress rate under host load (10% of a RAM copy's rate) restores
        # these 64 extents in a few batches, too few for the race below
        await eng.set_throttle(p.id, batch_extents=1)
        await eng.restore(p.id, protected=protected)
        rnd = random.Random(5)

        async def writer():
            for i in range(60):
                e = rnd.randrange(0, 32)                   # writes in the first half only
                off = e * ES + rnd.choice([0, 0, 100, 3000])
                n = rnd.choice([ES, 512, 10]) if off % ES == 0 else 100
                data = bytes([i + 2]) * n
                await r.sio.write(off, data)
                want[off:off + n] = data
                written.add(e)
                during["writes"] += p.state is PairState.RESTORING
                buf = bytearray(2 * ES)
                if not r.sio.try_readinto(e * ES, [memoryview(buf)]):
                    buf[:] = await r.sio.read(e * ES, 2 * ES)
                assert bytes(buf) == want[e * ES:e * ES + 2 * ES]
                assert bytes(await r.sio.read(off, n)) == data
                await asyncio.sleep(0)

        async def reader():
            while p.state is PairState.RESTORING:
                e = rnd.randrange(32, 64)                  # never written
                assert bytes(await r.sio.read(e * ES, ES)) == want[e * ES:(e + 1) * ES]
                during["reads"] += 1
                await asyncio.sleep(0)

        await asyncio.gather(writer(), reader())
        assert during["writes"] >= 5 and during["reads"] >= 5     # it did race the copier
        await eng.wait_job(p.id, 10)
        assert bytes(r.src.current) == bytes(want)
        await eng.close()
    run(go())


def test_reads_during_a_restore_from_an_offline_clone_are_not_ready():
    """The clone holds the only good copy of the unrestored extents: with it
    offline, neither path may serve the source's stale bytes."""
    async def go():
        r = Rig(16)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 16 * ES))
        await eng.restore(p.id, paused=True)
        # served from the clone at once: the source's routing is decided
        # (and kept) before the clone goes offline, a change on another
        # volume that must reach it (RoutingEpoch)
        assert r.sio.try_readinto(3 * ES, [memoryview(bytearray(512))])
        assert r.sio.access_state().access is Access.READ_WRITE
        eng.set_offline(r.cln.name, "image gone")
        assert r.sio.access_state().access is Access.NOT_READY
        assert not r.sio.try_readinto(3 * ES, [memoryview(bytearray(512))])
        with pytest.raises(NotReadyError, match="offline"):
            await r.sio.read(3 * ES, 512)
        await eng.close()
    run(go())


def test_each_state_change_reroutes_the_next_command_at_once():
    """The LUs' access and route are decided once per state change, not per
    command (RoutingEpoch): a decision made and kept before a change must
    not outlive it, on the source (reads from the clone while restoring)
    nor on the clone (NOT READY to hosts while it feeds a protected
    restore)."""
    async def go():
        r = Rig(16)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 16 * ES))
        cio = r.cios[0]
        buf = bytearray(ES)

        def source_reads() -> bytes:
            assert r.sio.try_readinto(2 * ES, [memoryview(buf)])
            return bytes(buf)

        assert source_reads() == pattern(1, ES)
        assert cio.access_state().access is Access.READ_WRITE
        await eng.restore(p.id, paused=True)
        assert source_reads() == bytes(r.cln.current[2 * ES:3 * ES])    # from the clone
        assert cio.access_state().access is Access.NOT_READY
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.FRACTURED
        await r.src.write(2 * ES, pattern(7, ES))        # behind the engine: the source's own
        assert source_reads() == pattern(7, ES)
        assert cio.access_state().access is Access.READ_WRITE
        await eng.close()
    run(go())


def test_every_change_routing_depends_on_is_counted():
    """What a LU's cached decision depends on cannot change uncounted: the
    engine's own state changes happen to count other changes too (a hold
    refreshed), which would hide a setter that forgot to."""
    from restore_core.blockstore import MemoryBlockStore
    from restore_core.pair import Job, JobKind, Pair, RoutingEpoch, VolumeRuntime

    vol = VolumeRuntime("v", MemoryBlockStore(16 * ES))
    pair = Pair("p", "v", "c", 16 * ES, ES, PairState.FRACTURED)
    changes = [
        lambda: setattr(pair, "state", PairState.RESTORING),
        lambda: setattr(pair, "job", Job(JobKind.RESTORE)),
        lambda: setattr(vol, "held", "held"),
        lambda: setattr(vol, "offline", "gone"),
        lambda: setattr(vol, "undo_of", "p"),
        lambda: setattr(vol, "as_source", (pair,)),
        lambda: setattr(vol, "as_clone", pair),
    ]
    for change in changes:
        n = RoutingEpoch.n
        change()
        assert RoutingEpoch.n > n


def test_a_direct_lease_is_told_of_every_change_that_can_end_it():
    """A direct lease's holder (the native TCMU ring) polls rarely: the LunIO
    tells it when the volume's gate starts closing (a state change waits at
    the gate for the holder to leave) and when routing changes without it
    (a volume going offline), and tells a released lease nothing."""
    async def go():
        r = Rig(16, clones=2)
        eng = await r.boot()
        lease = r.sio.direct_lease()
        assert lease is not None and lease.valid()
        told: list[bool] = []
        lease.on_change = lambda: told.append(lease.valid())
        pairing = asyncio.ensure_future(eng.create_pair("src", "cln0", extent_size=ES))
        for _ in range(100):
            if False in told:
                break
            await asyncio.sleep(0.01)
        assert False in told, "the gate closed and the holder was not told"
        assert not pairing.done()              # waits at the gate for the holder
        lease.release()
        p = await asyncio.wait_for(pairing, 10)
        await eng.wait_job(p.id, 30)
        n = len(told)
        eng.set_offline("cln1", "image gone")  # released: not told any more
        assert len(told) == n

        spare = Rig(4)
        eng2 = await spare.boot()
        lease2 = spare.sio.direct_lease()
        seen: list[bool] = []
        lease2.on_change = lambda: seen.append(lease2.valid())
        eng2.set_offline("src", "image gone")  # no gate closes: a routing change
        assert seen == [False]
        lease2.release()
        await eng2.close()
        await eng.close()
    run(go())
