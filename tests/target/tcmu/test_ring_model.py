"""Random interleavings of kernel submissions, fetches and completions in
any order, checked against what the kernel side must see: every command
completed exactly once under its own cmd_id, never an unknown cmd_id under
the tail, the tail never beyond what was parsed, and an empty ring at the end.
The same model drives the native ring loop, whose thread fetches (and, with
no LU published direct, hands every command over)."""
from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from target.scsi.lustats import LATENCY_BUCKETS
from target.tcmu.native_device import NativeRing
from target.tcmu.ring import Request, Ring, RingError

from .fake_kernel import FakeKernel

ops = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 4), st.integers(1, 3), st.sampled_from([6, 10, 16])),
    st.tuples(st.just("fetch")),
    st.tuples(st.just("complete"), st.integers(0, 1000)),
), max_size=120)


class PythonModel:
    """Python's Ring: fetch parses up to cmd_head at once."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k
        self.ring = Ring(k.map)
        self.ooo = self.ring.ooo

    def fetch(self, expect: int) -> list[Request]:
        return self.ring.fetch()

    def complete(self, req: Request, status: int, sense: bytes) -> None:
        self.ring.complete(req, status, sense)

    def parsed_within(self, ring_size: int) -> bool:
        """The tail never passes what the user side parsed."""
        k = self.k
        return (self.ring.parse - k.tail) % ring_size <= (k.head - k.tail) % ring_size

    def done(self) -> None:
        assert self.k.tail == self.ring.parse and self.ring.in_flight() == 0
        self.ring.mv.release()


class NativeModel:
    """The native ring with the interface the model uses: fetch = a doorbell,
    then what its thread handed over."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k
        self.native = NativeRing(k.map, k.user_sock.fileno(), None, RingError, LATENCY_BUCKETS)
        self.native.start()
        self.ooo = self.native.ooo
        self.handed = 0

    def fetch(self, expect: int) -> list[Request]:
        self.k.notify()
        for _ in range(2000):            # the thread answers in microseconds; bounded anyway
            if self.native.stats()["handed"] >= self.handed + expect:
                break
            time.sleep(0.0005)
        out = [Request(cid, cdb, iovs, bidi, slot, kflags)
               for cid, cdb, iovs, bidi, slot, kflags in self.native.take()]
        self.handed += len(out)
        assert len(out) == expect
        return out

    def complete(self, req: Request, status: int, sense: bytes) -> None:
        self.native.complete(req.slot, req.cmd_id, status, sense, -1, False)

    def parsed_within(self, ring_size: int) -> bool:
        return True                      # its parse position is the thread's

    def done(self) -> None:
        assert self.native.in_flight() == 0
        self.native.stop()
        self.native = None


def check_model(model_class, ops, ooo: bool, ring_size: int) -> None:
    k = FakeKernel(cmdr_size=ring_size, data_size=1 << 20, flags=1 if ooo else 0)
    ring = model_class(k)
    assert ring.ooo == ooo
    submitted: dict[int, tuple[bytes, bytes]] = {}
    unfetched = 0
    fetched = []
    completed: dict[int, int] = {}
    serial = 0

    def do_complete(i):
        req = fetched.pop(i % len(fetched))
        status = (req.cmd_id * 7) & 0xFE
        ring.complete(req, status, bytes([req.cmd_id & 0xFF]) * 18)
        for c in k.reap():
            assert c.cmd_id not in completed
            completed[c.cmd_id] = c.status
            assert c.status == (c.cmd_id * 7) & 0xFE
            assert c.sense[:18] == bytes([c.cmd_id & 0xFF]) * 18

    def do_fetch():
        nonlocal unfetched
        for req in ring.fetch(unfetched):
            cdb, data = submitted[req.cmd_id]
            assert req.cdb == cdb
            assert b"".join(k.map[b:b + n] for b, n in req.iovs) == data
            fetched.append(req)
        unfetched = 0

    for op in ops:
        if op[0] == "submit":
            _, blocks, pieces, clen = op
            if not k.fits(clen, pieces):
                continue
            serial += 1
            cdb = bytes([0x2A if clen == 10 else (0x0A if clen == 6 else 0x8A)]) + serial.to_bytes(4, "big") \
                + bytes(clen - 5)
            data = bytes([serial & 0xFF]) * (blocks * 100)
            cid = k.submit(cdb, data_out=data, pieces=pieces, notify=False)
            submitted[cid] = (cdb, data)
            unfetched += 1
        elif op[0] == "fetch":
            do_fetch()
        elif fetched:
            do_complete(op[1])
        assert ring.parsed_within(ring_size)
        # the tail stays between what the kernel cleaned and what it published
        assert (k.tail - k.last_cleaned) % ring_size <= (k.head - k.last_cleaned) % ring_size
    do_fetch()
    while fetched:
        do_complete(0)
    assert sorted(completed) == sorted(submitted)
    assert k.tail == k.head
    ring.done()
    k.close()


@settings(max_examples=150, deadline=None)
@given(ops=ops, ooo=st.booleans(), ring_size=st.sampled_from([512, 1000, 2048]))
def test_ring_model(ops, ooo, ring_size):
    check_model(PythonModel, ops, ooo, ring_size)


@settings(max_examples=150, deadline=None)
@given(ops=ops, ooo=st.booleans(), ring_size=st.sampled_from([512, 1000, 2048]))
def test_native_ring_model(ops, ooo, ring_size):
    check_model(NativeModel, ops, ooo, ring_size)
