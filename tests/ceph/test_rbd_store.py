"""RbdStore against a real cluster: the BlockStore contract, adopt/create
rules, the exclusive lock, and fencing."""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import select
import time

import pytest
import rbd

from restore_core.blockstore import BlockStoreError
from restore_core.lunio import NotReadyError
from restore_core.store_errors import host_error
from restore_core.stores import librbd, open_store, rbd_submit
from restore_core.stores.librbd import buffer_address
from restore_core.stores.rbd import FEATURES, RbdStore
from tests.ceph.util import create_image, read_image, take_over

MiB = 1 << 20


@pytest.fixture(autouse=True, params=["native", "ctypes"])
def submitter_kind(request, monkeypatch) -> str:
    """Every store test runs with both submitters: the C extension (which
    .ci/install builds: its absence fails here) and the ctypes fallback."""
    if request.param == "native":
        assert rbd_submit.NativeSubmitter is not None, "restore_core.stores._rbdaio is not built"
    else:
        monkeypatch.setattr(rbd_submit, "NativeSubmitter", None)
    return request.param


def test_create_write_read_discard_allocation(ceph):
    spec = ceph.spec()
    s = open_store(spec, 16 * MiB, create=True)
    assert isinstance(s, RbdStore) and s.size == 16 * MiB and s.kind == "rbd" and s.created

    async def go():
        await s.write(4096, b"\xab" * 8192)
        await s.write(5 * MiB, memoryview(b"\xcd" * MiB))
        await s.flush()
        assert bytes(await s.read(4096, 8192)) == b"\xab" * 8192
        assert bytes(await s.read(0, 4096)) == bytes(4096)
        # many in flight at once: completions come back on the loop
        await asyncio.gather(*(s.write(8 * MiB + i * 4096, bytes([i]) * 4096) for i in range(64)))
        got = await asyncio.gather(*(s.read(8 * MiB + i * 4096, 4096) for i in range(64)))
        assert [bytes(g) for g in got] == [bytes([i]) * 4096 for i in range(64)]
        await s.discard(4096 + 512, 4096)           # partial: must read back zeros
        d = bytes(await s.read(4096, 8192))
        assert d == b"\xab" * 512 + bytes(4096) + b"\xab" * 3584
        runs = await s.allocation(0, 16 * MiB)
        assert sum(n for _, n, _ in runs) == 16 * MiB
        mapped = [(o, n) for o, n, m in runs if m]
        assert any(o <= 5 * MiB < o + n for o, n in mapped)
        assert not any(o <= 12 * MiB < o + n for o, n in mapped)   # never written
        with pytest.raises(BlockStoreError):
            await s.read(16 * MiB - 512, 1024)
    asyncio.run(go())
    s.close()
    assert read_image(spec, 5 * MiB, 4096) == b"\xcd" * 4096     # another client sees it


def test_adopt_keeps_size_and_missing_needs_a_size(ceph):
    spec = ceph.spec()
    with pytest.raises(BlockStoreError, match="does not exist: give a size"):
        open_store(spec, None, create=True)
    create_image(spec, 4 * MiB, FEATURES)
    with pytest.raises(BlockStoreError, match="has 4194304 bytes, expected 8388608"):
        open_store(spec, 8 * MiB, create=True)
    s = open_store(spec, None, create=True)          # adopted at its own size
    assert s.size == 4 * MiB and not s.created
    s.close()
    assert read_image(spec, 0, 16) == bytes(16)


def test_image_without_exclusive_lock_is_refused(ceph):
    spec = ceph.spec()
    create_image(spec, 4 * MiB, rbd.RBD_FEATURE_LAYERING)
    with pytest.raises(BlockStoreError, match="no exclusive-lock feature"):
        open_store(spec)


def test_a_second_open_is_refused_while_the_first_holds_the_lock(ceph):
    spec = ceph.spec()
    s = open_store(spec, 4 * MiB, create=True)
    with pytest.raises(BlockStoreError, match="in use: its exclusive lock is held by"):
        open_store(spec)
    s.close()
    open_store(spec).close()                         # released on close


def test_no_pool_and_failed_create_leave_nothing(ceph):
    with pytest.raises(BlockStoreError, match="no pool nosuchpool"):
        open_store(ceph.spec().__class__("nosuchpool", "x", ceph.conf), MiB, create=True)
    spec = ceph.spec()
    s = open_store(spec, 4 * MiB, create=True)
    s.abandon()                                      # a failed volume create
    with pytest.raises(BlockStoreError, match="does not exist"):
        open_store(spec)


def test_takeover_fences_the_store_no_write_acknowledged_after(ceph, caplog):
    spec = ceph.spec()
    s = open_store(spec, 4 * MiB, create=True)
    fenced: list[str] = []
    s.on_fenced = fenced.append

    async def go():
        await s.write(0, b"A" * 4096)
        await s.flush()
        img, close = take_over(spec)
        try:
            acked = []
            for i in range(1, 20):               # host writes racing the takeover
                try:
                    await s.write(i * 4096, b"B" * 4096)
                    acked.append(i)
                except BlockStoreError as e:
                    assert "blocklisted" in str(e) or "lock" in str(e)
            assert acked == []                   # the first one after it already fails
            assert len(fenced) == 1 and "blocklisted" in fenced[0]
            assert s.lost() == fenced[0]
            with pytest.raises(BlockStoreError, match="refused"):
                await s.flush()
            assert img.read(0, 4096) == b"A" * 4096
            assert img.read(4096, 19 * 4096) == bytes(19 * 4096)   # nothing of B landed
        finally:
            close()
    with caplog.at_level(logging.ERROR):
        asyncio.run(go())
    assert sum("fenced" in r.getMessage() for r in caplog.records) == 1
    s.close()


def test_a_fence_stops_the_submitter_and_the_lanes_route(ceph, submitter_kind):
    """The store's fence reaches its submitter before anything else runs:
    nothing more is queued there (Python's requests or a native lane's,
    through the C API), and the lane is offered no route to the store."""
    spec = ceph.spec()
    s = open_store(spec, 4 * MiB, create=True)
    try:
        sub = s._submitter
        assert (s.lane_submitter() is sub) == (submitter_kind == "native")
        s._fence("test: the lock was lost")
        assert s.lane_submitter() is None
        started = sub.started
        with pytest.raises(RuntimeError):
            sub.put(rbd_submit.READ, 0, 4096, buffer_address(bytearray(4096), True)[0], 1)
        assert sub.started == started
        if submitter_kind == "native":
            assert sub.fenced
    finally:
        s.close()


def test_a_cancelled_io_ends_only_after_librbd_let_go_of_its_buffer(ceph):
    """Reads land straight in the caller's buffer: a cancelled read must not
    hand the buffer back (to a pool, to the next command) while librbd can
    still fill it."""
    spec = ceph.spec()
    s = open_store(spec, 32 * MiB, create=True)

    async def go():
        for _ in range(5):
            buf = bytearray(32 * MiB)
            t = asyncio.ensure_future(s.readinto(0, memoryview(buf)))
            await asyncio.sleep(0)                   # queued for librbd
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            buf[:] = b"\xff" * len(buf)              # the caller reuses it at once
            await asyncio.sleep(0.2)
            assert buf == b"\xff" * len(buf)         # nothing landed in it after
    asyncio.run(go())
    s.close()


def test_close_with_io_in_flight_releases_every_completion(ceph):
    """librbd queues each completion for our poll; closing an image with I/O
    in flight must still take (and release) every one, and its waiters get
    the real outcome, not a hang or a lost completion."""
    spec = ceph.spec()
    s = open_store(spec, 32 * MiB, create=True)

    async def go():
        await s.write(0, b"\x5a" * MiB)
        sub = s._submitter
        bufs = [bytearray(MiB) for _ in range(32)]
        reads = [asyncio.ensure_future(s.readinto(0, memoryview(b))) for b in bufs]
        writes = [asyncio.ensure_future(s.write((i + 1) * MiB, b"\xa5" * MiB)) for i in range(16)]
        await asyncio.sleep(0)                       # all queued for librbd
        s.close()                                    # while they are in flight
        assert sub.started == 49 and sub.taken == sub.started
        outcomes = await asyncio.gather(*reads, *writes, return_exceptions=True)
        assert outcomes == [None] * 48
        assert all(b == b"\x5a" * MiB for b in bufs)
    asyncio.run(go())
    assert read_image(spec, 16 * MiB, 4096) == b"\xa5" * 4096


def test_buffer_address_points_at_the_bytes_and_pins_the_buffer():
    """librbd reads into / writes from the address while the aio is in
    flight: it must be the buffer's own first byte (a slice's too), and what
    is kept must keep a bytearray from being freed or moved (resized)."""
    data = bytearray(b"0123456789" * 100)
    view = memoryview(data)[10:20]
    addr, keep = buffer_address(view, True)
    ctypes.memmove(addr, b"abcdefghij", 10)                  # as librbd's read would
    assert data[10:20] == b"abcdefghij" and data[:10] == b"0123456789"
    del view
    with pytest.raises(BufferError):
        data.extend(b"x")                                    # pinned while kept
    del keep
    data.extend(b"x")
    frozen = b"written as is"
    addr, keep = buffer_address(frozen, False)
    assert keep is frozen and ctypes.string_at(addr, len(frozen)) == frozen
    ro = memoryview(b"read-only view")
    addr, keep = buffer_address(ro, False)                   # a write: copied
    assert ctypes.string_at(addr, len(ro)) == b"read-only view"
    with pytest.raises(TypeError):
        buffer_address(ro, True)                             # a read needs a writable buffer


def test_a_call_librbd_refuses_at_once_fails_and_the_store_goes_on(ceph, monkeypatch):
    """A call refused at start never reaches poll: the submitter hands the
    refusal to the loop, which fails the call (not hang it), and the store
    goes on serving."""
    spec = ceph.spec()
    api = librbd._api
    real_read = api.aio_read2
    refuse = [True]

    # a C function (the C submitter takes librbd's by address) that refuses
    # while asked to, else is librbd's
    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    def read2(*args):
        return -errno.EIO if refuse[0] else real_read(*args)
    monkeypatch.setattr(api, "aio_read2", read2)
    s = open_store(spec, 4 * MiB, create=True)

    async def go():
        await s.write(0, b"\x11" * 4096)
        t = asyncio.ensure_future(s.readinto(0, memoryview(bytearray(4096))))
        await asyncio.wait([t], timeout=10)
        if not t.done():
            s.close()           # ends the wait (a cancelled read would wait on)
            pytest.fail("a call librbd refused was never reported")
        with pytest.raises(BlockStoreError, match="read failed: EIO"):
            t.result()
        assert s._pending == {}
        refuse[0] = False
        buf = bytearray(4096)
        await s.readinto(0, memoryview(buf))
        assert buf == b"\x11" * 4096 and s.lost() is None
    asyncio.run(go())
    s.close()


def test_a_direct_read_lands_in_the_buffer_and_settles_only_when_librbd_let_go(ceph):
    """start_readinto (a host read's direct route): straight into the
    caller's buffer; cancelled, ``settled`` (the volume's gate) still waits
    for librbd; once fenced, the mapped error (NOT READY), and none started."""
    spec = ceph.spec()
    s = open_store(spec, 32 * MiB, create=True)
    settled: list[int] = []

    async def go():
        await s.write(MiB, b"\x77" * 4096)
        buf = bytearray(4096)
        fut = s.start_readinto(MiB, memoryview(buf), lambda: settled.append(1), host_error)
        assert asyncio.isfuture(fut)
        assert await fut is None and buf == b"\x77" * 4096 and settled == [1]
        for _ in range(3):
            big = bytearray(32 * MiB)
            fut = s.start_readinto(0, memoryview(big), lambda: settled.append(2), host_error)
            await asyncio.sleep(0)
            fut.cancel()
            assert settled.count(2) == 0             # librbd still owns the buffer
            for _ in range(200):
                if settled.count(2):
                    break
                await asyncio.sleep(0.05)
            assert settled.count(2) == 1
            settled.remove(2)
            big[:] = b"\xff" * len(big)
            await asyncio.sleep(0.1)
            assert big == b"\xff" * len(big)        # nothing landed after it settled
        img, close = take_over(spec)
        try:
            fut = s.start_readinto(0, memoryview(bytearray(4096)), lambda: settled.append(3),
                                   host_error)
            with pytest.raises(NotReadyError, match="blocklisted"):
                await fut
            assert settled == [1, 3]
            assert s.start_readinto(0, memoryview(bytearray(4096)), settled.clear,
                                    host_error) is None      # fenced: the coroutine reports it
        finally:
            close()
    asyncio.run(go())
    s.close()


def test_completions_bump_the_eventfd_once_until_the_loop_polls(ceph, submitter_kind):
    """The C submitter's completions come back through its callback, which
    wakes the loop for the first completion since the last poll only;
    librbd's own notification (the ctypes submitter's) bumps the eventfd
    once per completion. Either way poll takes every one."""
    spec = ceph.spec()
    s = open_store(spec, 4 * MiB, create=True)
    img, sub = s._image, s._submitter
    bufs = [bytearray(4096) for _ in range(16)]
    kept = [buffer_address(memoryview(b), True) for b in bufs]
    for i, (addr, _) in enumerate(kept):
        sub.put(rbd_submit.READ, i * 4096, 4096, addr, 1000 + i)
    for _ in range(1000):
        if sub.started == 16:
            break
        time.sleep(0.01)
    assert select.select([img.eventfd], [], [], 10)[0]
    time.sleep(0.3)                                  # the rest complete meanwhile
    bumps = os.eventfd_read(img.eventfd)
    got = rbd_submit.drain(sub, img.eventfd, 10)
    assert sorted(got) == [(1000 + i, 4096) for i in range(16)]
    assert bumps == (1 if submitter_kind == "native" else 16)
    s.close()


def test_completions_that_cannot_be_set_up_fail_the_open_with_a_store_error(ceph, monkeypatch,
                                                                            submitter_kind):
    """librbd refusing the ctypes submitter's completion notification is a
    BlockStoreError naming the image (a CLI message), and leaves nothing."""
    if submitter_kind == "native":
        pytest.skip("the C submitter takes completions by callback, not by notification")
    spec = ceph.spec()
    monkeypatch.setattr(librbd._api, "set_image_notification", lambda *a: -errno.EIO)
    with pytest.raises(BlockStoreError, match=rf"rbd:{spec.image_name}: .*notification"):
        open_store(spec, 4 * MiB, create=True)
    monkeypatch.undo()
    with pytest.raises(BlockStoreError, match="does not exist"):
        open_store(spec)                            # the failed create removed its image
