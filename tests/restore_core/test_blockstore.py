import asyncio
import ctypes.util
import errno
import os
import threading

import pytest

from restore_core.blockstore import BlockStoreError, MemoryBlockStore
from restore_core.stores import file as file_store
from restore_core.stores.file import FileBlockStore


def run(c):
    return asyncio.run(c)


def test_sparse_multi_tib_file(tmp_path):
    size = 8 << 40     # 8 TiB, sparse: allocates only what is written
    s = FileBlockStore(str(tmp_path / "big.img"), size, create=True)

    async def go():
        await s.write(size - 4096, b"\xab" * 4096)
        await s.write(3 << 40, b"\xcd" * 512)
        await s.flush()
        assert bytes(await s.read(size - 4096, 4096)) == b"\xab" * 4096
        assert bytes(await s.read(3 << 40, 512)) == b"\xcd" * 512
        assert bytes(await s.read(1 << 40, 4096)) == bytes(4096)
        runs = await s.allocation(size - (1 << 20), 1 << 20)
        assert runs[-1][2] is True and runs[0][2] is False
    run(go())
    assert os.stat(tmp_path / "big.img").st_blocks * 512 < 1 << 20
    s.close()


def test_out_of_range_and_size_mismatch(tmp_path):
    p = str(tmp_path / "x.img")
    s = FileBlockStore(p, 1 << 20, create=True)
    with pytest.raises(BlockStoreError, match="outside"):
        run(s.read((1 << 20) - 10, 20))
    with pytest.raises(BlockStoreError, match="outside"):
        run(s.write(-1, b"x"))
    s.close()
    with pytest.raises(BlockStoreError, match="expected"):
        FileBlockStore(p, 2 << 20)
    assert FileBlockStore(p).size == 1 << 20


def test_discard_reads_back_zeros(tmp_path):
    s = FileBlockStore(str(tmp_path / "d.img"), 1 << 20, create=True)

    async def go():
        await s.write(0, b"\xff" * (1 << 20))
        await s.discard(4096, 65536)
        assert bytes(await s.read(4096, 65536)) == bytes(65536)
        assert bytes(await s.read(0, 4096)) == b"\xff" * 4096
        assert bytes(await s.read(69632, 4096)) == b"\xff" * 4096
    run(go())


def test_memory_store_power_cut_keeps_only_flushed():
    m = MemoryBlockStore(8192)

    async def go():
        await m.write(0, b"a" * 10)
        await m.flush()
        await m.write(0, b"b" * 10)
        await m.write(100, b"c" * 10)
    run(go())
    m.power_cut()
    assert bytes(m.current[:10]) == b"a" * 10 and bytes(m.current[100:110]) == bytes(10)
    run(m.write(0, b"d"))
    m.power_cut(keep=[0])
    assert m.current[0:1] == b"d"


def test_hole_punches_look_libc_up_once(tmp_path, monkeypatch):
    """find_library forks ``ldconfig -p``: once per process (at import),
    not per UNMAP."""
    calls = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: calls.append(name) or real(name))
    s = FileBlockStore(str(tmp_path / "p.img"), 1 << 20, create=True)

    async def go():
        await s.write(0, b"\xff" * (1 << 20))
        for i in range(3):
            await s.discard(i * 65536, 4096)
        assert bytes(await s.read(65536, 4096)) == bytes(4096)
    run(go())
    s.close()
    assert calls == []


def test_medium_error_injection_names_offset():
    m = MemoryBlockStore(8192)
    m.fail_at = {5000}
    with pytest.raises(BlockStoreError) as ei:
        run(m.read(4096, 4096))
    assert ei.value.offset == 5000


def test_concurrent_flushes_share_fdatasync(tmp_path):
    s = FileBlockStore(str(tmp_path / "f.img"), 1 << 20, create=True)

    async def go():
        await s.flush()
        assert s.fdatasyncs == 0          # nothing written: nothing to sync
        for i in range(32):
            await s.write(i * 4096, b"x" * 4096)
        await asyncio.gather(*(s.flush() for _ in range(32)))
        assert 1 <= s.fdatasyncs <= 2
        n = s.fdatasyncs
        await s.discard(0, 4096)
        await s.flush()
        assert s.fdatasyncs == n + 1      # a hole punch needs a sync too
    run(go())


def test_inline_guard_tolerates_a_slow_call_and_backs_off_when_blocked():
    from restore_core.stores import file as b
    g = b.InlineGuard()
    g.took(0.0, b.INLINE_SLOW_S * 2)                     # one preempted call: still inline
    assert g.off_until == 0.0 and g.strikes == 1
    g.took(1.0, 1.0001)                                   # a fast one clears the strikes
    assert g.strikes == 0
    for i in range(b.INLINE_STRIKES):                     # slow calls in a row: threads
        g.took(2.0 + i, 2.0 + i + b.INLINE_SLOW_S * 2)
    assert g.off_until > 2.0 + b.INLINE_STRIKES - 1 and g.backoffs == 1
    g2 = b.InlineGuard()
    g2.took(5.0, 5.0 + b.INLINE_BLOCKED_S * 2)           # one really blocked call: threads
    assert g2.off_until == pytest.approx(5.0 + b.INLINE_BLOCKED_S * 2 + b.INLINE_BACKOFF_MIN_S)


def test_inline_guard_backoff_grows_only_while_trips_follow_each_other():
    """A lone slow call (a preempted thread looks blocked too) costs a short
    spell of thread hops; a disk that stays congested trips again as soon
    as the loop tries inline, and the backoff doubles up to the maximum."""
    from restore_core.stores import file as b
    g = b.InlineGuard()
    blocked = b.INLINE_BLOCKED_S * 2
    for t in (10.0, 20.0, 30.0):                          # sporadic: each short
        g.took(t, t + blocked)
        assert g.off_until - (t + blocked) == pytest.approx(b.INLINE_BACKOFF_MIN_S)
    lengths = []
    t = 40.0
    for _ in range(8):                                    # congested: right after each backoff
        g.took(t, t + blocked)
        lengths.append(round(g.off_until - (t + blocked), 3))
        t = g.off_until
    assert lengths[:3] == [b.INLINE_BACKOFF_MIN_S, b.INLINE_BACKOFF_MIN_S * 2, b.INLINE_BACKOFF_MIN_S * 4]
    assert lengths[-1] == b.INLINE_BACKOFF_MAX_S and g.backoffs == 11
    g.took(t + 5.0, t + 5.0 + blocked)                    # calm again: short once more
    assert g.off_until - (t + 5.0 + blocked) == pytest.approx(b.INLINE_BACKOFF_MIN_S)


def test_reads_without_rwf_nowait_go_inline_then_to_threads_after_blocking(tmp_path, monkeypatch):
    """tmpfs/overlayfs on older kernels refuse RWF_NOWAIT: small reads must
    still be served inline (no thread hop per command) while they are fast."""
    import concurrent.futures
    from restore_core.stores import file as b
    s = FileBlockStore(str(tmp_path / "f.img"), 1 << 20, create=True)
    s._nowait = False
    hops = []
    real = b.io_executor()

    class Counting(concurrent.futures.Executor):
        def submit(self, fn, *a, **kw):
            hops.append(fn.__name__)
            return real.submit(fn, *a, **kw)
    monkeypatch.setattr(b, "io_executor", lambda: Counting())

    async def go():
        await s.write(4096, b"y" * 4096)
        assert bytes(await s.read(4096, 4096)) == b"y" * 4096
        assert hops == []                                 # both inline
        s.read_guard.off_until = float("inf")              # as after a blocked read
        assert bytes(await s.read(4096, 4096)) == b"y" * 4096
        assert hops == ["readinto_sync"]
        assert bytes(await s.read(512 << 10, 256 << 10)) == bytes(256 << 10)   # big: a thread
        assert hops == ["readinto_sync"] * 2
    run(go())
    s.close()


# -- issue 10: opening never changes an image; locks; nothing left behind -------------------
def test_opening_an_existing_file_never_resizes_it(tmp_path):
    p = tmp_path / "e.img"
    p.write_bytes(b"\x11" * 8192)
    for size in (4096, 16384):
        with pytest.raises(BlockStoreError, match="expected"):
            FileBlockStore(str(p), size, create=True)
        assert p.read_bytes() == b"\x11" * 8192


def test_one_image_one_store(tmp_path):
    p = str(tmp_path / "l.img")
    s = FileBlockStore(p, 1 << 20, create=True)
    with pytest.raises(BlockStoreError, match="in use"):
        FileBlockStore(p)
    with pytest.raises(BlockStoreError, match="in use"):
        FileBlockStore(p, readonly=True)
    s.close()
    FileBlockStore(p).close()       # free again once closed


def test_failed_create_closes_and_removes_what_it_made(tmp_path):
    p = tmp_path / "huge.img"
    with open(tmp_path / "probe", "wb") as f:
        try:
            f.truncate(64 << 40)
            pytest.skip("this file system takes 64 TiB files")
        except OSError:
            pass
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(OSError):
            FileBlockStore(str(p), 64 << 40, create=True)
    assert not p.exists()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_lost_and_grow(tmp_path):
    p = tmp_path / "g.img"
    s = FileBlockStore(str(p), 1 << 20, create=True)
    assert s.lost() is None
    with pytest.raises(BlockStoreError, match="shrink"):
        s.grow(4096)
    s.grow(2 << 20)
    assert s.size == p.stat().st_size == 2 << 20
    os.rename(p, tmp_path / "other.img")
    assert "moved or deleted" in s.lost()
    p.write_bytes(b"")
    assert "replaced" in s.lost()
    os.unlink(tmp_path / "other.img")
    assert "deleted" in s.lost()
    s.close()


def test_background_io_runs_in_its_own_threads_never_on_the_loop(tmp_path):
    """The copier's background I/O leaves the event loop free for host
    commands and does not queue in the pool host I/O uses."""
    async def go() -> None:
        s = FileBlockStore(str(tmp_path / "img"), 1 << 20, create=True)
        where: list[str] = []
        plain_read, plain_write = s.readinto_sync, s.write_sync

        def read_noting_thread(offset, buf):
            where.append(threading.current_thread().name)
            plain_read(offset, buf)

        def write_noting_thread(offset, data):
            where.append(threading.current_thread().name)
            plain_write(offset, data)

        s.readinto_sync, s.write_sync = read_noting_thread, write_noting_thread
        await s.write_background(4096, b"x" * 4096)        # small: inline for a host
        buf = bytearray(4096)
        await s.readinto_background(4096, memoryview(buf))
        assert buf == b"x" * 4096
        assert len(where) == 2 and all(n.startswith("lr-bg") for n in where), where
        await s.flush()                                     # the write counts for the flush
        assert s.fdatasyncs == 1
        with pytest.raises(BlockStoreError):
            await s.readinto_background((1 << 20) - 10, memoryview(bytearray(4096)))
        s.close()
    asyncio.run(go())


def test_copy_between_files_is_one_kernel_job_and_counts_for_the_flush(tmp_path, monkeypatch):
    """copy_within file to file: copy_file_range in one worker job (the
    background pool while hosts are busy), flushed like a write, big copies
    start their writeback; to another kind of store it declines (the caller
    copies through memory)."""
    async def go() -> None:
        a = FileBlockStore(str(tmp_path / "a.img"), 1 << 20, create=True)
        b = FileBlockStore(str(tmp_path / "b.img"), 1 << 20, create=True)
        data = os.urandom(1 << 20)
        await a.write(0, data)
        where: list[str] = []
        plain = a._copy_range_sync

        def noting_thread(dst, offset, length):
            where.append(threading.current_thread().name)
            return plain(dst, offset, length)

        a._copy_range_sync = noting_thread
        writeback: list[int] = []
        monkeypatch.setattr(file_store, "_sync_file_range",
                            lambda fd, off, n, flags: writeback.append(n) or 0)
        assert await a.copy_within(b, 4096, 256 << 10, background=True)
        assert await a.copy_within(b, 0, 4096, background=False)
        assert where[0].startswith("lr-bg") and where[1].startswith("lr-io"), where
        got = await b.read(0, (256 << 10) + 4096)
        assert bytes(got) == data[:(256 << 10) + 4096]
        await b.flush()
        assert b.fdatasyncs == 1
        assert writeback == []
        assert await a.copy_within(b, 0, 1 << 20, background=True)
        assert writeback == [1 << 20]                    # as a big write: see WRITE_BEHIND_MIN
        mem = MemoryBlockStore(1 << 20)
        assert not await a.copy_within(mem, 0, 4096, background=True)
        assert len(where) == 3
        await a.copy_to(mem, 0, memoryview(bytearray(4096)), background=True)
        assert mem.current[:4096] == data[:4096]
        with pytest.raises(BlockStoreError):
            await a.copy_within(b, (1 << 20) - 10, 4096, background=True)
        a.close()
        b.close()
    asyncio.run(go())


def test_copy_refused_by_the_kernel_goes_through_the_buffer_once_and_for_all(tmp_path, monkeypatch):
    """Files copy_file_range cannot join (another file system, EXDEV): the
    copy goes through the buffer, and later copies to that device do not ask
    the kernel again."""
    async def go() -> None:
        a = FileBlockStore(str(tmp_path / "a.img"), 1 << 20, create=True)
        b = FileBlockStore(str(tmp_path / "b.img"), 1 << 20, create=True)
        await a.write(0, b"y" * 8192)
        calls = []

        def exdev(*args):
            calls.append(args)
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", exdev)
        assert not await a.copy_within(b, 0, 8192, background=True)
        assert not await a.copy_within(b, 0, 8192, background=False)
        assert len(calls) == 1
        await a.copy_to(b, 0, memoryview(bytearray(8192)))
        assert bytes(await b.read(0, 8192)) == b"y" * 8192
        a.close()
        b.close()
    asyncio.run(go())


def test_big_writes_start_their_writeback_at_once(tmp_path, monkeypatch):
    """A restore's copies (and streaming host writes) must not leave all
    their data for the final flush: each big write starts its writeback."""
    calls: list[tuple[int, int, int, int]] = []
    real = file_store._sync_file_range
    assert real is not None

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((fd, offset, length, flags))
        return real(fd, offset, length, flags)
    monkeypatch.setattr(file_store, "_sync_file_range", record)
    s = FileBlockStore(str(tmp_path / "a.img"), 8 << 20, create=True)
    big = file_store.WRITE_BEHIND_MIN

    async def go():
        await s.write(1 << 20, b"\x11" * big)
        await s.write_background(4 << 20, b"\x22" * big)
        await s.write(0, b"\x33" * 65536)             # small: left to the kernel
        await s.flush()
        assert bytes(await s.read(1 << 20, 4)) == b"\x11" * 4
    asyncio.run(go())
    s.close()
    assert [(o, n) for _, o, n, _ in calls] == [(1 << 20, big), (4 << 20, big)]
    assert all(flags == 2 for *_, flags in calls)      # SYNC_FILE_RANGE_WRITE: no waiting
