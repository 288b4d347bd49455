"""CHAP brute force is slowed down per initiator name and per source, without
holding up anyone else, and logs a bounded number of short lines (issue 10
item 11)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from target.iscsi import IscsiTargetConfig
from target.iscsi import login as login_mod
from target.iscsi.admission import LoginThrottle
from target.logsafe import RateLimitedLog

from .fake_scsi import FakeScsiTarget, MemLun
from .initiator import TIMEOUT, Initiator, LoginError
from .test_live import IQN, addr, run, serving

CHAP = ("user", "the-secret")
BASE, CAP = 0.1, 1.2


class SourcedInitiator(Initiator):
    """The test initiator, connecting from a chosen loopback address."""

    def __init__(self, *a, source: str = "127.0.0.1", **kw) -> None:
        super().__init__(*a, **kw)
        self.source = source

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, local_addr=(self.source, 0)), TIMEOUT)


async def timed_login(srv, name: str, source: str, secret: str, user: str = CHAP[0]) -> float:
    """Seconds one CHAP login took; raises LoginError if it failed."""
    i = SourcedInitiator(*addr(srv), name=name, source=source)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        await i.login(IQN, chap=(user, secret))
        return loop.time() - t0
    except LoginError as e:
        assert e.status == (2, 1)
        raise LoginError(e.status, {"elapsed": loop.time() - t0}) from None
    finally:
        await i.close()


async def failed_login(srv, name: str, source: str, user: str = CHAP[0]) -> float:
    with pytest.raises(LoginError) as ei:
        await timed_login(srv, name, source, "wrong-guess", user)
    return ei.value.keys["elapsed"]


def chap_serving():
    fake = FakeScsiTarget({0: MemLun(1 << 20)})
    return serving([IscsiTargetConfig(IQN, fake, chap=CHAP)], fake=fake,
                   login_throttle=LoginThrottle(base_delay=BASE, max_delay=CAP))


def test_wrong_secrets_wait_longer_each_time_others_do_not(caplog, monkeypatch):
    monkeypatch.setattr(login_mod, "ratelog", RateLimitedLog(login_mod.log))
    caplog.set_level(logging.INFO, "target.iscsi")
    attacker = "iqn.2025-01.org.test:attacker"

    async def main():
        async with chap_serving() as (srv, _):
            # the first failure carries an 8,000-character CHAP_N
            await failed_login(srv, attacker, "127.0.0.2", user="N" * 8000)
            took = [await failed_login(srv, attacker, "127.0.0.2") for _ in range(5)]
            want = [min(CAP, BASE * 2 ** n) for n in range(1, 6)]
            assert all(t >= w * 0.9 for t, w in zip(took, want)), (took, want)
            # a guess in progress does not hold up another initiator on another source
            guess = asyncio.ensure_future(failed_login(srv, attacker, "127.0.0.2"))
            await asyncio.sleep(0.05)
            await timed_login(srv, "iqn.2025-01.org.test:good", "127.0.0.1", CHAP[1])
            assert not guess.done()                   # logged in while the guess was held back
            assert await guess >= CAP * 0.9
            # someone else's first mistake costs only the base delay
            assert await failed_login(srv, "iqn.2025-01.org.test:typo", "127.0.0.3") < CAP * 0.9
    run(main())
    msgs = [r.getMessage() for r in caplog.records]
    rejected = [m for m in msgs if "rejected" in m]
    assert 1 <= len(rejected) <= 3, rejected          # one line per burst, not one per guess
    assert "unknown CHAP user 'NNNN" in rejected[0] and "(+7936 chars)" in rejected[0]
    assert max(map(len, msgs)) < 600


def test_throttle_doubles_caps_serialises_and_forgets():
    t = [0.0]
    th = LoginThrottle(base_delay=1, max_delay=8, forget=60, clock=lambda: t[0])
    assert [th.failed("iqn.a", "10.0.0.1") for _ in range(3)] == [1, 3, 7]   # queued behind each other
    t[0] += 20                                         # the queue has drained
    assert th.failed("iqn.a", "10.0.0.1") == 8        # 4th failure: 8 (capped)
    assert th.failed("iqn.b", "10.0.0.2") == 1        # other name, other source
    assert th.failed("iqn.c", "10.0.0.1") == 8        # same source as the guesser
    t[0] += 61
    assert th.failed("iqn.a", "10.0.0.1") == 1        # forgotten after a quiet minute
    th.succeeded("iqn.a", "10.0.0.1")
    assert th.failed("iqn.a", "10.0.0.1") == 1


def test_throttle_memory_is_bounded():
    th = LoginThrottle(capacity=100, clock=lambda: 0.0)
    for n in range(1000):
        th.failed(f"iqn.x:{n}", f"10.0.{n // 256}.{n % 256}")
    assert len(th._keys) == 100
