"""Hypothesis: random CDBs never escape execute() and always produce a
well-formed response; READ/WRITE against a bytearray model."""
import asyncio
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.scsi import LunSet
from target.scsi.commands import COMMANDS

from .util import NX_A, NX_B, cdb6, cdb10, cdb12, cdb16, mem_device, send

VALID_STATUS = {0x00, 0x02, 0x18}
KNOWN_OPCODES = sorted({s.opcode for s in COMMANDS})
# LR_SCSI_FUZZ_EXAMPLES raises the count for a long local soak.
# database=None: these tests never write into the checkout's shared
# .hypothesis directory; a failure prints its reproduction instead.
FUZZ = settings(max_examples=int(os.environ.get("LR_SCSI_FUZZ_EXAMPLES", "400")), deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_well_formed(r) -> None:
    assert r.status in VALID_STATUS
    if r.status == 0x02:
        s = bytes(r.sense)
        assert s[0] in (0x70, 0xF0, 0x72), s.hex()
        key = s[2] & 0xF if s[0] != 0x72 else s[1]
        # HARDWARE ERROR would mean an internal exception: a bug.
        assert key in (0x2, 0x3, 0x5, 0x6, 0x7, 0xE), s.hex()
        if s[0] != 0x72:
            assert len(s) == 18
        else:
            assert len(s) == 8 + s[7]
    else:
        assert not r.sense
        memoryview(r.data_in)


# CDBs: mostly a known opcode (so the handlers' field checks get exercised),
# sometimes anything; the rest random bytes of random length.
cdbs = st.one_of(
    st.binary(min_size=0, max_size=32),
    st.tuples(st.sampled_from(KNOWN_OPCODES), st.binary(min_size=0, max_size=31)).map(
        lambda t: bytes([t[0]]) + t[1]),
    st.tuples(st.sampled_from(KNOWN_OPCODES), st.integers(0, 0x1F),
              st.binary(min_size=14, max_size=14)).map(
        lambda t: bytes([t[0], t[1]]) + t[2]),
)


@FUZZ
@given(cmds=st.lists(st.tuples(cdbs, st.one_of(st.none(), st.binary(max_size=2048)),
                               st.sampled_from([0, 0, 0, 1]), st.booleans()),
                     min_size=1, max_size=8))
def test_random_cdbs_never_raise(cmds):
    async def go():
        dev, store = mem_device(blocks=32, options=None)
        ls = LunSet({0: dev})
        for cdb, data, lun, other in cmds:
            r = await send(ls, cdb, data, nexus=NX_B if other else NX_A, lun=lun)
            _assert_well_formed(r)
        # Commands run concurrently too.
        results = await asyncio.gather(*(send(ls, cdb, data, lun=lun) for cdb, data, lun, _ in cmds))
        for r in results:
            _assert_well_formed(r)
    asyncio.run(go())


BLOCKS = 64
BS = 512

ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.sampled_from([6, 10, 12, 16]), st.integers(0, BLOCKS + 2),
              st.integers(0, 6), st.binary(min_size=1, max_size=8), st.booleans()),
    st.tuples(st.just("r"), st.sampled_from([6, 10, 12, 16]), st.integers(0, BLOCKS + 2),
              st.integers(0, 6)),
    st.tuples(st.just("ws"), st.integers(0, BLOCKS), st.integers(1, 5), st.integers(0, 255),
              st.booleans()),
    st.tuples(st.just("caw"), st.integers(0, BLOCKS - 1), st.booleans()),
), min_size=1, max_size=25)

_RD = {6: (0x08, cdb6), 10: (0x28, cdb10), 12: (0xA8, cdb12), 16: (0x88, cdb16)}
_WR = {6: (0x0A, cdb6), 10: (0x2A, cdb10), 12: (0xAA, cdb12), 16: (0x8A, cdb16)}


def _build(table, size, lba, n, fua=False):
    op, fn = table[size]
    if size == 6:
        return fn(op, lba, n)
    return fn(op, lba, n, 0x08 if fua else 0)


@FUZZ
@given(seq=ops)
def test_read_write_model(seq):
    async def go():
        dev, store = mem_device(blocks=BLOCKS)
        model = bytearray(BLOCKS * BS)
        await send(dev, [0, 0, 0, 0, 0, 0])   # power-on UA
        for op in seq:
            if op[0] == "w":
                _, size, lba, n, seed, fua = op
                cdb = _build(_WR, size, lba, n, fua)
                if size == 6 and n == 0:
                    n = 256                    # 0 means 256 blocks in WRITE(6)
                data = (seed * (n * BS // len(seed) + 1))[:n * BS]
                r = await send(dev, cdb, data)
                if lba + n <= BLOCKS:
                    assert r.status == 0, bytes(r.sense).hex()
                    model[lba * BS:(lba + n) * BS] = data
                else:
                    assert bytes(r.sense)[12] == 0x21
            elif op[0] == "r":
                _, size, lba, n = op
                cdb = _build(_RD, size, lba, n)
                if size == 6 and n == 0:
                    n = 256
                r = await send(dev, cdb)
                if lba + n <= BLOCKS:
                    assert r.status == 0
                    assert bytes(r.data_in) == model[lba * BS:(lba + n) * BS]
                else:
                    assert bytes(r.sense)[12] == 0x21
            elif op[0] == "ws":
                _, lba, n, byte, unmap = op
                block = bytes([byte]) * BS
                r = await send(dev, cdb16(0x93, lba, n, 0x08 if unmap else 0), block)
                if lba + n <= BLOCKS:
                    assert r.status == 0
                    model[lba * BS:(lba + n) * BS] = block * n
                else:
                    assert bytes(r.sense)[12] == 0x21
            else:
                _, lba, match = op
                cur = bytes(model[lba * BS:(lba + 1) * BS])
                expect = cur if match else bytes(b ^ 0x80 for b in cur[:1]) + cur[1:]
                new = struct.pack(">Q", lba) * (BS // 8)
                r = await send(dev, struct.pack(">BBQ3xBBB", 0x89, 0, lba, 1, 0, 0), expect + new)
                if match:
                    assert r.status == 0
                    model[lba * BS:(lba + 1) * BS] = new
                else:
                    assert bytes(r.sense)[2] & 0xF == 0xE and struct.unpack_from(">I", bytes(r.sense), 3)[0] == 0
        assert store.current == model
        r = await send(dev, cdb16(0x88, 0, BLOCKS))
        assert bytes(r.data_in) == model
    asyncio.run(go())


PR_KEYS = [0x11, 0x22, 0x33, 0]     # 0 last: hypothesis favours early entries


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))
@given(steps=st.lists(st.tuples(
    st.integers(0, 2),                          # which nexus
    st.sampled_from([0, 1, 0, 1, 2, 3, 4, 5, 6]),   # PR OUT service action
    # reservation key: mostly the nexus's own current key ("own"), so the
    # sequences get past the key check and reach the interesting states
    st.sampled_from(["own", "own", "own"] + PR_KEYS), st.sampled_from([0] + PR_KEYS),
    st.sampled_from([1, 3, 5, 6, 7, 8]),
    st.booleans()), min_size=8, max_size=40))
def test_persistent_reservation_invariants(steps):
    """Random PR OUT sequences from three nexuses keep the state coherent:
    one registration per nexus, a reservation only with a registered holder,
    holders can always write, and the persisted state reloads identically."""
    from restore_core.plain_lunio import PlainLunIO
    from target.scsi import MemoryReservationStore, ScsiDevice
    from target.scsi.pr import nexus_key

    from .util import IDENT, NX_C, ready

    nexuses = [NX_A, NX_B, NX_C]

    async def go():
        store = MemoryReservationStore()
        dev, mem = mem_device(blocks=8, reservations=store)
        await ready(dev, *nexuses)
        for who, sa, rkey, sakey, rtype, aptpl in steps:
            if rkey == "own":
                reg = dev.pr.registration(nexus_key(nexuses[who]))
                rkey = reg.key if reg is not None else 0
            cdb = struct.pack(">BBBxxIB", 0x5F, sa, rtype, 24, 0)
            params = struct.pack(">QQ4xBxH", rkey, sakey, 1 if aptpl else 0, 0)
            r = await send(dev, cdb, params, nexus=nexuses[who])
            _assert_well_formed(r)
            pr = dev.pr
            keys = [nexus_key(nx) for nx in nexuses]
            assert all(sum(reg.matches(k) for reg in pr.registrations) <= 1 for k in keys)
            assert all(reg.key != 0 for reg in pr.registrations)
            if pr.holder is not None:
                assert pr.holder in pr.registrations
                assert pr.res_type in (1, 3, 5, 6, 7, 8)
                for nx in nexuses:
                    if pr.is_holder(nexus_key(nx)):
                        w = await send(dev, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0),
                                       bytes(512), nexus=nx)
                        # A holder is never refused for the reservation's sake
                        # (it may still owe a unit attention).
                        assert w.status != 0x18
            if pr.aptpl:
                again = ScsiDevice(PlainLunIO(mem), IDENT, reservations=store)
                assert again.pr.state() == pr.state()
    asyncio.run(go())
