"""One host cannot lock the others out: per-source connection limits and a
short login timeout for connections that never log in (issue 10 item 10)."""
from __future__ import annotations

import asyncio
import logging
import socket

from target.iscsi import IscsiServer
from target.iscsi.admission import SourceLimits, source_of

from .initiator import Initiator
from .test_live import IQN, addr, run, serving

FLOOD_SOURCE = "127.0.0.2"


async def open_idle(host: str, port: int, source: str) -> socket.socket | None:
    """A TCP connection from ``source`` that never sends a byte (None: refused)."""
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (host, port)), 5)
    except OSError:
        s.close()
        return None
    return s


async def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True if the target closed (or reset) ``s`` within ``timeout`` seconds."""
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 1), timeout)
        return data == b""
    except (ConnectionError, OSError):
        return True
    except asyncio.TimeoutError:
        return False


def test_idle_flood_from_one_source_does_not_lock_out_another(caplog):
    """The issue's 2,060 idle sockets against the cap of 2,048, scaled down:
    a global cap of 96 and a flood of 120 from 127.0.0.2."""
    caplog.set_level(logging.INFO, "target.iscsi")

    async def main():
        async with serving(max_connections=96, max_logins_per_source=16,
                           login_timeout=60) as (srv, _):
            host, port = addr(srv)
            flood = [await open_idle(host, port, FLOOD_SOURCE) for _ in range(120)]
            await asyncio.sleep(0.2)
            i = Initiator(host, port, name="iqn.2025-01.org.test:legit")
            await i.login(IQN)                     # from 127.0.0.1
            assert (await i.nop(b"ping")).data == b"ping"
            await i.close()
            held = len([c for c in srv.connections if c.peer.startswith(FLOOD_SOURCE + ":")])
            assert held == 16
            for s in flood:
                if s is not None:
                    s.close()
    run(main())
    refusals = [r for r in caplog.records if "refusing connection" in r.getMessage()]
    assert 1 <= len(refusals) <= 3                   # one line per burst, not one per socket


def test_logged_in_connections_do_not_count_against_the_login_limit():
    async def main():
        async with serving(max_logins_per_source=2, max_connections_per_source=8) as (srv, _):
            inits = []
            for n in range(4):                      # more sessions than pending logins allowed
                i = Initiator(*addr(srv), name=f"iqn.2025-01.org.test:h{n}")
                await i.login(IQN)
                inits.append(i)
            assert srv.stats()["sessions"] == 4
            for i in inits:
                await i.close()
    run(main())


def test_idle_connection_is_closed_after_the_login_timeout():
    assert IscsiServer().login_timeout <= 15         # short by default

    async def main():
        async with serving(login_timeout=0.5) as (srv, _):
            host, port = addr(srv)
            s = await open_idle(host, port, FLOOD_SOURCE)
            t0 = asyncio.get_running_loop().time()
            assert await closed_by_peer(s, 5)
            assert 0.4 <= asyncio.get_running_loop().time() - t0 < 3
            s.close()
            for _ in range(50):
                if not srv.connections:
                    break
                await asyncio.sleep(0.02)
            assert not srv.connections and not srv.source_limits.open
    run(main())


def test_source_limits_count_and_release():
    lim = SourceLimits(per_source=3, logins_per_source=2)
    assert lim.admit("a") is None and lim.admit("a") is None
    assert "logging in" in lim.admit("a")
    assert lim.admit("b") is None                   # another source is not affected
    lim.logged_in("a")
    assert lim.admit("a") is None
    assert "3 connections open" in lim.admit("a")
    lim.release("a", still_logging_in=True)
    lim.release("a", still_logging_in=True)
    lim.release("a", still_logging_in=False)
    lim.release("b", still_logging_in=True)
    assert lim.open == {} and lim.logging_in == {}


def test_source_of_groups_ipv6_by_64():
    assert source_of("127.0.0.2") == "127.0.0.2"
    assert source_of("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff") == "2001:db8::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"
