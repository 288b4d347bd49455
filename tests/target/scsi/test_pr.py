"""Persistent reservations (PERSISTENT RESERVE IN/OUT), SPC-2 RESERVE /
RELEASE, conflict checks and persistence through the ReservationStore."""
import json
import struct

from restore_core.plain_lunio import PlainLunIO
from target.scsi import MemoryReservationStore, ScsiDevice

from .util import (IDENT, NX_A, NX_B, NX_C, asynctest, cdb10, check, field_pointer, good,
                   mem_device, ready, send)

BS = 512
RES = 0x18
K_A, K_B, K_C = 0xAAAA000000000001, 0xBBBB000000000002, 0xCCCC000000000003


def pr_out(sa: int, rkey: int = 0, sakey: int = 0, rtype: int = 0, *, aptpl: bool = False,
           all_tg_pt: bool = False, spec_i_pt: bool = False, scope: int = 0,
           plen: int = 24) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, (scope << 4) | rtype, plen, 0)
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    params = struct.pack(">QQ4xBxH", rkey, sakey, flags, 0)
    return cdb, params


def pr_in(sa: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, sa, alloc, 0)


async def out(dev, nexus, *a, **k):
    cdb, params = pr_out(*a, **k)
    return await send(dev, cdb, params, nexus=nexus)


async def keys(dev, nexus=NX_A) -> tuple[int, list[int]]:
    data = good(await send(dev, pr_in(0), nexus=nexus))
    gen, n = struct.unpack_from(">II", data)
    return gen, [struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(n // 8)]


async def reservation(dev, nexus=NX_A) -> tuple[int, int, int] | None:
    data = good(await send(dev, pr_in(1), nexus=nexus))
    gen, n = struct.unpack_from(">II", data)
    if n == 0:
        assert len(data) == 8
        return None
    assert n == 16 and len(data) == 24
    key, _, _, scope_type, _ = struct.unpack_from(">QIBBH", data, 8)
    return gen, key, scope_type


async def setup(*nexuses):
    dev, store = mem_device(blocks=64)
    await ready(dev, *(nexuses or (NX_A, NX_B, NX_C)))
    return dev, store


READ = cdb10(0x28, 0, 1)
WRITE = cdb10(0x2A, 0, 1)


async def can_read(dev, nx) -> bool:
    return (await send(dev, READ, nexus=nx)).status == 0


async def can_write(dev, nx) -> bool:
    r = await send(dev, WRITE, bytes(BS), nexus=nx)
    assert r.status in (0, RES), r
    return r.status == 0


@asynctest
async def test_register_read_keys_and_generation():
    dev, _ = await setup()
    assert await keys(dev) == (0, [])
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    assert await keys(dev) == (2, [K_A, K_B])
    data = good(await send(dev, pr_in(0)))
    assert data == struct.pack(">IIQQ", 2, 16, K_A, K_B)
    assert good(await send(dev, pr_in(0, alloc=12))) == data[:12]
    # Wrong current key: conflict, no change.
    assert (await out(dev, NX_A, 0, 0, K_C)).status == RES
    assert (await out(dev, NX_C, 0, 5, K_C)).status == RES    # unregistered with a key
    # Change own key, then unregister.
    good(await out(dev, NX_A, 0, K_A, K_C))
    assert await keys(dev) == (3, [K_C, K_B])
    good(await out(dev, NX_A, 0, K_C, 0))
    assert await keys(dev) == (4, [K_B])
    # Register-and-ignore ignores the current key.
    good(await out(dev, NX_B, 6, 12345, K_A))
    assert await keys(dev) == (5, [K_A])


@asynctest
async def test_parameter_list_checks():
    dev, _ = await setup()
    cdb, params = pr_out(0, 0, K_A, plen=20)
    check(await send(dev, cdb, params[:20]), 0x5, 0x1A, 0x00)
    cdb, params = pr_out(0, 0, K_A)
    check(await send(dev, cdb, params[:10]), 0x5, 0x0E, 0x03)
    r = await out(dev, NX_A, 0, 0, K_A, spec_i_pt=True)
    check(r, 0x5, 0x26, 0x00)
    assert field_pointer(r.sense) == (False, 20, 3)
    r = await send(dev, struct.pack(">BBBxxIB", 0x5F, 0x07, 0, 24, 0), bytes(24))
    check(r, 0x5, 0x24, 0x00)     # REGISTER AND MOVE not supported
    check(await send(dev, pr_in(0x05)), 0x5, 0x24, 0x00)
    good(await out(dev, NX_A, 0, 0, K_A))
    r = await out(dev, NX_A, 1, K_A, 0, 2)      # type 2 is not a valid type
    check(r, 0x5, 0x24, 0x00)
    assert field_pointer(r.sense) == (True, 2, 3)
    check(await out(dev, NX_A, 1, K_A, 0, 1, scope=1), 0x5, 0x24, 0x00)


@asynctest
async def test_write_exclusive():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    assert (await out(dev, NX_C, 1, 0, 0, 1)).status == RES    # unregistered cannot reserve
    assert (await out(dev, NX_A, 1, K_B, 0, 1)).status == RES  # wrong key
    good(await out(dev, NX_A, 1, K_A, 0, 1))
    assert await reservation(dev) == (2, K_A, 0x01)
    assert good(await send(dev, pr_in(1))) == struct.pack(">IIQIBBH", 2, 16, K_A, 0, 0, 1, 0)
    good(await out(dev, NX_A, 1, K_A, 0, 1))                    # same again: GOOD
    assert (await out(dev, NX_A, 1, K_A, 0, 3)).status == RES  # other type: conflict
    assert (await out(dev, NX_B, 1, K_B, 0, 1)).status == RES  # someone else holds it
    assert await can_write(dev, NX_A) and await can_read(dev, NX_A)
    assert not await can_write(dev, NX_B) and await can_read(dev, NX_B)
    assert not await can_write(dev, NX_C) and await can_read(dev, NX_C)
    # Always allowed: INQUIRY, TUR, READ CAPACITY, REPORT LUNS, PR IN.
    for cdb in ([0x12, 0, 0, 0, 36, 0], [0, 0, 0, 0, 0, 0], [0x25] + [0] * 9,
                [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], list(pr_in(2))):
        assert (await send(dev, cdb, nexus=NX_C)).status == 0, cdb
    assert (await send(dev, [0x35] + [0] * 9, nexus=NX_B)).status == RES    # SYNC CACHE
    assert (await send(dev, [0x1A, 0, 0x3F, 0, 255, 0], nexus=NX_B)).status == 0   # MODE SENSE
    check(await out(dev, NX_A, 2, K_A, 0, 3), 0x5, 0x26, 0x04)  # release with the wrong type
    good(await out(dev, NX_B, 2, K_B, 0, 1))                    # non-holder release: no-op
    assert await reservation(dev) is not None
    good(await out(dev, NX_A, 2, K_A, 0, 1))
    assert await reservation(dev) is None
    assert await can_write(dev, NX_B) and await can_write(dev, NX_C)


@asynctest
async def test_exclusive_access():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    good(await out(dev, NX_A, 1, K_A, 0, 3))
    assert await can_read(dev, NX_A)
    assert not await can_read(dev, NX_B) and not await can_read(dev, NX_C)
    assert (await send(dev, [0x1A, 0, 0x3F, 0, 255, 0], nexus=NX_B)).status == RES
    assert (await send(dev, [0x12, 0, 0, 0, 36, 0], nexus=NX_C)).status == 0


@asynctest
async def test_registrants_only_and_holder_unregistering():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    good(await out(dev, NX_A, 1, K_A, 0, 5))            # WE registrants only
    assert await can_write(dev, NX_B)                    # registrant
    assert not await can_write(dev, NX_C) and await can_read(dev, NX_C)
    good(await out(dev, NX_A, 0, K_A, 0))               # holder unregisters: released
    check(await send(dev, READ, nexus=NX_B), 0x6, 0x2A, 0x04)   # RESERVATIONS RELEASED
    good(await send(dev, READ, nexus=NX_C))             # not a registrant: no UA
    assert await reservation(dev, NX_B) is None
    good(await out(dev, NX_B, 1, K_B, 0, 6))            # EA registrants only
    assert not await can_read(dev, NX_C)
    good(await out(dev, NX_C, 0, 0, K_C))
    assert await can_read(dev, NX_C)                     # registering grants access
    good(await out(dev, NX_B, 2, K_B, 0, 6))            # explicit release
    check(await send(dev, READ, nexus=NX_C), 0x6, 0x2A, 0x04)
    good(await send(dev, READ, nexus=NX_B))             # the releaser gets no UA


@asynctest
async def test_all_registrants():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    good(await out(dev, NX_A, 1, K_A, 0, 8))            # EA all registrants
    gen, key, st = await reservation(dev)
    assert key == 0 and st == 0x08
    good(await out(dev, NX_B, 1, K_B, 0, 8))            # every registrant is a holder
    assert await can_write(dev, NX_B) and not await can_read(dev, NX_C)
    data = good(await send(dev, pr_in(3)))
    n = struct.unpack_from(">I", data, 4)[0]
    assert len(data) == 8 + n
    # Each descriptor: key, R_HOLDER set, type 8.
    pos, seen = 8, []
    while pos < len(data):
        key, _, flags, st, _, rtpi, tid_len = struct.unpack_from(">QIBBIHI", data, pos)
        tid = data[pos + 24:pos + 24 + tid_len]
        seen.append((key, flags & 1, st, rtpi, tid[0], tid[2:4]))
        assert tid_len % 4 == 0 and tid[4:].rstrip(b"\x00").endswith(b",i,0x23d00000000" +
                                                                      (b"1" if key == K_A else b"2"))
        pos += 24 + tid_len
    assert [s[:4] for s in seen] == [(K_A, 1, 8, 1), (K_B, 1, 8, 1)]
    assert seen[0][4] == 0x45
    # The reservation survives the first holder leaving, ends with the last.
    good(await out(dev, NX_A, 0, K_A, 0))
    assert await reservation(dev) is not None
    good(await out(dev, NX_B, 0, K_B, 0))
    assert await reservation(dev) is None


@asynctest
async def test_report_capabilities_exact():
    dev, _ = await setup()
    assert good(await send(dev, pr_in(2))) == bytes([0, 8, 0x05, 0x80, 0xEA, 0x01, 0, 0])
    good(await out(dev, NX_A, 0, 0, K_A, aptpl=True))
    assert good(await send(dev, pr_in(2)))[3] == 0x81


@asynctest
async def test_clear():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    good(await out(dev, NX_A, 1, K_A, 0, 1))
    assert (await out(dev, NX_C, 3, K_C)).status == RES
    good(await out(dev, NX_B, 3, K_B))
    assert await keys(dev, NX_B) == (3, [])
    assert await reservation(dev, NX_B) is None
    check(await send(dev, READ, nexus=NX_A), 0x6, 0x2A, 0x03)   # RESERVATIONS PREEMPTED
    good(await send(dev, READ, nexus=NX_C))                      # was not registered


@asynctest
async def test_preempt_takes_reservation_and_removes_victim():
    for sa in (4, 5):     # PREEMPT, PREEMPT AND ABORT
        dev, _ = await setup()
        good(await out(dev, NX_A, 0, 0, K_A))
        good(await out(dev, NX_B, 0, 0, K_B))
        good(await out(dev, NX_C, 0, 0, K_C))
        good(await out(dev, NX_A, 1, K_A, 0, 1))
        good(await out(dev, NX_B, sa, K_B, K_A, 3))
        assert await reservation(dev, NX_B) == (4, K_B, 0x03)
        assert (await keys(dev, NX_B))[1] == [K_B, K_C]
        check(await send(dev, READ, nexus=NX_A), 0x6, 0x2A, 0x05)   # REGISTRATIONS PREEMPTED
        assert (await send(dev, READ, nexus=NX_A)).status == RES
        # Preempting a non-holder's key removes it, reservation unchanged.
        good(await out(dev, NX_B, sa, K_B, K_C, 3))
        assert (await keys(dev, NX_B))[1] == [K_B]
        assert await reservation(dev, NX_B) == (5, K_B, 0x03)
        r = await out(dev, NX_B, sa, K_B, 0, 3)
        check(r, 0x5, 0x26, 0x00)
        assert (await out(dev, NX_B, sa, K_B, 0x777, 3)).status == RES   # no such key
        check(await send(dev, READ, nexus=NX_C), 0x6, 0x2A, 0x05)
        assert (await out(dev, NX_C, sa, K_C, K_B, 3)).status == RES     # C was preempted


@asynctest
async def test_preempt_without_reservation_and_all_registrants_zero_key():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_B, 0, 0, K_B))
    good(await out(dev, NX_A, 4, K_A, K_B, 1))
    assert (await keys(dev))[1] == [K_A] and await reservation(dev) is None
    check(await out(dev, NX_B, 0, 0, K_B), 0x6, 0x2A, 0x05)     # told first
    good(await out(dev, NX_B, 0, 0, K_B))
    good(await out(dev, NX_C, 0, 0, K_C))
    good(await out(dev, NX_B, 1, K_B, 0, 7))            # WE all registrants
    good(await out(dev, NX_A, 4, K_A, 0, 1))            # zero key: take it all
    assert (await keys(dev))[1] == [K_A]
    assert (await reservation(dev))[1:] == (K_A, 0x01)


@asynctest
async def test_all_tg_pt_registration_covers_other_ports():
    from target.scsi import Nexus
    dev, _ = await setup()
    other_port = Nexus(NX_A.initiator, "iqn.2026-01.io.liverestore:tgt,t,0x2")
    await ready(dev, other_port)
    good(await out(dev, NX_A, 0, 0, K_A, all_tg_pt=True))
    good(await out(dev, other_port, 1, K_A, 0, 1))       # same registration via port 2
    assert await can_write(dev, NX_A) and await can_write(dev, other_port)
    assert not await can_write(dev, NX_B)


@asynctest
async def test_persistence_round_trip_with_aptpl():
    store = MemoryReservationStore()
    dev, mem = mem_device(blocks=64, reservations=store)
    await ready(dev, NX_A, NX_B)
    good(await out(dev, NX_A, 0, 0, K_A, aptpl=True))
    good(await out(dev, NX_B, 0, 0, K_B, aptpl=True, all_tg_pt=True))
    good(await out(dev, NX_B, 1, K_B, 0, 5))
    json.dumps(store.state)                               # JSON-serialisable
    assert store.saves == 3 and store.state["aptpl"] is True
    # A "restart": a new device over the same store.
    dev2 = ScsiDevice(PlainLunIO(mem), IDENT, reservations=store)
    await ready(dev2, NX_A, NX_B, NX_C)
    assert await keys(dev2) == (2, [K_A, K_B])
    assert await reservation(dev2) == (2, K_B, 0x05)
    assert not await can_write(dev2, NX_C) and await can_write(dev2, NX_A)
    assert dev2.pr.registration((NX_B.initiator, "elsewhere")) is not None   # ALL_TG_PT kept
    assert store.saves == 3                               # loading does not rewrite


@asynctest
async def test_without_aptpl_state_does_not_survive_restart():
    store = MemoryReservationStore()
    dev, mem = mem_device(blocks=64, reservations=store)
    await ready(dev)
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_A, 1, K_A, 0, 1))
    assert store.state["aptpl"] is False and store.state["reservation"]["type"] == 1
    dev2 = ScsiDevice(PlainLunIO(mem), IDENT, reservations=store)
    await ready(dev2)
    assert await keys(dev2) == (0, [])
    assert await reservation(dev2) is None


def test_malformed_store_state_starts_clean():
    store = MemoryReservationStore({"aptpl": True, "registrations": [{"initiator": "x"}]})
    dev, _ = mem_device(reservations=store)
    assert dev.pr.registrations == [] and dev.pr.holder is None


@asynctest
async def test_spc2_reserve_release():
    dev, _ = await setup()
    good(await send(dev, [0x16, 0, 0, 0, 0, 0], nexus=NX_A))
    good(await send(dev, [0x16, 0, 0, 0, 0, 0], nexus=NX_A))     # again: fine
    assert (await send(dev, [0x56] + [0] * 9, nexus=NX_B)).status == RES
    assert (await send(dev, [0, 0, 0, 0, 0, 0], nexus=NX_B)).status == RES
    assert not await can_read(dev, NX_B)
    assert await can_write(dev, NX_A)
    for cdb in ([0x12, 0, 0, 0, 36, 0], [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                [0x03, 0, 0, 0, 18, 0]):
        good(await send(dev, cdb, nexus=NX_B))
    good(await send(dev, [0x17, 0, 0, 0, 0, 0], nexus=NX_B))     # not holder: no effect
    assert not await can_read(dev, NX_B)
    assert (await out(dev, NX_B, 0, 0, K_B)).status == RES       # PR OUT conflicts too
    good(await send(dev, [0x57] + [0] * 9, nexus=NX_A))
    assert await can_read(dev, NX_B)
    check(await send(dev, [0x16, 0x10, 0, 0, 0, 0]), 0x5, 0x24, 0x00)   # third party


@asynctest
async def test_spc2_reservation_cleared_by_reset_and_nexus_loss():
    dev, _ = await setup()
    good(await send(dev, [0x16, 0, 0, 0, 0, 0], nexus=NX_A))
    await dev.lun_reset(NX_A)
    await ready(dev, NX_A, NX_B)
    assert await can_read(dev, NX_B)
    good(await send(dev, [0x16, 0, 0, 0, 0, 0], nexus=NX_A))
    dev.nexus_lost(NX_A)
    assert await can_read(dev, NX_B)


@asynctest
async def test_spc2_reserve_conflicts_with_persistent_registrations():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    assert (await send(dev, [0x16, 0, 0, 0, 0, 0], nexus=NX_A)).status == RES
    assert (await send(dev, [0x17, 0, 0, 0, 0, 0], nexus=NX_B)).status == RES


@asynctest
async def test_pr_state_survives_lun_reset():
    dev, _ = await setup()
    good(await out(dev, NX_A, 0, 0, K_A))
    good(await out(dev, NX_A, 1, K_A, 0, 1))
    await dev.lun_reset(NX_B)
    await ready(dev, NX_A, NX_B)
    assert (await reservation(dev))[1:] == (K_A, 1)
    assert not await can_write(dev, NX_B)


@asynctest
async def test_store_failure_fails_the_command_and_keeps_state():
    class Flaky(MemoryReservationStore):
        fail = False

        def save(self, state):
            if self.fail:
                raise OSError("database is locked")
            super().save(state)

    store = Flaky()
    dev, _ = mem_device(blocks=64, reservations=store)
    await ready(dev, NX_A, NX_B)
    good(await out(dev, NX_A, 0, 0, K_A, aptpl=True))
    store.fail = True
    check(await out(dev, NX_B, 0, 0, K_B), 0x4, 0x44, 0x00)
    check(await out(dev, NX_A, 1, K_A, 0, 1), 0x4, 0x44, 0x00)
    assert await keys(dev) == (1, [K_A])
    assert await reservation(dev) is None
    store.fail = False
    good(await out(dev, NX_A, 1, K_A, 0, 1))
    assert await reservation(dev) == (1, K_A, 1)
