"""The fracture snapshot of an RBD clone (restore_core.instants) against a
real cluster: the store's snapshot calls, fencing, and a kill -9 after host
writes whose exact delta bits never reached disk."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import rbd

from restore_core import instants
from restore_core.blockstore import BlockStoreError, StoreFencedError
from restore_core.engine import Engine
from restore_core.metadata import MemoryMetadataStore
from restore_core.pair import PairState
from restore_core.restoremaps import INTENT_EXTENTS
from restore_core.stores import open_store
from restore_core.stores.file import FileBlockStore
from restore_core.stores.rbd import DRAIN_TIMEOUT_S
from tests.ceph import instant_worker as w
from tests.ceph.conftest import COMMAND_BOUND_S
from tests.ceph.util import other_client, read_image, take_over

MiB = 1 << 20


def snapshots(spec) -> list[str]:
    with other_client(spec) as io, rbd.Image(io, spec.image, read_only=True) as img:
        return [s["name"] for s in img.list_snaps()]


def test_snapshot_calls_on_an_image(ceph):
    spec = ceph.spec()
    s = open_store(spec, 16 * MiB, create=True)

    async def go():
        await s.write(0, os.urandom(16 * MiB))
        tok = await s.mark_instant("liverestore.1.c")
        assert tok.startswith("liverestore.1.c@") and snapshots(spec) == ["liverestore.1.c"]
        await s.write(3 * MiB + 100, b"x" * 1000)
        await s.discard(9 * MiB, 65536)
        # exact byte ranges, only within the ranges asked about
        assert sorted(await s.changed_since(tok, [(0, 8 * MiB), (8 * MiB, 8 * MiB)])) == [
            (3 * MiB + 100, 1000), (9 * MiB, 65536)]
        assert await s.changed_since(tok, [(0, MiB)]) == []
        assert await s.instants("liverestore.") == [tok]
        await s.drop_instant(tok)
        await s.drop_instant(tok)                   # gone already: nothing to do
        assert snapshots(spec) == []
        with pytest.raises(BlockStoreError, match="is gone"):
            await s.changed_since(tok, [(0, MiB)])
        # same name again: a new id, so the old token does not name it
        tok2 = await s.mark_instant("liverestore.1.c")
        assert tok2 != tok
        with pytest.raises(BlockStoreError, match="is gone"):
            await s.changed_since(tok, [(0, MiB)])
        await s.drop_instant(tok)
        assert snapshots(spec) == ["liverestore.1.c"]      # not the old token's to remove
        await s.drop_instant(tok2)
    try:
        asyncio.run(go())
    finally:
        s.abandon()


def test_a_fenced_clone_fractures_without_a_snapshot(ceph, tmp_path, caplog):
    """Another client took the clone's image: the snapshot is refused
    (fenced), the fracture completes on the maps and the pair widens."""
    spec = ceph.spec()
    clone = open_store(spec, 16 * MiB, create=True)

    async def go():
        eng = Engine(MemoryMetadataStore())
        eng.add_volume("src", FileBlockStore(str(tmp_path / "src.img"), 16 * MiB, create=True))
        eng.add_volume("cln", clone)
        await eng.start()
        p = await eng.create_pair("src", "cln", extent_size=65536)
        await eng.wait_job(p.id, 60)
        img, close = take_over(spec)
        try:
            with caplog.at_level(logging.WARNING, "restore_core.instants"):
                await eng.fracture(p.id)
            assert p.state.value == "fractured" and p.instants == {}
            assert clone.lost() is not None and "blocklisted" in clone.lost()
            why = [m for m in caplog.messages if "no snapshot of its clone" in m]
            assert len(why) == 1 and "blocklisted" in why[0]
            assert list(img.list_snaps()) == []
            with pytest.raises(StoreFencedError):
                await clone.drop_instant("liverestore.1.cln@4")
        finally:
            close()
        await eng.close()
    try:
        asyncio.run(go())
    finally:
        clone.close()


def worker(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.ceph.instant_worker", *args],
                            stdout=subprocess.PIPE, text=True, **kw)


def test_kill9_after_clone_writes_recovers_the_exact_delta_from_the_snapshot(ceph, tmp_path):
    spec = ceph.spec()
    d = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "tests.ceph.instant_worker", "setup", d,
                          spec.location], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    instants = json.loads(out.stdout.splitlines()[-1])
    assert list(instants) == ["clone"]
    snap = instants["clone"].partition("@")[0]
    assert snapshots(spec) == [snap]
    orig = random.Random(1).randbytes(w.SIZE)        # the source, so the synced clone

    # kill -9 twice: once with writes in flight, once after all were
    # acknowledged; each start recovers what the last kill left
    for seed, upto in ((7, "HALF"), (8, "WROTE")):
        p = worker("write", d, spec.location, str(seed))
        try:
            while (line := p.stdout.readline().strip()) != upto:
                assert line, "the worker ended before it wrote"
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
    log = [line.split() for line in open(os.path.join(d, "writes.log"))]

    def extents(kind: str) -> set[int]:
        return {e for k, off, n in log if k == kind
                for e in range(int(off) // w.ES, (int(off) + int(n) - 1) // w.ES + 1)}
    acked, issued = extents("A"), extents("I")
    assert sum(k == "A" for k, *_ in log) >= w.WRITES + w.WRITES // 2

    out = subprocess.run([sys.executable, "-m", "tests.ceph.instant_worker", "recover", d,
                          spec.location], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    delta = set(got["delta"])
    # the clone as an independent client reads it: every extent that differs
    # from its fracture-time image is in the delta (never a miss, writes in
    # flight at the kill included) ...
    now = read_image(spec, 0, w.SIZE)
    differ = {e for e in range(w.SIZE // w.ES)
              if now[e * w.ES:(e + 1) * w.ES] != orig[e * w.ES:(e + 1) * w.ES]}
    assert acked <= differ <= delta
    # ... and the delta is exactly the written extents, not whole regions
    assert acked <= delta <= issued
    regions = {e // INTENT_EXTENTS for e in issued}
    assert len(delta) < len(regions) * INTENT_EXTENTS
    assert got["instants"] == instants                # kept for the next crash
    assert snapshots(spec) == [snap]


def test_show_lists_the_snapshot_and_delete_leaves_the_image_without_it(ceph, daemon):
    spec = ceph.spec()
    d = daemon
    d.cli("volume", "create", "src", "--size", "8M")
    d.cli("volume", "create", "cln", "--rbd", spec.image_name, "--ceph-conf", ceph.conf,
          "--size", "8M")
    d.cli("pair", "create", "src", "cln", "--wait")
    d.cli("pair", "fracture", "cln")
    [snap] = snapshots(spec)
    pair = json.loads(d.cli("pair", "show", "cln", "--json").stdout)
    assert pair["snapshots"]["clone"].partition("@")[0] == snap
    vol = json.loads(d.cli("volume", "show", "cln", "--json").stdout)
    assert [s.partition("@")[0] for s in vol["snapshots"]] == [snap]
    assert json.loads(d.cli("volume", "show", "src", "--json").stdout)["snapshots"] == []
    text = d.cli("volume", "show", "cln").stdout
    assert snap in text and "holding space" in text
    # kill -9, and a snapshot of ours no record names appears (as a crash
    # between a snapshot and its commit leaves one): the restart removes it
    # and keeps the recorded one and one of a name not ours
    d.stop(signal.SIGKILL)
    img, close = take_over(spec)
    try:
        img.create_snap("liverestore.5.cln")
        img.create_snap("liverestore-by-hand")
    finally:
        close()
    d.init = False
    d.start()
    assert sorted(snapshots(spec)) == sorted([snap, "liverestore-by-hand"])
    d.cli("pair", "delete", "cln")
    assert snapshots(spec) == ["liverestore-by-hand"]
    d.cli("volume", "delete", "cln")
    assert snapshots(spec) == ["liverestore-by-hand"]


def test_a_dead_osd_bounds_the_fracture_and_the_close_waits_for_the_snapshot_call(
        ceph_bluestore, tmp_path, monkeypatch):
    """With the OSD dead the snapshot cannot be made: the fracture goes on
    after MARK_TIMEOUT_S (the file source serving again at once), and a
    close meanwhile waits for librbd's snapshot call instead of closing the
    image under it; what the call made once the OSD is back is swept."""
    cl = ceph_bluestore
    spec = cl.spec()
    monkeypatch.setattr(instants, "MARK_TIMEOUT_S", 0.5)
    clone = open_store(spec, 16 * MiB, create=True)

    async def go():
        eng = Engine(MemoryMetadataStore())
        sio = eng.add_volume("src", FileBlockStore(str(tmp_path / "s.img"), 16 * MiB,
                                                   create=True))
        eng.add_volume("cln", clone)
        await eng.start()
        p = await eng.create_pair("src", "cln", extent_size=65536)
        await eng.wait_job(p.id, 60)
        cmd = await asyncio.to_thread(cl.kill, "osd")
        try:
            fracture = asyncio.create_task(eng.fracture(p.id))
            await asyncio.sleep(1.5)            # past the snapshot's 0.5 s
            assert p.state is PairState.FRACTURED and p.instants == {}
            t0 = time.monotonic()
            await sio.write(0, b"s" * 4096)     # hosts are not held by the sick cluster
            assert time.monotonic() - t0 < 1
            # (the command itself returns once its clean-up met the op timeouts)
            await asyncio.wait_for(fracture, 4 * COMMAND_BOUND_S)
            t0 = time.monotonic()
            await asyncio.to_thread(clone.close)
            assert time.monotonic() - t0 < DRAIN_TIMEOUT_S + 2 * COMMAND_BOUND_S
        finally:
            await asyncio.to_thread(cl.restart, "osd", cmd)
        await eng.close()
        for _ in range(60):                     # the OSD comes back within seconds
            try:
                again = open_store(spec, 16 * MiB)
                break
            except BlockStoreError:
                await asyncio.sleep(1)
        try:
            await instants.sweep(again, set())
            assert snapshots(spec) == []
        finally:
            again.close()
    asyncio.run(go())


def test_source_and_clone_on_rbd_both_sides_exact_after_a_crash(ceph):
    """Both images keep a snapshot of the fracture: a crash's delta is exact
    on both sides (the engine's maps, then stores closed with no engine
    close, as a kill would leave them, then a new engine on new clients)."""
    specs = {"src": ceph.spec(), "cln": ceph.spec()}
    meta = MemoryMetadataStore()

    async def boot(create: bool = False) -> Engine:
        eng = Engine(meta)
        for name, spec in specs.items():
            eng.add_volume(name, open_store(spec, 16 * MiB, create=create))
        await eng.start()
        return eng

    async def go():
        eng = await boot(create=True)
        await eng.volume_io("src").write(0, os.urandom(16 * MiB))
        p = await eng.create_pair("src", "cln", extent_size=65536)
        await eng.wait_job(p.id, 60)
        await eng.fracture(p.id)
        assert sorted(p.instants) == ["clone", "source"]
        assert [len(snapshots(s)) for s in specs.values()] == [1, 1]
        await eng.volume_io("src").write(5 * 65536 + 100, b"s" * 100)   # commits its region
        await eng.volume_io("cln").write(9 * 65536, b"c" * 65536)       # ... and the clone's
        await eng.volume_io("src").write(70 * 65536, b"s" * 4096)       # lazy bits only
        await eng.volume_io("cln").write(200 * 65536 - 512, b"c" * 1024)
        eng._lazy.cancel()
        eng._watch.cancel()
        for vol in eng.volumes.values():
            vol.store.close()
        eng2 = await boot()
        p2 = eng2.pair(p.id)
        assert p2.maps.delta.set_in(0, p2.nextents) == [5, 9, 70, 199, 200]
        await eng2.close()
        for vol in eng2.volumes.values():
            vol.store.close()
    asyncio.run(go())
