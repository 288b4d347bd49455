"""A Ceph RBD image as a block store (librbd's C API, restore_core.stores.librbd).

I/O is asynchronous, and no Python runs on librbd's threads: the loop
queues each aio call for the image's submitter thread
(restore_core.stores.rbd_submit), which starts them in order, and each
completion is queued for the loop, which watches the image's eventfd
(bumped by the C submitter's completion callback once per batch, or by
librbd's own notification per completion with the ctypes one); one
wake-up takes every completion queued by then. So no librbd thread contends for the GIL with
the loop, there is no thread per command, reads land straight in the
caller's buffer and writes go from it (measured, 4 KiB random reads
through iSCSI at QD32: 6-7k IOPS with python3-rbd's callbacks, 8.5-9.5k
this way; the rest is the iSCSI path's own cost on the same cores). The client is set up
the way a SCSI gateway must be (tcmu-runner's rbd handler): no librbd
write-back cache (``rbd_cache=false``: a completed write is on the OSDs,
so the engine's "data durable, then map, then ack" order holds), partial
discards zeroed (a discarded range reads back zeros, as the interface
promises), dispatch in the submitting thread (``rbd_non_blocking_aio=false``:
that thread is ours, so a second hop through librbd's queue buys nothing),
and bounded OSD / monitor operation timeouts so a dead cluster gives the
initiator errors, never a hung daemon.

Fencing: the store takes the image's exclusive lock in managed mode
(``lock_acquire``), so librbd never hands it to another client on
request. Another client can only take the image by breaking the lock,
which blocklists this client; from then on every librbd call fails with
ESHUTDOWN (or EROFS if the lock was broken without blocklisting). The
first such failure fences the store: it refuses all further I/O at once
(its submitter first: nothing queued starts, and the native iSCSI lane's
reads, which ride the same submitter through its C API, are never answered
by the lane from then on), acknowledges nothing still in flight, reports
why through ``lost()`` and
its ``on_fenced`` hook (the service takes the volume offline: NOT READY
with that reason), and only a new open (``volume relink``) brings it back.
A timeout does not fence: the cluster may come back, and the same client
resumes. A fenced store's errors are StoreFencedError: hosts get NOT READY
with the reason, never a MEDIUM ERROR.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import threading
from typing import Callable, TypeVar

from ..blockstore import BlockStore, BlockStoreError, StoreFencedError
from . import librbd
from .librbd import RbdError
from .rbd_submit import DISCARD, FLUSH, READ, WRITE, NativeSubmitter, Submitter, drain, submitter
from .spec import RbdSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

#: librados' own defaults wait forever. An OSD op must outlast an OSD's
#: failure detection (heartbeat grace 20 s + interval 6 s by default, as
#: tcmu-runner advises) but stay under a host's SCSI command timeout (30 s):
#: 25 s unless the ceph.conf sets its own.
OSD_OP_TIMEOUT_S = 25
MON_OP_TIMEOUT_S = 25
CONNECT_TIMEOUT_S = 10
#: How long a close waits for the I/O in flight: each op ends within the
#: OSD op timeout (with the default one; a longer one from ceph.conf is cut
#: short here, and the warning says so).
DRAIN_TIMEOUT_S = OSD_OP_TIMEOUT_S + 5
#: An image this store creates: layering as every RBD tool expects, the
#: exclusive lock (fencing), and the object map that makes allocation
#: queries (GET LBA STATUS) a local lookup.
FEATURES = (librbd.FEATURE_LAYERING | librbd.FEATURE_EXCLUSIVE_LOCK
            | librbd.FEATURE_OBJECT_MAP | librbd.FEATURE_FAST_DIFF)
#: errno values meaning another client owns the image now.
_FENCED = {errno.ESHUTDOWN: "this daemon's Ceph client was blocklisted (another client broke "
                            "the image's exclusive lock)",
           errno.EROFS: "the image's exclusive lock was lost to another client"}


class ImageMissingError(BlockStoreError):
    """The RBD image does not exist (removing it has nothing to do)."""


def remove_image(spec: RbdSpec) -> None:
    """Delete an RBD image (undoing a create); BlockStoreError if it cannot."""
    store = RbdStore(spec)          # takes the lock: refuses an image in use
    store.created = True
    store.abandon()


def _remove_snapshot(img: librbd.Image, name: str) -> None:
    try:
        img.snap_remove(name)
    except RbdError as e:
        if e.errno != errno.ENOENT:     # gone meanwhile: what was asked
            raise


class _Pending:
    """One aio in flight: who waits, the buffer librbd reads or fills, and
    for a direct read (start_readinto) what its caller asked for."""

    __slots__ = ("fut", "what", "offset", "keep", "settled", "mapper")

    def __init__(self, fut: asyncio.Future[None], what: str, offset: int | None,
                 keep: object, settled: Callable[[], None] | None = None,
                 mapper: Callable[[BlockStoreError], Exception] | None = None) -> None:
        self.fut = fut
        self.what = what
        self.offset = offset
        self.keep = keep
        self.settled = settled
        self.mapper = mapper

    def fail(self, e: BlockStoreError) -> None:
        self.fut.set_exception(e if self.mapper is None else self.mapper(e))


class RbdStore(BlockStore):
    """One RBD image, with its own cluster connection (fencing one image's
    client leaves the other volumes' clients alone)."""

    kind = "rbd"
    #: 256 MiB restored from an RBD clone (1 MiB copies, file source), vs a
    #: plain sequential copy: 0.85 at depth 2, 0.91 at 4, 0.97 at 8 (medians
    #: of 8 interleaved rounds, load ~5)
    copy_depth = 8

    def __init__(self, spec: RbdSpec, size: int | None = None, *, create: bool = False,
                 stale_owner: str | None = None) -> None:
        """``stale_owner``: the lock owner this daemon's previous run
        recorded (it died holding the lock: kill -9, power cut); its lock is
        broken at once instead of waiting out its watch (30 s). Any other
        owner is a live client and the open is refused."""
        if not librbd.available:
            raise BlockStoreError("RBD volumes need librbd and librados "
                                  "(bash .ci/install --rbd)")
        self.spec = spec
        self.name = f"rbd:{spec.image_name}"
        self.created = False
        self.fenced: str | None = None
        #: this client's lock owner id, once the lock is held (to record)
        self.owner: str | None = None
        #: called on the loop, once, with the reason, when the store is fenced
        self.on_fenced: Callable[[str], None] | None = None
        self._cluster: librbd.Cluster | None = None
        self._image: librbd.Image | None = None
        self._pending: dict[int, _Pending] = {}
        self._tokens = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None   # the one watching the eventfd
        self._submitter: Submitter | None = None
        # held by a blocking management call (snapshot, diff) in its thread:
        # the close waits for it (a fracture stops waiting for a snapshot
        # after instants.MARK_TIMEOUT_S, librbd goes on making it)
        self._managing = threading.Lock()
        try:
            self._open(size, create, stale_owner)
        except BaseException:
            self.abandon()
            raise

    def _open(self, size: int | None, create: bool, stale_owner: str | None) -> None:
        spec = self.spec
        try:
            self._cluster = c = librbd.Cluster(spec.conf, spec.client_id)
        except RbdError as e:
            raise BlockStoreError(f"{self.name}: {e}") from e
        c.conf_set("rbd_cache", "false")
        c.conf_set("rbd_skip_partial_discard", "false")
        c.conf_set("rbd_non_blocking_aio", "false")    # dispatch on our submitter thread
        # One librados completion thread, not two: each completion only
        # queues a pointer for the one loop that answers it (the C
        # submitter's callback, or the native lane's), so a second thread
        # only added futex wake-ups and contention on that queue's lock.
        # tests.bench.rbd's 4 KiB reads through iSCSI, QD32, two daemons on
        # one image alternating with fio (5 rounds, load ~2): 18.8-26.5k
        # IOPS with one thread vs 18.1-23.8k with two, better in each
        # round (+3% to +11%); 0.713 vs 0.665 of fio's rbd engine.
        c.conf_set("librados_thread_count", "1")
        # rbd_disable_zero_copy_writes stays true (librbd copies each write),
        # although the copy is what keeps rbd_lu_1m_write_ratio under 0.8:
        # tests.bench.rbd, interleaved runs, 0.73-0.75 copying vs 0.84-0.85
        # zero-copy (the copy into fresh memory and its page faults are 70%
        # of the submitter thread's CPU). Without the copy librbd completes
        # a write only once it dropped the caller's buffer, and librbd
        # 16.2.15 never drops it (measured) for a write started after this
        # client was blocklisted, nor for one in flight when an OSD dies:
        # those writes never complete, so fencing and an OSD restart hang
        # the host's commands, and rbd_close waits forever. Working around
        # it was tried and dropped: failing stuck writes from a timer while
        # their buffers stay pinned needs a blocklist probe, and both
        # probes tried (rbd_is_exclusive_lock_owner, a rados_stat) were seen
        # hanging past the OSD restart too; closing meant leaking the image.
        c.conf_set("client_mount_timeout", str(CONNECT_TIMEOUT_S))
        for key, default in (("rados_osd_op_timeout", OSD_OP_TIMEOUT_S),
                             ("rados_mon_op_timeout", MON_OP_TIMEOUT_S)):
            if float(c.conf_get(key) or 0) == 0:     # 0: wait forever; a ceph.conf value wins
                c.conf_set(key, str(default))
        try:
            c.connect()
        except RbdError as e:
            raise BlockStoreError(f"{self.name}: cannot connect to the cluster of {spec.conf} "
                                  f"as client.{spec.client_id}: {e}") from e
        try:
            c.open_pool(spec.pool)
        except RbdError as e:
            if e.errno == errno.ENOENT:
                raise BlockStoreError(f"{self.name}: no pool {spec.pool}") from None
            raise BlockStoreError(f"{self.name}: cannot open pool {spec.pool}: {e}") from e
        if create and size is not None:
            try:
                c.create_image(spec.image, size, FEATURES)
                self.created = True
            except RbdError as e:
                if e.errno != errno.EEXIST:
                    raise BlockStoreError(f"{self.name}: cannot create: {e}") from e
        try:
            self._image = img = librbd.Image(c, spec.image)
        except RbdError as e:
            if e.errno == errno.ENOENT:
                hint = ": give a size to create it" if create else ""
                raise ImageMissingError(f"{self.name} does not exist{hint}") from None
            raise BlockStoreError(f"{self.name}: cannot open: {e}") from e
        try:
            self._size = img.size()
            features = img.features()
        except RbdError as e:
            raise BlockStoreError(f"{self.name}: {e}") from e
        if size is not None and size != self._size:
            raise BlockStoreError(f"{self.name}: image has {self._size} bytes, expected {size}")
        if not features & librbd.FEATURE_EXCLUSIVE_LOCK:
            raise BlockStoreError(f"{self.name} has no exclusive-lock feature, without which "
                                  "another client could write it unfenced: "
                                  f"rbd feature enable {spec.image_name} exclusive-lock")
        self._fast_diff = bool(features & librbd.FEATURE_FAST_DIFF)
        try:
            self._submitter = submitter(img, f"lr-rbd-{spec.image}")
        except RbdError as e:
            raise BlockStoreError(f"{self.name}: {e}") from e
        try:
            if stale_owner is not None and stale_owner in img.lock_owners():
                log.warning("%s: breaking the lock this daemon's previous run held (%s)",
                            self.name, stale_owner)
                img.lock_break(stale_owner)
            img.lock_acquire()
            self.owner = img.lock_owners()[0]
        except (RbdError, IndexError) as e:
            owners = ""
            try:
                owners = ", ".join(img.lock_owners())
            except RbdError:
                pass
            raise BlockStoreError(f"{self.name} is in use: its exclusive lock is held by "
                                  f"{owners or 'another client'} ({e})") from e

    # -- the BlockStore interface ------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def lost(self) -> str | None:
        return self.fenced

    def _fence(self, why: str) -> None:
        if self.fenced is not None:
            return
        self.fenced = why
        # first, before anything else runs: the submitter starts nothing
        # more, and a native lane's reads completing from now on are not
        # answered by the lane (it asks the submitter at each completion)
        if self._submitter is not None:
            self._submitter.fence()
        log.error("%s fenced: %s; no further I/O on it until it is relinked", self.name, why)
        if self.on_fenced is not None:
            self.on_fenced(why)

    def lane_submitter(self) -> object | None:
        """The submitter a native iSCSI lane (target/iscsi/lane.py) queues
        its reads on through the C API (rbd_submit.NATIVE_API), obeying the
        same fence; None when there is none: fenced, closed, or the ctypes
        submitter (no C API)."""
        sub = self._submitter
        if self.fenced is not None or sub is None or NativeSubmitter is None \
                or not isinstance(sub, NativeSubmitter):
            return None
        return sub

    def _error(self, what: str, offset: int | None, err: int) -> BlockStoreError:
        if err in _FENCED:
            self._fence(_FENCED[err])
        if self.fenced is not None:
            return StoreFencedError(f"{self.name}: {what} refused: {self.fenced}", offset)
        if err == errno.ETIMEDOUT:
            return BlockStoreError(f"{self.name}: {what} timed out: the cluster does not "
                                   "answer", offset)
        return BlockStoreError(f"{self.name}: {what} failed: {errno.errorcode.get(err, err)}",
                               offset)

    # -- aio on the loop ---------------------------------------------------------------
    def _watch(self) -> asyncio.AbstractEventLoop:
        """The running loop, watching the image's completions. The loop
        last bound, if running, is this one (a store serves one loop at a
        time): asyncio.get_running_loop() costs a getpid() system call per
        I/O, which is only paid when the loop changed."""
        loop = self._loop
        if loop is not None and loop.is_running():
            return loop
        loop = asyncio.get_running_loop()
        assert self._image is not None
        self._unwatch()
        loop.add_reader(self._image.eventfd, self._complete)
        self._loop = loop
        return loop

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and self._image is not None:
            loop.remove_reader(self._image.eventfd)

    def _complete(self) -> None:
        """Every completion (or refused start) queued since the last
        wake-up settles its future."""
        if self._submitter is not None:
            for token, rc in self._submitter.poll():
                self._settle(token, rc)

    def _settle(self, token: int, rc: int) -> None:
        p = self._pending.pop(token, None)
        if p is None:
            return
        if p.settled is not None:
            p.settled()
        if p.fut.done() or p.fut.get_loop().is_closed():
            return
        if rc < 0:
            p.fail(self._error(p.what, p.offset, -rc))
        elif self.fenced is not None:        # nothing is acknowledged once fenced
            p.fail(self._error(p.what, p.offset, 0))
        else:
            p.fut.set_result(None)

    def start_readinto(self, offset: int, buf: memoryview, settled: Callable[[], None],
                       error: Callable[[BlockStoreError], Exception]
                       ) -> asyncio.Future[None] | None:
        """A host read's direct route: into the command's own buffer, its
        future settled by the completion poll. Cancelled, the future ends at
        once, but ``buf`` stays pinned (_Pending.keep) and ``settled`` waits
        until librbd let go of it. Instead of the coroutine path (a
        coroutine per layer, a bytearray, a copy into the Data-In buffer):
        with the C submitter, the loop's CPU per 4 KiB read at QD32 through
        iSCSI went 41.5-42.0 -> 32.3-35.7 us (tests.bench.rbd_profile, two
        runs each, load 2-2.5)."""
        n = len(buf)
        if (self.fenced is not None or self._submitter is None or not n or offset < 0
                or offset + n > self._size or buf.readonly):
            return None                        # the coroutine path reports it
        addr, keep = librbd.buffer_address(buf, True)
        loop = self._watch()
        token = next(self._tokens)
        fut: asyncio.Future[None] = loop.create_future()
        self._pending[token] = _Pending(fut, "read", offset, keep, settled, error)
        self._submitter.put(READ, offset, n, addr, token)
        return fut

    async def _aio(self, what: str, op: int, offset: int, length: int,
                   buf: object = None) -> None:
        """Queue one aio call and wait for its completion. Cancelled, it
        still waits: librbd owns the buffer until then."""
        if self.fenced is not None or self._submitter is None:
            raise StoreFencedError(f"{self.name}: {what} refused: {self.fenced or 'closed'}",
                                   offset)
        addr, keep = (0, None) if buf is None else librbd.buffer_address(buf, op == READ)
        loop = self._watch()
        token = next(self._tokens)
        fut: asyncio.Future[None] = loop.create_future()
        pending = self._pending[token] = _Pending(fut, what, offset, keep)
        self._submitter.put(op, offset, length, addr, token)
        try:
            await fut
        except asyncio.CancelledError:
            # librbd owns the buffer until the call completes: wait for that
            while token in self._pending:
                pending.fut = loop.create_future()
                try:
                    await pending.fut
                except asyncio.CancelledError:
                    continue
                except BlockStoreError:
                    break
            raise

    async def readinto(self, offset: int, buf: memoryview) -> None:
        self.check_range(offset, len(buf))
        if len(buf):
            await self._aio("read", READ, offset, len(buf), buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_range(offset, len(data))
        if len(data):
            await self._aio("write", WRITE, offset, len(data), data)

    async def flush(self) -> None:
        await self._aio("flush", FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        if length:
            await self._aio("discard", DISCARD, offset, length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """From the object map (fast-diff): a local lookup, off the loop;
        images without it report everything mapped."""
        img = self._image
        if not self._fast_diff or self.fenced is not None or img is None:
            return [(offset, length, True)]
        try:
            mapped = await asyncio.get_running_loop().run_in_executor(
                None, img.mapped, offset, length)
        except RbdError:
            return [(offset, length, True)]
        runs: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        for a, n in sorted(mapped):
            a, b = max(a, pos), min(a + n, end)
            if b <= a:
                continue
            if a > pos:
                runs.append((pos, a - pos, False))
            runs.append((a, b - a, True))
            pos = b
        if pos < end:
            runs.append((pos, end - pos, False))
        return runs

    # -- instants: RBD snapshots, token "NAME@ID" -------------------------------------
    # The id makes the token name one snapshot for good: a snapshot of the
    # same name made later (by anyone) is not the instant.
    async def _manage(self, what: str, call: Callable[..., T], *args: object) -> T:
        """A blocking librbd call, off the loop; its errors (fencing too)
        are judged here, on the loop."""
        img = self._image
        if self.fenced is not None or img is None:
            raise StoreFencedError(f"{self.name}: {what} refused: {self.fenced or 'closed'}")
        def locked() -> T:
            with self._managing:
                return call(img, *args)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, locked)
        except RbdError as e:
            raise self._error(what, None, e.errno) from None

    async def mark_instant(self, name: str) -> str | None:
        snap_id = await self._manage(f"snapshot {name}", librbd.Image.snap_create, name)
        return f"{name}@{snap_id}"

    async def changed_since(self, instant: str,
                            ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        name = await self._snapshot(instant)
        if name is None:
            raise BlockStoreError(f"{self.name}: snapshot {instant} is gone")
        out: list[tuple[int, int]] = []
        for off, n in ranges:
            out += await self._manage(f"diff since {name}", librbd.Image.changed_since, name,
                                      off, n)
        return out

    async def drop_instant(self, instant: str) -> None:
        name = await self._snapshot(instant)
        if name is None:
            return
        await self._manage(f"remove snapshot {name}", _remove_snapshot, name)

    async def instants(self, prefix: str) -> list[str]:
        snaps = await self._manage("list snapshots", librbd.Image.snaps)
        return [f"{n}@{i}" for n, i in snaps if n.startswith(prefix)]

    async def _snapshot(self, instant: str) -> str | None:
        """The name of the snapshot ``instant`` names, if it still exists."""
        name, _, ident = instant.rpartition("@")
        snaps = await self._manage("list snapshots", librbd.Image.snaps)
        return name if (name, ident) in {(n, str(i)) for n, i in snaps} else None

    def grow(self, size: int) -> None:
        if size < self._size:
            raise BlockStoreError(f"{self.name}: cannot shrink from {self._size} to {size} bytes")
        try:
            assert self._image is not None
            self._image.resize(size)
        except RbdError as e:
            raise BlockStoreError(f"{self.name}: cannot grow to {size} bytes: {e}") from e
        self._size = size

    def abandon(self) -> None:
        """Close; a failed create removes the image it made."""
        created, self.created = self.created, False
        self._close_image()
        if created and self._cluster is not None and self._cluster.ioctx:
            try:
                self._cluster.remove_image(self.spec.image)
            except RbdError as e:
                log.error("%s: cannot remove the image of a failed create: %s", self.name, e)
        self._disconnect()

    def close(self) -> None:
        self._close_image()
        self._disconnect()

    def _close_image(self) -> None:
        if self._image is None:
            return
        self._unwatch()
        img, self._image = self._image, None
        sub, self._submitter = self._submitter, None
        if sub is not None:
            sub.stop()              # what was queued is started first
            # aio in flight: wait for it here, so its completions are
            # released and its waiters get the real outcome (rbd_close waits
            # for it too, but leaves the completions queued for a poll that
            # never comes)
            for token, rc in drain(sub, img.eventfd, DRAIN_TIMEOUT_S):
                self._settle(token, rc)
            if sub.taken < sub.started:
                log.warning("%s: closed with %d I/Os still in flight after %s s", self.name,
                            sub.started - sub.taken, DRAIN_TIMEOUT_S)
        if self.fenced is None:
            try:
                img.lock_release()
            except RbdError:
                pass        # not the owner any more: nothing to release
        managed = self._managing.acquire(timeout=DRAIN_TIMEOUT_S)
        if not managed:
            log.warning("%s: closed with a snapshot call still running after %s s", self.name,
                        DRAIN_TIMEOUT_S)
        try:
            img.close()     # after the aio in flight completed
        except RbdError as e:
            log.warning("%s: close: %s", self.name, e)
        finally:
            if managed:
                self._managing.release()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.settled is not None:
                p.settled()
            if not p.fut.done() and not p.fut.get_loop().is_closed():
                p.fail(StoreFencedError(f"{self.name}: {p.what} refused: closed", p.offset))

    def _disconnect(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
