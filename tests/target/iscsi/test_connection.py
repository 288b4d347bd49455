"""Connection internals: gather-write remainder handling, receive buffer."""
from __future__ import annotations

import asyncio
import os

from target.iscsi import connection as C

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
            assert [bytes(x) for x in conn._writev(list(bufs))] == want
        def blocked(fd, b):
            raise BlockingIOError
        monkeypatch.setattr(C.os, "writev", blocked)
        assert conn._writev(list(bufs)) == bufs
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
