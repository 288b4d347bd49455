"""The asynchronous direct read (BlockStore.start_readinto, RBD's): a host
read routed straight into the command's buffer, no coroutine, holds the
volume's gate, as the work it replaces would, until the store let go of the
buffer, and fails with the LunIO error the work would have raised."""
import asyncio

import pytest

from restore_core.blockstore import BlockStoreError, MemoryBlockStore, StoreFencedError
from restore_core.lunio import MediumError, NotReadyError
from restore_core.plain_lunio import PlainLunIO

from .util import ES, Rig


class AsyncReadStore(MemoryBlockStore):
    """Reads complete on the loop by themselves (as an RBD image's do), when
    the test says so."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__(size, name)
        self.inflight: list[tuple] = []

    def try_readinto(self, offset, bufs):
        return False                          # no synchronous reads

    def start_readinto(self, offset, buf, settled, error):
        fut = asyncio.get_running_loop().create_future()
        self.inflight.append((offset, buf, settled, error, fut))
        return fut

    def complete(self, fail: BlockStoreError | None = None) -> None:
        for offset, buf, settled, error, fut in self.inflight:
            if fail is None:
                buf[:] = self.current[offset:offset + len(buf)]
            settled()
            if not fut.done():
                if fail is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error(fail))
        self.inflight.clear()


def _rig() -> Rig:
    r = Rig(8)
    src = AsyncReadStore(r.size, "src")
    src.current[:] = src.durable[:] = r.src.current
    r.src = src
    return r


def test_a_direct_read_holds_the_gate_until_the_store_let_go_of_the_buffer():
    async def go():
        r = _rig()
        eng = await r.boot()
        gate = r.sio.vol.gate
        buf = bytearray(4096)
        work = r.sio.route_read(ES, [memoryview(buf)])
        assert asyncio.isfuture(work) and len(r.src.inflight) == 1     # started, no coroutine
        assert gate.inflight == 1

        async def state_change():
            async with gate.closed():
                pass
        change = asyncio.ensure_future(state_change())
        await asyncio.sleep(0.01)
        assert not change.done()              # waits for the read in flight
        r.src.complete()
        assert await work is None and buf == r.src.current[ES:ES + 4096]
        await asyncio.wait_for(change, 1)
        assert gate.inflight == 0

        # cancelled (the command aborted): the gate stays held until the store is done
        work = r.sio.route_read(0, [memoryview(bytearray(512))])
        work.cancel()
        await asyncio.sleep(0)
        assert gate.inflight == 1
        r.src.complete()
        assert gate.inflight == 0
        await eng.close()
    asyncio.run(go())


def test_a_direct_read_fails_with_the_lunio_error_of_the_store_error():
    async def go():
        r = _rig()
        eng = await r.boot()
        for fail, want in ((BlockStoreError("bad sector", 4096), MediumError),
                           (StoreFencedError("another client took it"), NotReadyError)):
            work = r.sio.route_read(0, [memoryview(bytearray(8192))])
            r.src.complete(fail)
            with pytest.raises(want):
                await work
        assert r.sio.vol.gate.inflight == 0
        await eng.close()
    asyncio.run(go())


def test_try_readinto_never_starts_a_direct_read():
    """The synchronous attempt returns False having done nothing: it must
    not leave a read under way into the caller's buffer."""
    async def go():
        r = _rig()
        eng = await r.boot()
        assert not r.sio.try_readinto(0, [memoryview(bytearray(4096))])
        assert r.src.inflight == [] and r.sio.vol.gate.inflight == 0
        await eng.close()
    asyncio.run(go())


def test_plain_lunio_routes_a_read_straight_into_the_buffer():
    async def go():
        src = AsyncReadStore(ES, "plain")
        src.current[:] = b"\x42" * ES
        lun = PlainLunIO(src)
        buf = bytearray(4096)
        work = lun.route_read(0, [memoryview(buf)])
        assert asyncio.isfuture(work)
        src.complete()
        assert await work is None and buf == b"\x42" * 4096
        work = lun.route_read(0, [memoryview(bytearray(4096))])
        src.complete(StoreFencedError("fenced"))
        with pytest.raises(NotReadyError):
            await work
    asyncio.run(go())
