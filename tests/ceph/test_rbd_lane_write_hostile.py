"""Hostile and unusual WRITE command PDUs to an RBD LU whose session has the
native lane (target/iscsi/_nativelane.c): each sequence is sent raw, once
with the lane off and once with it on, and the target's answers must be
Python's. RBD writes complete asynchronously on either path, so the
answers are compared per command (by opcode and ITT, with the sequence
numbers that depend on completion order left out), and the StatSNs given
out must be the same set (none skipped, none twice)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from typing import AsyncIterator, Callable

import pytest
import rbd

from restore_core.stores.rbd import FEATURES
from target.service import Service
from tests.ceph.util import other_client
from tests.support import free_port
from tests.target.iscsi.initiator import Initiator
from tests.target.iscsi.test_nativelane_hostile import (PING_ITT, Wire, _collect, _pdus, send_case,
                                                        set_lane)
from tests.target.iscsi.test_nativelane import lane_on  # noqa: F401 (autouse fixture)
from tests.target.iscsi.test_scsi_integration import ready

IQN = "iqn.2025-01.org.test:rbd-lane-w"
BLOCKS = 16384                  # an 8 MiB LU
FIRST_BURST = 65536


def wr(w: Wire, lba: int = 0, blocks: int = 8, *, data: bytes | None = None, b1: int = 0,
       ctl: int = 0, sixteen: bool = False, flags: int = 0xA1, edtl: int | None = None,
       **kw) -> bytes:
    """A WRITE with its data immediate (default: all of it, F W SIMPLE)."""
    if data is None:
        data = bytes((lba & 0xFF,)) * (blocks * 512)
    if sixteen:
        cdb = struct.pack(">BBQIBB", 0x8A, b1, lba, blocks, 0, ctl)
    else:
        cdb = struct.pack(">BBIBHB", 0x2A, b1, lba, 0, blocks, ctl)
    return w.cmd(cdb, len(data) if edtl is None else edtl, flags=flags, data=data, **kw)


def _ahs_write(w: Wire) -> bytes:
    pdu = bytearray(wr(w, 0, 1))
    pdu[4] = 1                          # one word of AHS: an extended CDB of nothing
    return bytes(pdu[:48]) + struct.pack(">HBB", 1, 1, 0) + bytes(pdu[48:])


CASES: dict[str, Callable[[Wire], list]] = {
    "plain writes, 10 and 16": lambda w: [wr(w, 0) + wr(w, 8, sixteen=True) + wr(w, BLOCKS - 1, 1)],
    "ITT of a Python task": lambda w: [
        w.cmd(struct.pack(">BBIBHB", 0x2A, 0, 300, 0, 8, 0), 4096, flags=0xA1, itt=0x7000)
        + wr(w, 0, itt=0x7000) + wr(w, 8)],
    "ITT all ones": lambda w: [wr(w, 0, itt=0xFFFFFFFF) + wr(w, 8)],
    "same ITT twice in a row": lambda w: [wr(w, 0, itt=0x7001) + wr(w, 8, itt=0x7001)],
    "CmdSN ahead, then the gap": lambda w: (
        lambda c: [wr(w, 8, cmdsn=c + 1) + wr(w, 0, cmdsn=c) + wr(w, 16, cmdsn=c + 2)])(w.i.cmdsn),
    "CmdSN behind": lambda w: [wr(w, 0, cmdsn=w.i.cmdsn - 1) + wr(w, 8)],
    "CmdSN far beyond the window": lambda w: [wr(w, 0, cmdsn=w.i.cmdsn + 5000) + wr(w, 8)],
    "immediate bit": lambda w: [wr(w, 0) + wr(w, 8, byte0=0x41) + wr(w, 16)],
    "LUN absent": lambda w: [wr(w, 0) + wr(w, 0, lun=7)],
    "LUN 0 flat": lambda w: [wr(w, 0) + wr(w, 8, lun=b"\x40\x00" + bytes(6))],
    "EDTL below the data": lambda w: [wr(w, 0) + wr(w, 8, edtl=4096 - 512) + wr(w, 16)],
    "EDTL above the transfer": lambda w: [wr(w, 0) + wr(w, 8, 8, data=bytes(4608)) + wr(w, 16)],
    "less data than EDTL": lambda w: [wr(w, 0) + wr(w, 8, 8, data=bytes(2048), edtl=4096)
                                      + wr(w, 16)],
    "more than FirstBurstLength": lambda w: [wr(w, 0) + wr(w, 8, FIRST_BURST // 512 + 8) + wr(w, 16)],
    "zero blocks with data": lambda w: [wr(w, 0) + wr(w, 8, 0, data=bytes(512)) + wr(w, 16)],
    "huge transfer, little data": lambda w: [wr(w, 0) + wr(w, 8, 0xFFFF, data=bytes(4096))
                                             + wr(w, 16)],
    "past the end": lambda w: [wr(w, 0) + wr(w, BLOCKS - 1, 2) + wr(w, 8)],
    "LBA 2^63": lambda w: [wr(w, 0) + wr(w, 1 << 63, 1, sixteen=True) + wr(w, 8)],
    "NACA": lambda w: [wr(w, 0) + wr(w, 8, ctl=0x04) + wr(w, 16, sixteen=True, ctl=0x04)],
    "WRPROTECT": lambda w: [wr(w, 0) + wr(w, 8, b1=0x20) + wr(w, 16, sixteen=True, b1=0xE0)],
    "FUA, DPO, vendor bits": lambda w: [wr(w, 0, b1=0x08) + wr(w, 8, b1=0x10) + wr(w, 16, ctl=0xC0)],
    "F=0": lambda w: [wr(w, 0) + wr(w, 8, flags=0x21) + wr(w, 16)],
    "W and R": lambda w: [wr(w, 0) + wr(w, 8, flags=0xE1) + wr(w, 16)],
    "attributes": lambda w: [wr(w, 32) + wr(w, 0, flags=0xA0) + wr(w, 8, flags=0xA2) + wr(w, 16, flags=0xA4)
                             + wr(w, 24)],
    "AHS": lambda w: [wr(w, 0) + _ahs_write(w) + wr(w, 8)],
    "data split": lambda w: (lambda a, b: [a + b[:1000], 0.05, b[1000:3000], 0.05, b[3000:]])(
        wr(w, 0), wr(w, 8)),
    "logout behind writes": lambda w: [wr(w, 0) + wr(w, 8) + w.logout()],
}


@contextlib.asynccontextmanager
async def served(tmp_path, ceph, image: str) -> AsyncIterator[Service]:
    svc = Service(str(tmp_path / "state"), init=True, portals=[("127.0.0.1", free_port())],
                  backend="embedded")
    await svc.start()
    try:
        await svc.volume_create("r", rbd=image, ceph_conf=ceph.conf)
        await svc.export_create(IQN, luns={"0": "r"})
        yield svc
    finally:
        await svc.stop()


async def exchange(tmp_path, ceph, image: str, case, on: bool,
                   immediate_data: bool = True) -> tuple[bytes, int]:
    """The target's answers to the case's bytes, and how many writes the
    lane took."""
    set_lane(on)
    d = tmp_path / ("on" if on else "off")
    d.mkdir()
    async with served(d, ceph, image) as svc:
        srv = svc.frontend.server
        i = Initiator(*srv.addresses[0], name="iqn.2025-01.org.test:wire")
        await i.login(IQN, immediate_data=immediate_data, initial_r2t=True,
                      first_burst=FIRST_BURST)
        await ready(i, 0)
        lanes = [s.lane for s in srv.sessions.values() if s.lane is not None]
        if on:
            for _ in range(200):
                if all(lane._leases.get(0) for lane in lanes):
                    break
                await asyncio.sleep(0.02)
            assert lanes and all(lane._leases.get(0) for lane in lanes), "never published"
        await send_case(i, case)
        out = await _collect(i)
        # the writes still in flight end before the comparison
        for _ in range(500):
            if not any(lane.native.inflight for lane in lanes):
                break
            await asyncio.sleep(0.01)
        out += await _collect_more(i)
        taken = sum(lane.native.written for lane in lanes)
        i.writer.close()
        return out, taken


async def _collect_more(i: Initiator) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(i.reader.read(1 << 20), 0.3)
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _key(pdu: bytes) -> tuple[int, int]:
    """A PDU's command: its opcode and ITT (a Reject's: the rejected one's)."""
    op = pdu[0] & 0x3F
    if op == 0x3F and len(pdu) >= 96:
        return op, int.from_bytes(pdu[64:68], "big")
    return op, int.from_bytes(pdu[16:20], "big")


def _normal(pdu: bytes) -> bytes:
    """Without StatSN, ExpCmdSN and MaxCmdSN (completion order moves them),
    and a Reject's copy of them."""
    b = bytearray(pdu)
    b[24:36] = bytes(12)
    if b[0] & 0x3F == 0x3F and len(b) >= 96:
        b[48 + 24:48 + 36] = bytes(12)
    return bytes(b)


def _statsns(wire: bytes) -> list[int]:
    """The StatSNs given out: status-carrying PDUs (not R2T, whose StatSN
    only repeats the next one; not a Data-In without status)."""
    out = []
    for p in _pdus(wire):
        op = p[0] & 0x3F
        if op == 0x31 or (op == 0x25 and not p[1] & 0x01):
            continue
        out.append(int.from_bytes(p[24:28], "big"))
    return sorted(out)


def _image(ceph) -> str:
    spec = ceph.spec()
    with other_client(spec) as io:
        rbd.RBD().create(io, spec.image, BLOCKS * 512, old_format=False, features=FEATURES)
    return spec.image_name


def _same(name: str, off: bytes, on: bytes) -> None:
    a = collections.Counter((_key(p), _normal(p)) for p in _pdus(off))
    b = collections.Counter((_key(p), _normal(p)) for p in _pdus(on))
    assert a == b, f"{name}: off-only {a - b}\non-only {b - a}"
    assert off, "the target answered nothing"
    assert _statsns(on) == _statsns(off)
    assert len(set(_statsns(on))) == len(_statsns(on)), "a StatSN given twice"
    assert any(_key(p) == (0x20, PING_ITT) for p in _pdus(on))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_write_gets_pythons_answers(ceph, tmp_path, name):
    image = _image(ceph)

    async def main():
        off, _ = await exchange(tmp_path, ceph, image, CASES[name], False)
        on, taken = await exchange(tmp_path, ceph, image, CASES[name], True)
        assert taken, "the lane took no write: the case compares Python with itself"
        _same(name, off, on)
    asyncio.run(main())


def test_immediate_data_on_a_session_without_it_is_pythons(ceph, tmp_path):
    """ImmediateData=No: a command carrying data anyway is a protocol
    error Python rejects; the lane takes none of them."""
    image = _image(ceph)

    def case(w: Wire) -> list:
        return [wr(w, 0) + wr(w, 8)]

    async def main():
        off, _ = await exchange(tmp_path, ceph, image, case, False, immediate_data=False)
        on, taken = await exchange(tmp_path, ceph, image, case, True, immediate_data=False)
        assert taken == 0
        _same("ImmediateData=No", off, on)
        assert any(p[0] & 0x3F == 0x3F for p in _pdus(on)), "no Reject"
    asyncio.run(main())


# Task management differs from Python's by design, within what RFC 7143 and
# SAM allow: a lane write in flight cannot be aborted (librbd holds its
# buffer), so the function waits for it, and it is answered GOOD before the
# function's response, where Python's path aborts its write (no answer).
def _answers(wire: bytes) -> list[tuple[int, int, int]]:
    """(opcode, ITT, status or TMF response) in wire order."""
    return [(p[0] & 0x3F, int.from_bytes(p[16:20], "big"), p[3] if p[0] & 0x3F == 0x21 else p[2])
            for p in _pdus(wire)]


@pytest.mark.parametrize("func", [1, 5], ids=["ABORT TASK", "LUN RESET"])
def test_task_management_answers_after_the_lane_writes_it_covers(ceph, tmp_path, func):
    image = _image(ceph)
    itts = (0x7002, 0x7003)

    def case(w: Wire) -> list:
        c = w.i.cmdsn
        return [wr(w, 0, itt=itts[0]) + wr(w, 8, itt=itts[1])
                + w.tmf(func, itts[0] if func == 1 else 0xFFFFFFFF, c if func == 1 else 0)
                + wr(w, 16, itt=0x7004)]

    async def main():
        on, taken = await exchange(tmp_path, ceph, image, case, True)
        got = _answers(on)
        tmf = next(k for k, a in enumerate(got) if a[0] == 0x22)
        # the function is complete (its task ended), or the task it names is gone
        # (answered before it): never rejected
        assert got[tmf][2] in (0, 1), got
        for itt in itts:
            k = next((k for k, a in enumerate(got) if a[:2] == (0x21, itt)), None)
            # a write the lane took is answered GOOD before the function's
            # response; one Python took may be aborted (no answer)
            assert k is None or (k < tmf and got[k][2] == 0), got
        assert taken >= 1
        assert (0x21, 0x7004, 0) in got, got          # (the function is immediate: no order)
        assert len(set(_statsns(on))) == len(_statsns(on))
    asyncio.run(main())
