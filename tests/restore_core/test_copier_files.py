"""The copier between two image files: the stores copy between themselves
(copy_file_range), or through a buffer where the kernel cannot."""
import asyncio
import errno
import os

import pytest

from restore_core.stores.file import FileBlockStore

from .util import ES, Rig, pattern


async def file_pair(tmp_path, n: int):
    """A fractured pair of image files whose every extent differs."""
    r = Rig(n)
    r.src = FileBlockStore(str(tmp_path / "src.img"), r.size, create=True)
    r.src.name = "src"
    clone = FileBlockStore(str(tmp_path / "cln0.img"), r.size, create=True)
    clone.name = "cln0"
    r.clones = [clone]
    eng = await r.boot()
    p = await r.fractured_pair()
    for e in range(n):
        await r.sio.write(e * ES, pattern(e + 1, ES))
    return r, eng, p


@pytest.mark.parametrize("kernel_copies", [True, False])
def test_a_restore_between_files_lands_every_extent(tmp_path, monkeypatch, kernel_copies):
    async def go():
        n = 64
        copies: list[int] = []
        plain = FileBlockStore._copy_range_sync

        def counted(self, dst, offset, length):
            copies.append(length)
            return plain(self, dst, offset, length)

        monkeypatch.setattr(FileBlockStore, "_copy_range_sync", counted)
        if not kernel_copies:
            def exdev(*args):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            monkeypatch.setattr(os, "copy_file_range", exdev)
        r, eng, p = await file_pair(tmp_path, n)
        clone = bytes(await r.cln.read(0, r.size))
        assert bytes(await r.src.read(0, r.size)) != clone
        await eng.set_throttle(p.id, batch_extents=16, depth=2)
        copies.clear()                      # the pair's initial sync copied too
        await eng.restore(p.id)
        await eng.wait_job(p.id, 60)
        assert bytes(await r.src.read(0, r.size)) == clone
        if kernel_copies:       # every copy by the kernel, in batches
            assert sum(copies) == r.size and max(copies) == 16 * ES
        else:     # asked by the copies in flight then (depth 2), then through a buffer
            assert 1 <= len(copies) <= 2
        await eng.close()
    asyncio.run(go())
