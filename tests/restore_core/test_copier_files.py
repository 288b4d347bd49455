"""The copier between two image files: the stores copy between themselves
(copy_file_range), or through a buffer where the kernel cannot."""
import asyncio
import errno
import os

import pytest

from restore_core.blockstore import MemoryBlockStore
from restore_core.copier import BufferPool
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


def test_stores_that_copy_within_take_no_buffer(tmp_path):
    """File to file the kernel copies: the pool lends no buffer (it would be
    a zero-filled bytearray of the copy's size, busy copies span 8 MiB, kept
    for reuse); through memory the copy takes one."""
    async def go():
        size = 8 << 20
        data = os.urandom(size)
        pool = BufferPool()
        taken: list[int] = []
        plain = pool.take
        pool.take = lambda n: taken.append(n) or plain(n)
        fa = FileBlockStore(str(tmp_path / "a.img"), size, create=True)
        fb = FileBlockStore(str(tmp_path / "b.img"), size, create=True)
        await fa.write(0, data)
        assert fa.copies_within(fb)
        await pool.copy(fa, fb, 0, size)
        assert taken == [] and pool._free == [] and bytes(await fb.read(0, size)) == data
        mem = MemoryBlockStore(size)
        assert not fa.copies_within(mem)
        await pool.copy(fa, mem, 4096, 8192)
        assert taken == [8192] and bytes(mem.current[4096:12288]) == data[4096:12288]
        fa.close()
        fb.close()
    asyncio.run(go())
