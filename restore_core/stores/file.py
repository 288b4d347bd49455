"""An image file (sparse is fine) or a block device.

The file backend first tries the I/O inline with RWF_NOWAIT (served from
the page cache without blocking) and only falls back to a worker thread
when the kernel says it would block: a thread hop costs tens of
microseconds, more than a cached 4 KiB read itself. Buffered writes cannot
ask RWF_NOWAIT on most kernels (nor reads on tmpfs/overlayfs before 6.6),
so small ones go inline while they stay fast; calls that block (writeback
throttling, a cold disk) send that kind of I/O to the threads for a while
(InlineGuard), so a congested disk never stalls the loop long.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..blockstore import BlockStore, BlockStoreError

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
# copy_file_range cannot copy between these two files (other file systems
# before Linux 5.19 or of other types, block devices, no support): copy
# through a buffer instead
_NO_COPY_RANGE = frozenset((errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS))
# Inline (on-loop) syscalls: one slower than INLINE_SLOW_S counts a strike,
# INLINE_STRIKES strikes in a row (or one call over INLINE_BLOCKED_S) send
# that kind of I/O to the threads for a backoff. Seen from the loop, a call
# that blocked on the disk and one whose thread (or vCPU) was preempted on a
# busy machine look alike, and the preempted kind comes alone: so the first
# backoff is short (INLINE_BACKOFF_MIN_S) and only trips that follow each
# other (within INLINE_BACKOFF_MAX_S of the last backoff's end: the disk is
# still congested) double it, up to INLINE_BACKOFF_MAX_S. A flat second per
# trip sent half of all I/O to the threads on a loaded 2-core host.
INLINE_SLOW_S = 0.002
INLINE_BLOCKED_S = 0.02
INLINE_STRIKES = 3
INLINE_BACKOFF_MIN_S = 0.05
INLINE_BACKOFF_MAX_S = 1.0
#: Writes at least this big (a copier's extents, a host's streaming writes)
#: start their own writeback at once (sync_file_range, not waiting for it):
#: else a restore's dirty data all waits for the final flush, which then
#: writes the whole image back while nothing else happens (measured: 256
#: MiB restored from RBD, that flush 97-118 ms of a 0.59 s restore; 0-12 ms
#: with write-behind). Durability is unchanged: a flush still fdatasyncs.
WRITE_BEHIND_MIN = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back a big write's data, not waiting for it (see
    WRITE_BEHIND_MIN); advisory: a writeback error surfaces at the next flush."""
    if length >= WRITE_BEHIND_MIN and _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# One shared pool for blocking I/O: file reads/writes release the GIL, so a
# few threads keep several requests in flight on the device. Background
# copies have a small pool of their own, at low CPU priority: a host read
# that misses the page cache never queues behind them, nor waits for a CPU.
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_background_pool: ThreadPoolExecutor | None = None
BACKGROUND_THREADS = 2
BACKGROUND_NICE = 10


_PR_SET_NAME = 15


def _name_thread(name: bytes) -> None:
    """Give the calling thread its kernel name (top -H, /proc/*/task/*/comm):
    Python's thread names stay inside Python, and CPU per pool is what the
    latency bench's accounting (and an operator) reads."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _background_thread() -> None:
    """A background pool thread: named, and at low CPU priority (nice
    BACKGROUND_NICE, this thread only): copy_file_range does its memcpy in
    the calling thread, which at normal priority held a CPU the event loop
    wanted on a 2-core machine; a host command's thread now preempts a copy
    at once. Not SCHED_IDLE: on this machine, loaded by other work, idle
    priority got no CPU and 75% of busy copies went at normal priority
    (the copier's floor, restore_core.hostyield); nice 10 keeps about a
    tenth of a CPU against each busy thread (alternated bench runs: QD32
    0.84 vs 0.75, QD1 p99 2.2 vs 3.8 at load 5-6)."""
    _name_thread(b"lr-bg")
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError:
        pass            # not allowed: background I/O at normal priority


def io_executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lr-io",
                                       initializer=_name_thread, initargs=(b"lr-io",))
        return _pool


def background_executor() -> ThreadPoolExecutor:
    global _background_pool
    with _pool_lock:
        if _background_pool is None:
            _background_pool = ThreadPoolExecutor(max_workers=BACKGROUND_THREADS,
                                                  thread_name_prefix="lr-bg",
                                                  initializer=_background_thread)
        return _background_pool


class InlineGuard:
    """Whether a kind of blocking syscall may run inline on the event loop
    right now: yes while it stays fast, no for a while after it blocked."""

    __slots__ = ("off_until", "strikes", "backoffs", "backoff")

    def __init__(self) -> None:
        self.off_until = 0.0
        self.strikes = 0
        self.backoffs = 0
        self.backoff = INLINE_BACKOFF_MIN_S      # the last backoff's length

    def call(self, fn, *args):
        """fn(*args) inline if allowed now, timed; None if not allowed or it
        failed with OSError (the caller's thread path reports the error)."""
        now = time.monotonic()
        if now < self.off_until:
            return None
        try:
            r = fn(*args)
        except OSError:
            return None
        self.took(now, time.monotonic())
        return r

    def took(self, start: float, end: float) -> None:
        t = end - start
        if t <= INLINE_SLOW_S:
            self.strikes = 0
            return
        self.strikes += 1
        if t > INLINE_BLOCKED_S or self.strikes >= INLINE_STRIKES:
            if end - self.off_until > INLINE_BACKOFF_MAX_S:
                self.backoff = INLINE_BACKOFF_MIN_S     # calm since the last one
            else:
                self.backoff = min(self.backoff * 2, INLINE_BACKOFF_MAX_S)
            self.off_until = end + self.backoff
            self.strikes = 0
            self.backoffs += 1


class FileBlockStore(BlockStore):
    """An image file (sparse is fine) or a block device.

    Opening never changes an existing file: its size must be the one asked
    for (or none asked). Only a file this store creates itself (``create``
    and the path did not exist) is sized, and it is removed again if the
    open fails half way. The open file is flock()ed for the store's life
    (shared when read-only) so no two volumes and no two daemons share one
    image; a failed open leaks no descriptor.
    """

    def __init__(self, path: str, size: int | None = None, *, create: bool = False,
                 readonly: bool = False, nofollow: bool = False) -> None:
        self.path = path
        self.name = path
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if nofollow:
            flags |= os.O_NOFOLLOW
        self.created = False
        if create:
            try:
                self._fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                self.created = True
            except FileExistsError:
                self._fd = os.open(path, flags)
        else:
            self._fd = os.open(path, flags)
        try:
            self._size = self._open_checks(path, size, readonly)
        except BaseException:
            self.abandon()
            raise
        self.identity = self._stat_identity(os.fstat(self._fd))
        self._nowait = _RWF_NOWAIT != 0
        self.inline_write_max = 0 if self._is_blockdev else 128 * 1024
        # reads go inline with RWF_NOWAIT (the kernel says when they would
        # block); where it is not supported (tmpfs and overlayfs before
        # Linux 6.6...) small reads go inline while they stay fast, as writes
        self.inline_read_max = 0 if self._is_blockdev else 128 * 1024
        self.write_guard = InlineGuard()
        self.read_guard = InlineGuard()
        # Flush coalescing: writes completed / covered by a finished flush.
        self._written = 0
        self._flushed = 0
        self._flushing: asyncio.Future[None] | None = None
        self.fdatasyncs = 0
        # devices of destinations copy_file_range refused (another file
        # system, one that cannot): those copies go through a buffer
        self._no_copy_range: set[int] = set()

    def _open_checks(self, path: str, size: int | None, readonly: bool) -> int:
        """Lock the open image and return its size; raise if it is not usable."""
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockStoreError(f"{path} is in use (locked by another volume or daemon)") \
                from None
        st = os.fstat(self._fd)
        self._is_blockdev = stat.S_ISBLK(st.st_mode)
        if not self._is_blockdev and not stat.S_ISREG(st.st_mode):
            raise BlockStoreError(f"{path} is neither a regular file nor a block device")
        if self._is_blockdev:
            actual = os.lseek(self._fd, 0, os.SEEK_END)
            if size is not None and size != actual:
                raise BlockStoreError(f"{path}: device has {actual} bytes, not {size}")
            return actual
        if self.created:
            if size is None:
                raise BlockStoreError(f"{path}: a new image needs a size")
            os.ftruncate(self._fd, size)  # sparse: no blocks allocated
            return size
        if size is not None and st.st_size != size:
            raise BlockStoreError(f"{path}: file has {st.st_size} bytes, expected {size}")
        return st.st_size

    @staticmethod
    def _stat_identity(st: os.stat_result) -> tuple[int, int]:
        return (st.st_dev, st.st_ino)

    def abandon(self) -> None:
        """Close, and remove the file if this store created it (a failed
        create leaves nothing behind)."""
        self.close()
        if self.created:
            self.created = False
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def lost(self) -> str | None:
        """Why the open image is no longer the one at its path (unlinked, or
        the path now names another file), or None while it still is."""
        try:
            st = os.fstat(self._fd)
        except OSError as e:
            return f"image {self.path} cannot be checked: {e.strerror or e}"
        if st.st_nlink == 0:
            return f"image {self.path} was deleted"
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return f"image {self.path} was moved or deleted"
        except OSError as e:
            return f"image {self.path} cannot be checked: {e.strerror or e}"
        if self._stat_identity(now) != self.identity:
            return f"image {self.path} was replaced by another file"
        return None

    def grow(self, size: int) -> None:
        """Make the store ``size`` bytes: a file is extended (sparse), a block
        device must already be that big (grow the device first). Never shrinks."""
        if size < self._size:
            raise BlockStoreError(f"{self.path}: cannot shrink from {self._size} to {size} bytes")
        if self._is_blockdev:
            actual = os.lseek(self._fd, 0, os.SEEK_END)
            if actual != size:
                raise BlockStoreError(f"{self.path}: device has {actual} bytes, not {size}; "
                                      "grow the device first")
        else:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def is_blockdev(self) -> bool:
        return self._is_blockdev

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "blockdev" if self._is_blockdev else "file"

    # -- synchronous primitives (also used by the benchmarks' plain copy) --
    def readinto_sync(self, offset: int, buf: memoryview) -> None:
        got = 0
        want = len(buf)
        while got < want:
            n = os.preadv(self._fd, [buf[got:]], offset + got)
            if n == 0:
                raise BlockStoreError(f"{self.name}: short read at {offset + got}", offset + got)
            got += n

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(self._fd, [view[done:]], offset + done)

    def write_behind(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """write_sync, then (big writes) start writing it back: see WRITE_BEHIND_MIN."""
        self.write_sync(offset, data)
        _start_writeback(self._fd, offset, len(data))

    def flush_sync(self) -> None:
        os.fdatasync(self._fd)

    def try_readinto(self, offset: int, bufs: list[memoryview]) -> bool:
        n = sum(map(len, bufs))
        if offset < 0 or offset + n > self._size:
            return False
        if self._nowait:
            try:
                return os.preadv(self._fd, bufs, offset, _RWF_NOWAIT) == n
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait = False         # from now on: the inline guard
                return False
        return n <= self.inline_read_max and self.read_guard.call(os.preadv, self._fd, bufs, offset) == n

    def try_write(self, offset: int, bufs: list) -> bool:
        n = sum(map(len, bufs))
        if n > self.inline_write_max or offset < 0 or offset + n > self._size:
            return False
        if self.write_guard.call(self._pwritev_all, offset, bufs, n) is None:
            return False
        self._written += 1
        return True

    def _pwritev_all(self, offset: int, bufs: list, n: int) -> int:
        if os.pwritev(self._fd, bufs, offset) != n:      # short (disk full?): once more whole
            self.write_sync(offset, b"".join(bufs))
        return n

    async def readinto(self, offset: int, buf: memoryview) -> None:
        self.check_range(offset, len(buf))
        if self.try_readinto(offset, [buf]):
            return
        await self._readinto_in(io_executor(), offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset, len(data))
        if self.try_write(offset, [data]):
            return
        await self._write_in(io_executor(), offset, data)

    async def readinto_background(self, offset: int, buf: memoryview) -> None:
        self.check_range(offset, len(buf))
        await self._readinto_in(background_executor(), offset, buf)

    async def write_background(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset, len(data))
        await self._write_in(background_executor(), offset, data)

    def copies_within(self, dst: BlockStore) -> bool:
        return isinstance(dst, FileBlockStore) and dst.identity[0] not in self._no_copy_range

    async def copy_within(self, dst: BlockStore, offset: int, length: int,
                          background: bool = False) -> bool:
        """File to file: copy_file_range in one worker job, so the kernel
        copies page cache to page cache with the GIL released, no buffer
        through Python and no hop back to the loop between read and write
        (twice as fast as preadv + pwritev on a cached source). False for
        another kind of store or files the kernel cannot join."""
        if not self.copies_within(dst):
            return False
        assert isinstance(dst, FileBlockStore)
        self.check_range(offset, length)
        dst.check_range(offset, length)
        pool = background_executor() if background else io_executor()
        try:
            copied = await asyncio.get_running_loop().run_in_executor(
                pool, self._copy_range_sync, dst, offset, length)
        except OSError as e:
            raise BlockStoreError(f"{self.name}: copy to {dst.name} failed at {offset}: {e}",
                                  offset) from e
        if copied:
            dst._written += 1
        return copied

    def _copy_range_sync(self, dst: "FileBlockStore", offset: int, length: int) -> bool:
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(self._fd, dst._fd, length - done, offset + done, offset + done)
            except OSError as e:
                if done == 0 and e.errno in _NO_COPY_RANGE:
                    self._no_copy_range.add(dst.identity[0])
                    return False
                raise
            if n == 0:
                raise BlockStoreError(f"{self.name}: short read at {offset + done}", offset + done)
            done += n
        _start_writeback(dst._fd, offset, length)     # as write_behind
        return True

    async def _readinto_in(self, pool: ThreadPoolExecutor, offset: int, buf: memoryview) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self.readinto_sync, offset, buf)
        except OSError as e:
            raise BlockStoreError(f"{self.name}: read error at {offset}: {e}", offset) from e

    async def _write_in(self, pool: ThreadPoolExecutor, offset: int,
                        data: bytes | bytearray | memoryview) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self.write_behind, offset, data)
        except OSError as e:
            raise BlockStoreError(f"{self.name}: write error at {offset}: {e}", offset) from e
        self._written += 1

    def note_written(self, count: int) -> None:
        """``count`` writes were made on our descriptor by someone else (the
        native TCMU ring loop): the next flush must cover them."""
        self._written += count

    async def flush(self) -> None:
        """Group flush: one fdatasync covers every write completed before it
        starts, so concurrent durable writes share it instead of queueing
        one each."""
        want = self._written
        while self._flushed < want:
            if self._flushing is None:
                fut = self._flushing = asyncio.get_running_loop().create_future()
                covers = self._written
                try:
                    self.fdatasyncs += 1
                    await asyncio.get_running_loop().run_in_executor(io_executor(), self.flush_sync)
                except OSError as e:
                    fut.set_exception(BlockStoreError(f"{self.name}: flush failed: {e}"))
                    fut.exception()   # retrieved: waiters get their own copy below
                    raise BlockStoreError(f"{self.name}: flush failed: {e}") from e
                else:
                    self._flushed = max(self._flushed, covers)
                    fut.set_result(None)
                finally:
                    self._flushing = None
            else:
                await asyncio.shield(self._flushing)

    async def discard(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        if self._is_blockdev:
            await super().discard(offset, length)
            return
        try:
            # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: reads back zeros.
            await asyncio.get_running_loop().run_in_executor(
                io_executor(), _punch_hole, self._fd, offset, length)
        except OSError:
            await super().discard(offset, length)
        else:
            self._written += 1      # the next flush must cover the punch

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if self._is_blockdev:
            return [(offset, length, True)]
        return _allocation_runs(self._fd, offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _punch_hole(fd: int, offset: int, length: int) -> None:
    punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    rc = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(punch),
                        ctypes.c_longlong(offset), ctypes.c_longlong(length))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _allocation_runs(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    end = offset + length
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, _SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole until EOF
                runs.append((pos, end - pos, False))
                break
            return [(offset, length, True)]
        if data > pos:
            hole_end = min(data, end)
            runs.append((pos, hole_end - pos, False))
            pos = hole_end
            continue
        try:
            hole = os.lseek(fd, pos, _SEEK_HOLE)
        except OSError:
            hole = end
        data_end = min(hole, end)
        runs.append((pos, data_end - pos, True))
        pos = data_end
    return runs
