"""Hypothesis fuzz against a live server (running in a background thread):
random bytes and mutated valid PDUs, before and after login. The server
must never log an internal error or leak a task exception, and a
well-behaved session opened at the start keeps working throughout."""
from __future__ import annotations

import asyncio
import logging
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.iscsi import IscsiServer, IscsiTargetConfig
from target.iscsi import pdu as P
from target.iscsi.params import encode_text

from .fake_scsi import FakeScsiTarget, MemLun
from .hostile import LOGIN_KEYS, LOGIN_VALUES, mutate, valid_pdus
from .initiator import Initiator

IQN = "iqn.2025-01.org.test:fuzz"


class _ErrorCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class LiveServer:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeScsiTarget({0: MemLun(1 << 20)})
        self.server = IscsiServer([IscsiTargetConfig(IQN, self.fake)], [("127.0.0.1", 0)],
                                  login_timeout=2.0, nop_interval=30, nop_timeout=30)
        self.call(self.server.start())
        self.addr = self.server.addresses[0]
        self.good = Initiator(*self.addr, name="iqn.2025-01.org.test:good")
        self.call(self.good.login(IQN))

    def call(self, coro, timeout=20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        try:
            self.call(self.good.close())
            self.call(self.server.stop(timeout=3))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(scope="module")
def live():
    catcher = _ErrorCatcher()
    lg = logging.getLogger("target.iscsi")
    lg.addHandler(catcher)
    srv = LiveServer()
    srv.catcher = catcher
    try:
        yield srv
    finally:
        srv.close()
        lg.removeHandler(catcher)


def check_healthy(live: LiveServer, n: int) -> None:
    async def probe():
        data = bytes([n & 0xFF]) * 1024
        await live.good.write(0, 16, data)
        assert await live.good.read(0, 16, 2) == data
        assert (await live.good.nop(b"alive")).data == b"alive"
    live.call(probe())
    assert not live.catcher.records, [r.getMessage() for r in live.catcher.records]
    assert not live.loop_errors, live.loop_errors


async def blast(addr, payload: bytes, *, login: bool, hd: bool = False, dd: bool = False) -> None:
    ini = Initiator(*addr, name="iqn.2025-01.org.test:fuzzer")
    try:
        if login:
            await ini.login(IQN, header_digest="CRC32C" if hd else "None",
                            data_digest="CRC32C" if dd else "None", start_reader=False)
        else:
            await ini.connect()
        ini.send_raw(payload)
        await ini.writer.drain()
        # read whatever comes back for a moment (bounded), then hang up
        try:
            for _ in range(50):
                got = await asyncio.wait_for(ini.reader.read(65536), 0.05)
                if not got:
                    break
        except asyncio.TimeoutError:
            pass
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    finally:
        await ini.close()


VALID = valid_pdus(IQN)

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 47), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2000), st.just(0)),
    st.tuples(st.just("dlen"), st.integers(0, (1 << 24) - 1), st.just(0)),
    st.tuples(st.just("ahs"), st.integers(0, 255), st.just(0)),
)


FUZZ = settings(max_examples=int(os.environ.get("ISCSI_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=False)


@FUZZ
@given(payload=st.binary(min_size=0, max_size=400))
def test_random_bytes_before_login(live, payload):
    live.call(blast(live.addr, payload, login=False))
    check_healthy(live, len(payload))


@FUZZ
@given(payload=st.binary(min_size=1, max_size=400))
def test_random_bytes_after_login(live, payload):
    live.call(blast(live.addr, payload, login=True))
    check_healthy(live, len(payload))


@FUZZ
@given(pdus=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.lists(mutation, max_size=4)),
                     min_size=1, max_size=6),
       login=st.booleans(), hd=st.booleans(), dd=st.booleans())
def test_mutated_pdus(live, pdus, login, hd, dd):
    payload = b"".join(mutate(VALID[i], muts) for i, muts in pdus)
    live.call(blast(live.addr, payload, login=login, hd=hd and login, dd=dd and login))
    check_healthy(live, len(payload))


VALUES = st.one_of(st.sampled_from(LOGIN_VALUES + [IQN]),
                   st.text(max_size=30).filter(lambda v: "\0" not in v))


@FUZZ
@given(steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(), st.booleans(),
                                st.lists(st.tuples(st.sampled_from(LOGIN_KEYS), VALUES), max_size=8)),
                      min_size=1, max_size=4))
def test_login_negotiation_fuzz(live, steps):
    """Well-framed Login Requests with random stages, flags and keys."""
    payload = b""
    for csg, nsg, transit, cont, pairs in steps:
        flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
        bhs = P.build_bhs(P.OP_LOGIN_REQ, flags, immediate=True, itt=7,
                          raw={8: bytes.fromhex("400001370001")}, fields={24: 1})
        payload += P.encode_bytes(bhs, encode_text(pairs))
    live.call(blast(live.addr, payload, login=False))
    check_healthy(live, len(payload))


def test_valid_pdus_unmutated_are_handled(live):
    """The corpus itself is well-formed: sent after login, the server answers it."""
    live.call(blast(live.addr, b"".join(VALID[:5]), login=True))
    check_healthy(live, 1)
