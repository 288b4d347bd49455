"""RBD volumes through the service: create/adopt/list, pairs across stores
(the clone on Ceph is the main case), fencing taking a volume offline, and
saveconfig/restoreconfig."""
from __future__ import annotations

import asyncio
import os
import random

import pytest

from restore_core.lunio import NotReadyError
from target.errors import ServiceError
from target.peer import Peer
from target.scsi import constants as c
from target.scsi.lunio_access import not_ready_sense
from target.service import Service
from tests.ceph.util import read_image, take_over
from tests.support import free_port

MiB = 1 << 20
SIZE = 8 * MiB


async def started(tmp_path, name: str = "state") -> Service:
    s = Service(str(tmp_path / name), init=True, portals=[("127.0.0.1", free_port())],
                backend="embedded")
    await s.start()
    return s


async def make(s: Service, ceph, name: str, kind: str, tmp_path) -> dict:
    if kind == "rbd":
        spec = ceph.spec()
        return await s.volume_create(name, size=SIZE, rbd=spec.image_name, ceph_conf=ceph.conf)
    return await s.volume_create(name, path=str(tmp_path / f"{name}.img"), size=SIZE)


async def scribble(s: Service, vol: str, rnd: random.Random, n: int, tag: int) -> None:
    lun = s.devices[vol].lunio
    for _ in range(n):
        off = rnd.randrange(SIZE // 4096) * 4096
        await lun.write(off, bytes([tag]) * 4096 * rnd.randint(1, 4) if off < SIZE - 16384
                        else bytes([tag]) * 4096)


async def image(s: Service, vol: str) -> bytes:
    return bytes(await s.devices[vol].lunio.read(0, SIZE))


async def wait_state(s: Service, pair: str, state: str) -> None:
    await s.pair_wait(pair, timeout=60)
    assert s.pair_show(pair)["state"] == state


def test_create_adopt_list_and_reopen_after_restart(ceph, tmp_path):
    async def go():
        s = await started(tmp_path)
        spec = ceph.spec()
        try:
            v = await s.volume_create("r", size="4M", rbd=spec.image_name, ceph_conf=ceph.conf)
            assert v["kind"] == "rbd" and v["size"] == 4 * MiB and v["access"] == "read-write"
            assert v["path"] == f"rbd:{spec.image_name}:conf={ceph.conf}:id=admin"
            await s.devices["r"].lunio.write(0, b"x" * 4096)
            await s.devices["r"].lunio.flush()
            with pytest.raises(ServiceError, match="is the image of volume r"):
                await s.volume_create("r2", rbd=spec.image_name, ceph_conf=ceph.conf)
            for bad, why in [("p", "POOL/IMAGE"), ("rbd/a:b", "bad RBD image name"),
                             ("rbd/..", "bad RBD image name"), ("rbd/.x", "bad RBD image name"), ("a/b/c", "POOL/IMAGE")]:
                with pytest.raises(ServiceError, match=why):
                    await s.volume_create("bad", rbd=bad, ceph_conf=ceph.conf)
            with pytest.raises(ServiceError, match="bad ceph.conf path"):
                await s.volume_create("bad", rbd="rbd/x", ceph_conf="/etc/ceph/x:id=evil")
            with pytest.raises(ServiceError, match="bad Ceph client id"):
                await s.volume_create("bad", rbd="rbd/x", ceph_conf=ceph.conf, ceph_id="a b")
            nobody = Peer(pid=0, uid=65534, gid=65534, groups=frozenset())
            with pytest.raises(ServiceError, match="only root may use RBD images"):
                await s.volume_create("bad", rbd=ceph.spec().image_name, ceph_conf=ceph.conf,
                                      size="4M", peer=nobody)
            with pytest.raises(ServiceError, match="not both"):
                await s.volume_create("bad", path="/tmp/x", rbd="rbd/x")
            with pytest.raises(ServiceError, match="does not exist: give a size"):
                await s.volume_create("bad", rbd=ceph.spec().image_name, ceph_conf=ceph.conf)
            assert s.cfg.volume("bad") is None
        finally:
            await s.stop()
        s = await started(tmp_path)                  # the record's kind is read back
        try:
            v = s.volume_show("r")
            assert v["kind"] == "rbd" and v["offline"] is None
            assert bytes(await s.devices["r"].lunio.read(0, 4096)) == b"x" * 4096
            v = await s.volume_resize("r", "8M")            # grows on request only
            assert v["size"] == 8 * MiB and s.devices["r"].lunio.size == 8 * MiB
            assert (tmp_path / "state" / "rbd-owners" / "r").exists()
            await s.volume_delete("r")
            assert not (tmp_path / "state" / "rbd-owners" / "r").exists()
            s2 = await started(tmp_path, "other")    # a second daemon adopts it as it is
            try:
                v = await s2.volume_create("r", rbd=spec.image_name, ceph_conf=ceph.conf)
                assert v["size"] == 8 * MiB
            finally:
                await s2.stop()
        finally:
            await s.stop()
    asyncio.run(go())


@pytest.mark.parametrize("src_kind,clone_kind", [("file", "rbd"), ("rbd", "rbd"), ("rbd", "file")])
def test_pair_across_stores(ceph, tmp_path, src_kind, clone_kind):
    """Sync, fracture, incremental sync, protected restore with host reads
    (copy-on-demand) and writes during it, then an unprotected restore."""
    rnd = random.Random(f"{src_kind}{clone_kind}")

    async def go():
        s = await started(tmp_path)
        try:
            await make(s, ceph, "src", src_kind, tmp_path)
            clone = await make(s, ceph, "cl", clone_kind, tmp_path)
            await scribble(s, "src", rnd, 200, 1)
            await s.pair_create("src", "cl", extent_size="64K")
            await scribble(s, "src", rnd, 50, 2)          # mirrored while syncing
            await wait_state(s, "cl", "synchronized")
            await s.pair_fracture("cl")
            assert await image(s, "cl") == await image(s, "src")
            await scribble(s, "src", rnd, 80, 3)
            await s.pair_sync("cl")                       # incremental
            await wait_state(s, "cl", "synchronized")
            await s.pair_fracture("cl")
            good = await image(s, "src")
            assert await image(s, "cl") == good
            if clone_kind == "rbd":                        # another client sees the same bytes
                from restore_core.stores.spec import spec_of_record
                spec = spec_of_record("rbd", clone["path"])
                assert read_image(spec, 0, SIZE) == good
            await scribble(s, "src", rnd, 100, 4)          # the damage to undo
            await s.pair_throttle("cl", rate=4 * MiB)      # slow: host I/O lands mid-restore
            await s.pair_restore("cl", protected=True)
            lun = s.devices["src"].lunio
            for _ in range(20):                            # copy-on-demand reads
                off = rnd.randrange(SIZE // 4096) * 4096
                assert bytes(await lun.read(off, 4096)) == good[off:off + 4096]
            expect = bytearray(good)
            for _ in range(20):
                off = rnd.randrange(SIZE // 4096) * 4096
                await lun.write(off, b"\x05" * 4096)
                expect[off:off + 4096] = b"\x05" * 4096
            with pytest.raises(NotReadyError):             # protected: the clone is hidden
                await s.devices["cl"].lunio.read(0, 512)
            await s.pair_pause("cl")
            paused = s.pair_show("cl")["progress"]
            assert paused["paused"], paused
            await s.pair_resume("cl")
            await s.pair_throttle("cl", rate=0)
            await wait_state(s, "cl", "fractured")
            assert await image(s, "src") == bytes(expect)
            assert await image(s, "cl") == good            # the fracture-time image, untouched
            await s.pair_restore("cl", protected=False)
            await wait_state(s, "cl", "synchronized")     # mirrored again afterwards
            assert await image(s, "src") == good == await image(s, "cl")
        finally:
            await s.stop()
    asyncio.run(go())


def test_fencing_takes_the_volume_offline_and_relink_brings_it_back(ceph, tmp_path):
    async def go():
        s = await started(tmp_path)
        try:
            spec = ceph.spec()
            await s.volume_create("r", size="4M", rbd=spec.image_name, ceph_conf=ceph.conf)
            await s.volume_create("f", path=str(tmp_path / "f.img"), size="4M")
            lun = s.devices["r"].lunio
            await lun.write(0, b"a" * 4096, fua=True)
            img, close = take_over(spec)
            acked = 0
            for i in range(1, 10):
                # the first command to meet the fence already says why: NOT
                # READY (the medium is fine), never a MEDIUM ERROR
                try:
                    await lun.write(i * 4096, b"b" * 4096)
                    acked += 1
                except NotReadyError as e:
                    assert "blocklisted" in str(e) or "exclusive lock" in str(e)
            assert acked == 0
            show = s.volume_show("r")
            assert show["access"] == "not-ready" and "blocklisted" in show["offline"]
            sense = not_ready_sense(lun)
            assert sense is not None and sense.key == c.NOT_READY
            with pytest.raises(NotReadyError):
                await lun.write(0, b"c" * 4096)
            assert img.read(0, 10 * 4096) == b"a" * 4096 + bytes(9 * 4096)
            await s.devices["f"].lunio.write(0, b"f" * 4096, fua=True)   # others keep serving
            with pytest.raises(ServiceError, match="in use"):
                await s.volume_relink("r")            # the other client still holds it
            close()
            v = await s.volume_relink("r")            # reopened with a new client
            assert v["offline"] is None and v["access"] == "read-write"
            await lun.write(4096, b"d" * 4096, fua=True)
            assert read_image(spec, 0, 8192) == b"a" * 4096 + b"d" * 4096
        finally:
            await s.stop()
    asyncio.run(go())


def test_saveconfig_restoreconfig_round_trip(ceph, tmp_path):
    async def go():
        s = await started(tmp_path)
        spec = ceph.spec()
        try:
            await s.volume_create("r", size="4M", rbd=spec.image_name, ceph_conf=ceph.conf)
            doc = s.saveconfig()
            await s.volume_delete("r")
        finally:
            await s.stop()
        s = await started(tmp_path, "fresh")
        try:
            made = await s.restoreconfig(doc)
            assert made["created"]["volumes"] == ["r"]
            assert s.volume_show("r")["kind"] == "rbd"
            # a document whose RBD location is not one is refused before any change
            bad = {**doc, "volumes": [{**doc["volumes"][0], "name": "q",
                                       "path": "rbd:rbd/x:conf=rel/ceph.conf:id=admin"}]}
            with pytest.raises(ServiceError, match="bad ceph.conf path"):
                await s.restoreconfig(bad)
            assert s.cfg.volume("q") is None
        finally:
            await s.stop()
    asyncio.run(go())


def test_eight_clones_on_rbd(ceph, tmp_path):
    """One file source, eight clones on RBD: each fractured at another
    moment, then a protected restore from one of them."""
    rnd = random.Random(8)

    async def go():
        s = await started(tmp_path)
        try:
            await make(s, ceph, "src", "file", tmp_path)
            images = []
            for i in range(8):
                await make(s, ceph, f"c{i}", "rbd", tmp_path)
                await s.pair_create("src", f"c{i}", extent_size="64K")
            for i in range(8):
                await scribble(s, "src", rnd, 20, 10 + i)
                await wait_state(s, f"c{i}", "synchronized")
                await s.pair_fracture(f"c{i}")
                images.append(await image(s, "src"))
            for i in range(8):
                assert await image(s, f"c{i}") == images[i]
            await s.pair_restore("c3", protected=True)
            await wait_state(s, "c3", "fractured")
            assert await image(s, "src") == images[3]
        finally:
            await s.stop()
    asyncio.run(go())
