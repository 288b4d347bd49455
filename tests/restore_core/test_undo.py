"""Keep-undo restores, abort and commit (restore_core.undo) on RAM stores."""
from __future__ import annotations

import asyncio
import os

import pytest

from restore_core import undo
from restore_core.blockstore import BlockStoreError, MemoryBlockStore
from restore_core.committer import load_map
from restore_core.engine import EngineError
from restore_core.pair import PairState
from restore_core.stores.file import FileBlockStore
from restore_core.stores.undo_images import StoreUndoImages

from .util import ES, Rig, pattern

N = 16


async def restored_with_undo(rig: Rig, *, paused: bool = False, finished: bool = False):
    """A pair whose source differs from its clone everywhere, restoring
    with keep-undo (``finished``: restored, the undo image kept); returns
    (engine, pair, pre-restore source bytes)."""
    eng = await rig.boot()
    pair = await rig.fractured_pair()
    await rig.cios[0].write(0, pattern(0xC1, rig.size))
    await rig.sio.write(0, pattern(0x5A, rig.size))
    pre = bytes(rig.src.current)
    await eng.restore(pair.id, keep_undo=True, paused=paused)
    if finished:
        await eng.wait_job(pair.id, 30)
    return eng, pair, pre


def save_in_batches(monkeypatch, batch: int, ahead: int) -> None:
    """Save batches small enough for a small LU to have several."""
    monkeypatch.setattr(undo, "SAVE_BATCH", batch)
    monkeypatch.setattr(undo, "SAVE_AHEAD", ahead)


async def paused_one_by_one(rig: Rig):
    """restored_with_undo, paused, copying one extent at a time; returns
    (engine, pair, pre-restore source bytes, undo image)."""
    eng, pair, pre = await restored_with_undo(rig, paused=True)
    pair.throttle.batch_extents = 1
    return eng, pair, pre, rig.undo_images.images[f"undo-{pair.id}"]


def test_abort_during_restore_keeps_host_writes():
    async def main():
        rig = Rig(N)
        eng, pair, pre = await restored_with_undo(rig, paused=True)
        # hosts write during the restore: one whole extent, one part of one
        await rig.sio.write(3 * ES, pattern(0x77, ES))
        await rig.sio.write(7 * ES + 100, pattern(0x88, 50))
        await eng.resume(pair.id)
        await asyncio.sleep(0)
        await eng.abort(pair.id)
        assert pair.state is PairState.ABORTING
        await eng.wait_job(pair.id, 30)
        src = bytes(rig.src.current)
        assert pair.state is PairState.FRACTURED and pair.undo is None
        for e in range(N):
            got = src[e * ES:(e + 1) * ES]
            if e == 3:
                assert got == pattern(0x77, ES)
            elif e == 7:      # copied on demand, then written: the host's extent
                assert got[100:150] == pattern(0x88, 50)
                assert got[:100] == pattern(0xC1, 100)
            else:
                assert got == pre[e * ES:(e + 1) * ES], f"extent {e} not put back"
            assert pair.maps.delta.test(e)
        assert not rig.undo_images.images, "the undo image outlived the abort"
        await eng.close()
    asyncio.run(main())


def test_abort_after_restore_and_commit():
    async def main():
        rig = Rig(N)
        eng, pair, pre = await restored_with_undo(rig, finished=True)
        assert pair.state is PairState.FRACTURED and pair.undo is not None
        assert bytes(rig.src.current) == pattern(0xC1, rig.size)
        await rig.sio.write(5 * ES, pattern(0x33, ES))        # after the restore
        with pytest.raises(EngineError, match="keeps the undo image"):
            await eng.sync(pair.id)
        await eng.abort(pair.id)
        await eng.wait_job(pair.id, 30)
        src = bytes(rig.src.current)
        assert src[5 * ES:6 * ES] == pattern(0x33, ES)
        assert src[:5 * ES] == pre[:5 * ES] and src[6 * ES:] == pre[6 * ES:]
        with pytest.raises(EngineError, match="keeps no undo image"):
            await eng.commit_undo(pair.id)
        # a second keep-undo restore, committed this time
        await eng.restore(pair.id, keep_undo=True)
        await eng.wait_job(pair.id, 30)
        await eng.commit_undo(pair.id)
        assert pair.undo is None and not rig.undo_images.images
        assert not pair.maps.saved.any(0, N)
        with pytest.raises(EngineError, match="keeps no undo image"):
            await eng.abort(pair.id)
        await eng.close()
    asyncio.run(main())


@pytest.mark.parametrize("batch", [None, 3], ids=["default", "small-batches"])
def test_undo_ordering_saved_before_overwrite(batch, monkeypatch):
    """At every store write of the source during a keep-undo restore, every
    extent it overwrites has its old data durable in the undo image and its
    saved bit durable in the metadata store (small batches: the copier
    meets batches still being saved or committed)."""
    n = N
    if batch is not None:
        n = 64
        save_in_batches(monkeypatch, batch, 2 * batch)
        monkeypatch.setattr(undo, "SAVE_IO_EXTENTS", 2)

    async def main():
        rig = Rig(n)
        eng, pair, pre = await restored_with_undo(rig, paused=True)
        undo = rig.undo_images.images[f"undo-{pair.id}"]
        src_write = rig.src.write
        checked = []

        async def checked_write(off, data):
            for e in range(off // ES, (off + len(data) - 1) // ES + 1):
                chunks = rig.meta.load().maps.get(f"{pair.id}/saved", {})
                saved = load_map(n, chunks)
                assert saved.test(e), f"extent {e} overwritten before its saved bit is durable"
                assert undo.durable[e * ES:(e + 1) * ES] == pre[e * ES:(e + 1) * ES], \
                    f"extent {e} overwritten before its undo data is durable"
                checked.append(e)
            await src_write(off, data)
        rig.src.write = checked_write
        if batch is not None:
            # a wide window between a saved bit set and durable
            wait_durable = eng.committer.wait_durable

            async def slow_wait_durable(batch_id: int) -> None:
                await asyncio.sleep(0.005)
                await wait_durable(batch_id)
            eng.committer.wait_durable = slow_wait_durable
            # and a copier that comes to saved extents while they settle
            clone_readinto = rig.cln.readinto

            async def slow_readinto(off, buf):
                await asyncio.sleep(0.002)
                await clone_readinto(off, buf)
            rig.cln.readinto = slow_readinto
            pair.throttle.batch_extents = 1
        await eng.resume(pair.id)
        await eng.wait_job(pair.id, 30)
        assert sorted(set(checked)) == list(range(n))
        await eng.close()
    asyncio.run(main())


def test_failed_save_ahead_is_saved_again_by_the_copy(monkeypatch):
    """A batch saved ahead whose undo flush fails leaves its extents unsaved
    and released (not waited for forever): the copies save them again."""
    save_in_batches(monkeypatch, 2, 8)

    async def main():
        rig = Rig(32)
        eng, pair, pre, image = await paused_one_by_one(rig)
        flush = image.flush
        fails = [3]         # the third flush: a batch saved ahead, with the next one copied

        async def failing_flush() -> None:
            fails[0] -= 1
            if fails[0] == 0:
                raise BlockStoreError("injected undo flush failure")
            await flush()
        image.flush = failing_flush
        await eng.resume(pair.id)
        await eng.wait_job(pair.id, 10)
        assert fails[0] < 0 and pair.state is PairState.FRACTURED and pair.maps.saved.all(0, 32)
        assert bytes(image.durable) == pre
        await eng.close()
    asyncio.run(main())


def test_saver_stays_ahead_of_the_walk_after_a_host_write_far_ahead(monkeypatch):
    """A host write copied on demand near the end of the LU does not carry
    the save-ahead away from the background walk: the walk's copies still
    find their extents saved in batches (one undo flush per batch, not one
    per copy)."""
    save_in_batches(monkeypatch, 16, 32)

    async def main():
        rig = Rig(256)
        eng, pair, pre, image = await paused_one_by_one(rig)
        await rig.sio.write(255 * ES, b"h" * 512)   # copied on demand: saved first
        await eng.resume(pair.id)
        await eng.wait_job(pair.id, 30)
        assert bytes(image.durable) == pre
        assert image.flushes <= 256 // 16 + 8, f"{image.flushes} undo flushes for 16 batches"
        await eng.close()
    asyncio.run(main())


def test_undo_volume_named_by_admin_and_refusals():
    async def main():
        rig = Rig(N)
        eng = await rig.boot()
        uio = eng.add_volume("u1", MemoryBlockStore(rig.size, "u1"))
        eng.add_volume("small", MemoryBlockStore(ES, "small"))
        pair = await rig.fractured_pair()
        with pytest.raises(EngineError, match="needs a protected restore"):
            await eng.restore(pair.id, protected=False, keep_undo=True)
        with pytest.raises(EngineError, match="needs"):
            await eng.restore(pair.id, keep_undo=True, undo_volume="small")
        with pytest.raises(EngineError, match="in a pair"):
            await eng.restore(pair.id, keep_undo=True, undo_volume="src")
        await rig.sio.write(0, pattern(0x11, ES))
        await eng.restore(pair.id, keep_undo=True, undo_volume="u1")
        assert uio.access_state().reason.endswith(f"undo image of pair {pair.id}")
        with pytest.raises(EngineError, match="holds the undo image"):
            eng.remove_volume("u1")
        await eng.wait_job(pair.id, 30)
        await eng.commit_undo(pair.id)
        assert uio.access_state().reason == ""
        await eng.close()
    asyncio.run(main())


def test_restart_resumes_abort_from_persisted_undo():
    async def main():
        rig = Rig(N)
        eng, pair, pre = await restored_with_undo(rig, finished=True)
        await eng.abort(pair.id)
        await eng.pause(pair.id)
        await eng.close()
        eng = await rig.boot()
        pair = eng.pair(pair.id)
        assert pair.state is PairState.ABORTING and pair.undo_store is not None
        await eng.resume(pair.id)
        await eng.wait_job(pair.id, 30)
        assert bytes(rig.src.current) == pre
        await eng.close()
    asyncio.run(main())


def test_delete_needs_force_while_undo_kept_and_removes_the_image():
    async def main():
        rig = Rig(N)
        eng, pair, pre = await restored_with_undo(rig, finished=True)
        with pytest.raises(EngineError, match="keeps the undo image"):
            await eng.delete_pair(pair.id)
        await eng.delete_pair(pair.id, force=True)
        assert not rig.undo_images.images
        await eng.close()
        eng = await rig.boot()               # nothing left that refers to it
        assert not eng.pairs and not rig.undo_images.images
        await eng.close()
    asyncio.run(main())


def test_orphaned_undo_image_is_removed_at_start():
    """A crash between forgetting an undo image and removing it leaves it
    behind: the next start removes it."""
    async def main():
        rig = Rig(N)
        eng, pair, pre = await restored_with_undo(rig, finished=True)
        image = rig.undo_images.images[f"undo-{pair.id}"]
        await eng.commit_undo(pair.id)
        await eng.close()
        rig.undo_images.images["undo-stale"] = image     # as if its removal never ran
        eng = await rig.boot()
        assert not rig.undo_images.images
        await eng.close()
    asyncio.run(main())


def test_file_undo_images_sparse_in_their_directory(tmp_path):
    src = FileBlockStore(str(tmp_path / "src.img"), 8 * ES, create=True)
    images = StoreUndoImages(str(tmp_path / "undo"))
    store, rec = images.create("db-clone", src)
    assert rec == {"kind": "file", "path": str(tmp_path / "undo" / "db-clone.undo.img")}
    assert store.size == src.size and os.stat(rec["path"]).st_blocks == 0     # sparse
    store.close()
    images.open(rec, src.size).close()
    (tmp_path / "undo" / "old.undo.img").write_bytes(b"")
    assert images.sweep([rec]) == [str(tmp_path / "undo" / "old.undo.img")]
    images.discard(rec, None)
    assert os.listdir(tmp_path / "undo") == []
    src.close()


def test_unusable_undo_image_holds_the_pair_until_acknowledged():
    async def main():
        rig = Rig(N)
        eng, pair, pre = await restored_with_undo(rig, finished=True)
        await eng.close()
        rig.undo_images.images.clear()       # the image is gone
        rig.undo_images.open = lambda rec, size: (_ for _ in ()).throw(OSError("no such image"))
        eng = await rig.boot()
        pair = eng.pair(pair.id)
        assert pair.hold is not None and "undo image" in pair.hold
        await eng.acknowledge(pair.id)
        assert pair.undo is None and pair.hold is None
        with pytest.raises(EngineError, match="keeps no undo image"):
            await eng.abort(pair.id)
        await eng.close()
    asyncio.run(main())
