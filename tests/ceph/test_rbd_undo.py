"""Keep-undo restores of an RBD source on a real cluster: the undo image is
an RBD image ``<image>.undo`` beside the source; an abort puts the
pre-restore data back as another client of the cluster reads it, a commit
removes the image, and one a crash left behind is removed at the next start
-- never an image this daemon did not make."""
from __future__ import annotations

import asyncio
import random

import pytest
import rbd

from restore_core.blockstore import BlockStoreError
from restore_core.stores.rbd import RbdStore
from restore_core.stores.spec import RbdSpec, spec_of_record
from restore_core.stores.undo_images import RBD_MARK_SUFFIX, StoreUndoImages
from target.service import Service
from tests.ceph.util import create_image, other_client, read_image
from tests.support import free_port

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
ES = 64 * KiB


async def started(tmp_path) -> Service:
    s = Service(str(tmp_path / "state"), init=True, portals=[("127.0.0.1", free_port())],
                backend="embedded")
    await s.start()
    return s


def pool_images(spec: RbdSpec) -> set[str]:
    with other_client(spec) as io:
        return set(rbd.RBD().list(io))


def undo_of(spec: RbdSpec) -> RbdSpec:
    return RbdSpec(spec.pool, spec.image + ".undo", spec.conf, spec.client_id)


async def restored_source(s: Service, ceph, tmp_path) -> tuple[RbdSpec, bytes, bytes]:
    """An RBD source paired with a file clone, fractured, then written all
    over: returns the source's spec, its (pre-restore) bytes and the clone's."""
    rnd = random.Random(13)
    src = await s.volume_create("src", size=SIZE, rbd=ceph.spec().image_name, ceph_conf=ceph.conf)
    await s.volume_create("cl", path=str(tmp_path / "cl.img"), size=SIZE)
    lun = s.devices["src"].lunio
    await lun.write(0, rnd.randbytes(SIZE), fua=True)
    await s.pair_create("src", "cl", extent_size="64K")
    await s.pair_wait("cl", timeout=60)
    await s.pair_fracture("cl")
    clone = bytes(await s.devices["cl"].lunio.read(0, SIZE))
    pre = rnd.randbytes(SIZE)             # every extent differs from the clone
    await lun.write(0, pre, fua=True)
    return spec_of_record("rbd", src["path"]), pre, clone


def test_keep_undo_restore_of_rbd_source_abort_and_commit(ceph, tmp_path):
    """Hosts write during a keep-undo restore, which is then aborted: the
    source, read by another client, is the pre-restore data except where
    hosts wrote. A second one, finished and committed, leaves no image."""
    async def go():
        s = await started(tmp_path)
        try:
            spec, pre, clone = await restored_source(s, ceph, tmp_path)
            await s.pair_throttle("cl", rate=2 * MiB)       # slow: hosts write mid-restore
            await s.pair_restore("cl", keep_undo=True)
            assert s.pair_show("cl")["undo_image"] == undo_of(spec).location
            lun = s.devices["src"].lunio
            expect = bytearray(pre)
            # a whole extent (no copy first), and part of one (copied on demand)
            whole, part = 40 * ES, 50 * ES + 4 * KiB
            await lun.write(whole, b"\x11" * ES, fua=True)
            await lun.write(part, b"\x22" * 8 * KiB, fua=True)
            expect[whole:whole + ES] = b"\x11" * ES
            expect[50 * ES:51 * ES] = clone[50 * ES:51 * ES]
            expect[part:part + 8 * KiB] = b"\x22" * 8 * KiB
            for _ in range(200):                             # some extents restored
                progress = s.pair_show("cl")["progress"]
                if progress["extents_done"] >= 4:
                    break
                await asyncio.sleep(0.05)
            # mid-restore (2 s at this rate): the abort has work, and not all of it
            assert s.pair_show("cl")["state"] == "restoring", progress
            assert 4 <= progress["extents_done"] < progress["extents_total"], progress
            assert undo_of(spec).image in pool_images(spec)
            await s.pair_abort("cl")
            await s.pair_throttle("cl", rate=0)
            await s.pair_wait("cl", timeout=60)
            assert s.pair_show("cl")["state"] == "fractured"
            got = read_image(spec, 0, SIZE)
            bad = [e for e in range(SIZE // ES) if got[e * ES:(e + 1) * ES] != expect[e * ES:(e + 1) * ES]]
            assert not bad, f"extents {bad} differ from pre-restore + host writes"
            assert undo_of(spec).image not in pool_images(spec)   # an abort discards it too

            await s.pair_restore("cl", keep_undo=True)       # restored, then kept
            await s.pair_wait("cl", timeout=60)
            assert read_image(spec, 0, SIZE) == clone
            assert undo_of(spec).image in pool_images(spec)
            assert read_image(undo_of(spec), 0, SIZE)[:ES] == bytes(expect[:ES])
            await s.pair_commit("cl")
            assert undo_of(spec).image not in pool_images(spec)
        finally:
            await s.stop()
    asyncio.run(go())


def test_only_rbd_undo_images_this_daemon_made_are_used_and_swept(ceph, tmp_path):
    undo_dir = tmp_path / "undo"
    made = StoreUndoImages(str(undo_dir))
    src = RbdStore(ceph.spec(), MiB, create=True)
    other = RbdStore(ceph.spec(), MiB, create=True)
    try:
        store, rec = made.create("p1", src)
        store.close()
        assert rec == {"kind": "rbd", "path": undo_of(src.spec).location}
        assert made.sweep([rec]) == [] and undo_of(src.spec).image in pool_images(src.spec)
        # a crash between forgetting the image and removing it: no record keeps it
        assert made.sweep([]) == [rec["path"]]
        assert undo_of(src.spec).image not in pool_images(src.spec)
        assert not list(undo_dir.glob("*" + RBD_MARK_SUFFIX))
        # an image of that name someone else made: never used, never removed
        create_image(undo_of(other.spec), MiB)
        with pytest.raises(BlockStoreError, match="no undo image this daemon made"):
            made.create("p2", other)
        assert made.sweep([]) == [] and undo_of(other.spec).image in pool_images(other.spec)
        # removed, but a crash kept its mark: the mark goes quietly
        store, rec = made.create("p3", src)
        store.close()
        with other_client(src.spec) as io:
            rbd.RBD().remove(io, undo_of(src.spec).image)
        assert made.sweep([]) == [rec["path"]] and not list(undo_dir.glob("*"))
    finally:
        src.close()
        other.close()


def test_undo_image_left_by_a_crash_is_removed_at_start(ceph, tmp_path, monkeypatch):
    """The pair forgot its undo image (commit) but the daemon died before
    removing it: the next start removes it."""
    async def go():
        s = await started(tmp_path)
        try:
            spec, pre, clone = await restored_source(s, ceph, tmp_path)
            await s.pair_restore("cl", keep_undo=True)
            await s.pair_wait("cl", timeout=60)
            with monkeypatch.context() as m:       # as if killed right after the commit
                m.setattr(StoreUndoImages, "discard", lambda self, rec, store: store.close())
                await s.pair_commit("cl")
            assert undo_of(spec).image in pool_images(spec)
        finally:
            await s.stop()
        s = await started(tmp_path)
        try:
            assert undo_of(spec).image not in pool_images(spec)
            assert s.pair_show("cl")["undo_image"] is None
        finally:
            await s.stop()
    asyncio.run(go())
