"""Pooled write buffers: reused only when nothing uses them any more, and a
write's immediate data received in place into the buffer it then keeps."""
from __future__ import annotations

import asyncio
import os

from target.iscsi import pdu as P
from target.iscsi.buffers import POOL_MIN, WriteBuffers

from .fake_scsi import FakeScsiTarget, MemLun
from .test_live import logged_in, run, serving

MiB = 1 << 20


def test_a_buffer_comes_back_only_when_no_view_of_it_is_alive():
    pool = WriteBuffers(8 * MiB)
    buf = pool.take(MiB)
    view = memoryview(buf)[100:200]          # e.g. a store's thread still writing from it
    pool.give(buf)
    assert pool.held == 0 and pool.take(MiB) is not buf
    del view
    pool.give(buf)
    assert pool.held == MiB and pool.take(MiB) is buf and pool.reused == 1
    assert len(buf) == MiB                   # the probe left it as it was


def test_take_idle_never_allocates():
    pool = WriteBuffers(8 * MiB)
    assert pool.take_idle(MiB) is None
    buf = pool.take(MiB)
    pool.give(buf)
    assert pool.take_idle(MiB) is buf and pool.take_idle(MiB) is None


def test_the_pool_is_bounded_and_keeps_no_small_or_foreign_buffers():
    pool = WriteBuffers(3 * MiB)
    pool.give(bytearray(POOL_MIN - 1))
    pool.give(bytes(MiB))
    pool.give(bytearray(4 * MiB))            # bigger than the whole pool
    assert pool.held == 0
    for _ in range(4):
        pool.give(bytearray(MiB))
    assert pool.held == 3 * MiB              # the fourth did not fit
    pool.give(bytearray(2 * MiB))            # room made by dropping the other size
    assert pool.held == 2 * MiB and pool.take(MiB) is not None and pool.reused == 0


class _StuckStore(MemLun):
    """Its first write never finishes, and keeps its view of the data as a
    store's thread would while the command is aborted under it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.held: list[memoryview] = []
        self.stuck = asyncio.Event()

    async def write(self, offset: int, data, fua: bool = False) -> None:
        if not self.held:
            self.held.append(data)
            self.stuck.set()
            await asyncio.Event().wait()
        await super().write(offset, data, fua)


def test_an_aborted_write_whose_store_still_uses_its_buffer_lends_it_to_no_other():
    async def main():
        lun = _StuckStore(16 * MiB)
        async with serving(fake=FakeScsiTarget({0: lun})) as (srv, fake):
            i = await logged_in(srv, immediate_data=True, initial_r2t=False, first_burst=256 * 1024,
                                max_burst=256 * 1024, mrdsl=256 * 1024)
            itt = i.itt + 1
            first = asyncio.ensure_future(i.write(0, 0, b"a" * MiB))
            await asyncio.wait_for(lun.stuck.wait(), 10)
            assert await i.tmf(P.TMF_ABORT_TASK, 0, ref_itt=itt) == P.TMF_RSP_COMPLETE
            first.cancel()
            for n in range(3):                    # same size: each would take a pooled buffer
                await i.write(0, 4096 * (n + 1), bytes((n,)) * MiB)
            assert bytes(lun.held[0]) == b"a" * MiB     # never overwritten by a later write
            assert srv.buffers.reused >= 1             # ...while the others did reuse theirs
            await i.close()
    run(main())


def test_immediate_data_is_received_in_place_into_the_writes_buffer():
    async def main():
        async with serving(fake=FakeScsiTarget({0: MemLun(16 * MiB)})) as (srv, fake):
            i = await logged_in(srv, immediate_data=True, initial_r2t=False, first_burst=256 * 1024,
                                max_burst=256 * 1024, mrdsl=256 * 1024,
                                header_digest="CRC32C", data_digest="CRC32C")
            conn = next(iter(srv.connections))
            for n in range(4):
                data = os.urandom(MiB - 512)               # (padding on the last Data-Out)
                await i.write(0, 4096 * n, data)
                assert fake.luns_map[0].data[4096 * n * 512:4096 * n * 512 + len(data)] == data
            # each 256 KiB Data-Out arrived in pieces (MIN_BUFFER per read) and
            # went in place; so did the 256 KiB of immediate data of every
            # command that found the previous one's buffer idle in the pool
            assert conn.direct_pdus >= 4 * 3 + 3
            assert srv.buffers.reused >= 3
            await i.close()
    run(main())
