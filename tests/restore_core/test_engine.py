import asyncio

import pytest

from restore_core.blockstore import BlockStoreError
from restore_core.engine import EngineError
from restore_core.lunio import MediumError, NotReadyError, WriteProtectedError
from restore_core.pair import PairState

from .util import ES, Rig, pattern


def run(coro):
    return asyncio.run(coro)


def test_full_sync_then_fracture_tracks_writes_on_both_sides():
    async def go():
        r = Rig(32)
        eng = await r.boot()
        p = await r.fractured_pair()
        assert r.cln.current == r.src.current
        assert p.maps.delta.count() == 0
        await r.sio.write(3 * ES + 10, b"a" * 20)
        await r.cios[0].write(7 * ES, b"b" * ES)
        assert p.maps.delta.set_in(0, 32) == [3, 7]
        assert r.engine.committer.durable_id >= 1
        # the bits were durable before the writes returned
        snap = r.meta.load()
        assert snap.maps[f"{p.id}/delta"]
        await eng.close()
    run(go())


def test_incremental_sync_copies_only_delta():
    async def go():
        r = Rig(64)
        eng = await r.boot()
        p = await r.fractured_pair()
        for e in (1, 10, 40):
            await r.sio.write(e * ES, pattern(e, ES))
        before = r.cln.bytes_written
        await eng.sync(p.id)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.SYNCHRONIZED
        assert r.cln.bytes_written - before == 3 * ES
        assert r.cln.current == r.src.current
        await eng.close()
    run(go())


def test_protected_restore_reads_clone_data_and_keeps_host_writes():
    async def go():
        r = Rig(32)
        eng = await r.boot()
        p = await r.fractured_pair()
        clone_img = bytes(r.cln.current)
        for e in range(0, 32, 2):
            await r.sio.write(e * ES, pattern(0xEE, ES))
        await eng.restore(p.id, paused=True)   # copy-on-demand only until resume
        # the synchronous direct path declines what needs a copy or a map bit
        buf = memoryview(bytearray(512))
        assert not r.sio.try_write(6 * ES, [b"f" * 512])      # not restored yet
        assert not r.cios[0].try_readinto(0, [buf])             # the clone is not ready
        assert not r.cios[0].try_write(0, [b"f" * 512])
        # reads of unrestored extents are served from the clone at once,
        # without copying them (they stay to restore)
        copied = p.bytes_copied
        assert r.sio.try_readinto(4 * ES, [buf]) and bytes(buf) == clone_img[4 * ES:4 * ES + 512]
        assert bytes(await r.sio.read(4 * ES, 3 * ES)) == clone_img[4 * ES:7 * ES]
        assert p.bytes_copied == copied
        # the clone is not available to hosts during a protected restore
        with pytest.raises(NotReadyError):
            await r.cios[0].read(0, 512)
        # partial write into an unrestored extent: copy-on-demand, then write
        await r.sio.write(8 * ES + 100, b"w" * 10)
        # whole-extent write skips the copy
        copied = p.bytes_copied
        await r.sio.write(10 * ES, pattern(0x77, ES))
        assert p.bytes_copied == copied
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.FRACTURED
        assert bytes(r.cln.current) == clone_img
        want = bytearray(clone_img)
        want[8 * ES + 100:8 * ES + 110] = b"w" * 10
        want[10 * ES:11 * ES] = pattern(0x77, ES)
        assert bytes(r.src.current) == bytes(want)
        assert p.maps.delta.set_in(0, 32) == [8, 10]
        await eng.close()
    run(go())


def test_unprotected_restore_mirrors_and_ends_synchronized():
    async def go():
        r = Rig(16)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 8 * ES))
        await eng.restore(p.id, protected=False)
        with pytest.raises(WriteProtectedError):
            await r.cios[0].write(0, b"x")
        await r.sio.write(2 * ES + 5, b"m" * 100)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.SYNCHRONIZED
        assert r.src.current == r.cln.current
        await eng.close()
    run(go())


def test_restore_dirties_sibling_clones():
    async def go():
        r = Rig(16, clones=2)
        eng = await r.boot()
        a = await r.fractured_pair(0)
        b = await r.fractured_pair(1)
        await r.sio.write(3 * ES, pattern(9, ES))
        assert a.maps.delta.set_in(0, 16) == [3] and b.maps.delta.set_in(0, 16) == [3]
        await eng.restore(a.id)
        await eng.wait_job(a.id, 10)
        await r.sio.write(5 * ES, pattern(8, 10))
        # b's clone differs from the source wherever a's restore copied or
        # the host wrote: its delta must say so.
        assert b.maps.delta.set_in(0, 16) == [3, 5]
        await eng.close()
    run(go())


def test_lifecycle_refusals_have_clear_messages():
    async def go():
        r = Rig(8, clones=2)
        eng = await r.boot()
        with pytest.raises(EngineError, match="no volume"):
            await eng.create_pair("src", "nope")
        with pytest.raises(EngineError, match="its own clone"):
            await eng.create_pair("src", "src")
        p = await r.fractured_pair(0)
        with pytest.raises(EngineError, match="already the clone"):
            await eng.create_pair("src", r.clones[0].name)
        await eng.restore(p.id)
        with pytest.raises(EngineError, match="only a fractured pair"):
            await eng.restore(p.id)
        with pytest.raises(EngineError, match="cannot be split"):
            await eng.fracture(p.id)
        with pytest.raises(EngineError, match="being restored"):
            await eng.create_pair("src", r.clones[1].name)
        with pytest.raises(EngineError, match="extent size"):
            await eng.create_pair("cln0", "cln1", extent_size=1000)
        await eng.wait_job(p.id, 10)
        with pytest.raises(EngineError, match="in pair"):
            eng.remove_volume("src")
        await eng.close()
    run(go())


def test_restore_resumes_after_restart_and_progress_reports():
    async def go():
        r = Rig(64)
        eng = await r.boot()
        p = await r.fractured_pair()
        clone_img = bytes(r.cln.current)
        await r.sio.write(0, pattern(5, 64 * ES))
        await eng.set_throttle(p.id, batch_extents=1, depth=1)
        await eng.restore(p.id)
        pr = eng.progress(p.id)
        assert pr.job == "restore" and pr.extents_total == 64
        await asyncio.sleep(0)
        await eng.close()                    # stops mid-way; progress is durable
        eng2 = await r.boot()
        p2 = eng2.pair(p.id)
        assert p2.state is PairState.RESTORING
        await eng2.wait_job(p.id, 10)
        assert bytes(r.src.current) == clone_img
        assert eng2.progress(p.id).state == "fractured"
        await eng2.close()
    run(go())


def test_copy_error_pauses_job_with_message_and_host_gets_medium_error():
    async def go():
        r = Rig(8)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 8 * ES))
        r.cln.fail_at = {5 * ES + 7}
        await eng.restore(p.id)
        await eng.wait_job(p.id, 10)
        assert p.job is not None and p.job.error and "medium error" in p.job.error
        with pytest.raises(MediumError):
            await r.sio.read(5 * ES, 512)
        r.cln.fail_at = set()
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert p.state is PairState.FRACTURED
        await eng.close()
    run(go())


def test_metadata_failure_fails_writes_not_silently():
    async def go():
        r = Rig(8)
        eng = await r.boot()
        await r.fractured_pair()
        r.meta.fail_next = 1
        with pytest.raises(MediumError, match="metadata"):
            await r.sio.write(0, b"x" * 512)
        # the data was not written: the bit never became durable
        assert r.src.current[:512] != b"x" * 512
        await eng.close()
    run(go())


def test_restart_loads_write_intent_regions_at_their_own_size():
    # The intent map has one bit per region, not per extent: a restart after
    # host writes to a fractured pair (a region bit durable, not yet cleared)
    # must load it at its size and widen the delta by the region.
    async def go():
        r = Rig(600)                         # 3 regions of 256 extents
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(300 * ES, pattern(6, ES))
        assert any(k.endswith("/intent") for k in r.meta.load().maps)
        eng2 = await r.boot()                # a crash: the first engine never closed
        p2 = eng2.pair(p.id)
        assert p2.maps.intent.nbits == 3 and p2.maps.delta.test(300)
        await eng2.close()
    run(go())


def test_a_network_store_gets_the_copy_depth_it_needs():
    """A store whose I/Os each pay a round trip (RBD) says how many copies
    it needs in flight; the copier runs at least that many, whatever the
    pair's (local-disk) depth."""
    async def go():
        r = Rig(64)
        eng = await r.boot()
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(5, 64 * ES))
        await eng.set_throttle(p.id, batch_extents=1, depth=1)
        r.cln.copy_depth = 6
        now = peak = 0
        read = r.cln.readinto

        async def slow_read(offset, buf):
            nonlocal now, peak
            now += 1
            peak = max(peak, now)
            try:
                await asyncio.sleep(0.002)          # a round trip
                await read(offset, buf)
            finally:
                now -= 1
        r.cln.readinto = slow_read
        await eng.restore(p.id)
        await eng.wait_job(p.id, 10)
        assert bytes(r.src.current) == bytes(r.cln.current)
        assert peak == 6
        await eng.close()
    run(go())
