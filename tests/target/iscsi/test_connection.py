"""Connection internals: gather-write remainder handling, receive buffer,
when answers are written."""
from __future__ import annotations

import asyncio
import os
import struct

from target.iscsi import connection as C
from target.iscsi import pdu as P

from .fake_scsi import FakeScsiTarget, MemLun
from .test_live import logged_in, run, serving


def test_writev_partial_sends(monkeypatch):
    async def main():
        conn = C.IscsiConnection(server=None)
        conn._fd = 99
        bufs = [bytearray(b"h" * 48), memoryview(b"0123456789"), b"pad"]
        for sent, want in [(0, [b"h" * 48, b"0123456789", b"pad"]),
                           (48, [b"0123456789", b"pad"]),
                           (52, [b"456789", b"pad"]),
                           (58, [b"pad"]),
                           (60, [b"d"]),
                           (61, [])]:
            monkeypatch.setattr(C.os, "writev", lambda fd, b, n=sent: n)
            assert [bytes(x) for x in conn._writev(list(bufs), P.wire_len(bufs))] == want
        def blocked(fd, b):
            raise BlockingIOError
        monkeypatch.setattr(C.os, "writev", blocked)
        assert conn._writev(list(bufs), P.wire_len(bufs)) == bufs
    asyncio.run(main())


def test_huge_read_through_partial_writes():
    """16 MiB in one READ: the socket takes it in pieces; the rest goes through
    the transport's queue and must arrive intact and in order."""
    async def main():
        async with serving(fake=FakeScsiTarget({0: MemLun(32 << 20)})) as (srv, fake):
            pattern = os.urandom(1 << 20) * 16
            fake.luns_map[0].data[:16 << 20] = pattern
            i = await logged_in(srv, max_burst=1 << 20)
            got = await asyncio.gather(i.read(0, 0, 32768), i.read(0, 0, 2048))
            assert got[0] == pattern and got[1] == pattern[:1 << 20]
            await i.close()
    run(main(), timeout=120)


def test_answers_of_commands_done_in_the_receive_path_go_out_in_one_write_before_it_returns():
    """A batch of reads that complete while they are parsed is answered with
    one write at the end of that same receive: not a turn of the event loop
    later (one more loop turn, epoll_wait included, per batch)."""
    async def main():
        async with serving() as (srv, fake):
            i = await logged_in(srv)
            conn = next(iter(srv.connections))
            writes: list[list] = []
            conn._fd = -1                                    # through transport.writelines
            conn.transport.writelines = lambda bufs: writes.append(list(bufs))
            batch = bytearray()
            for k in range(8):
                bhs = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_READ | 1, lun=0,
                                  itt=0x100 + k, fields={20: 4096, 24: i.cmdsn + k, 28: 0},
                                  raw={32: struct.pack(">BBIBHB", 0x28, 0, 8 * k, 0, 8, 0)})
                batch += bhs
            dest = conn.get_buffer(len(batch))
            dest[:len(batch)] = batch
            conn.buffer_updated(len(batch))
            assert len(writes) == 1
            heads = [bytes(b) for b in writes[0] if len(b) == P.BHS_LEN]
            assert [h[0] for h in heads] == [P.OP_DATA_IN] * 8 and all(h[1] & P.DATAIN_STATUS for h in heads)
            await i.close()
    run(main())
