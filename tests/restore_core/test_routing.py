"""VolumeIO's one routing decision per host I/O (route_read/route_write):
straight to the store when nothing has to happen first -- including the
restored, durably marked extents of a protected restore -- else the work,
with nothing a host could see done by the decision."""
import asyncio
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
        assert p.delta.set_in(0, 32) == [10, 12]      # only the host-written extents
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

