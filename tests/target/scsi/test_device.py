"""The execute() pipeline: unit attentions, access state, LunIO error
mapping, internal failures, task management."""
import asyncio
import logging

from restore_core.lunio import Access, AccessState, MediumError, NotReadyError, WriteProtectedError

from .util import (NX_A, NX_B, FakeLunIO, asynctest, cdb10, cdb16, check, fake_device, good,
                   info_of, mem_device, ready, send, sense_of)

BS = 512
TUR = [0, 0, 0, 0, 0, 0]
READ = cdb10(0x28, 0, 1)
WRITE = cdb10(0x2A, 0, 1)


@asynctest
async def test_generation_change_raises_medium_changed_ua_on_every_nexus():
    dev, lunio = fake_device()
    await ready(dev, NX_A, NX_B)
    lunio.generation += 1
    check(await send(dev, READ, nexus=NX_A), 0x6, 0x28, 0x00)
    good(await send(dev, READ, nexus=NX_A))
    check(await send(dev, TUR, nexus=NX_B), 0x6, 0x28, 0x00)
    good(await send(dev, TUR, nexus=NX_B))


@asynctest
async def test_capacity_change_ua():
    dev, lunio = fake_device()
    await ready(dev)
    lunio.size = 512 * 512
    lunio.buf.extend(bytes(256 * 512))
    check(await send(dev, TUR), 0x6, 0x2A, 0x09)
    assert good(await send(dev, [0x25] + [0] * 9))[:4] == bytes([0, 0, 1, 0xFF])


@asynctest
async def test_inquiry_and_report_luns_do_not_consume_ua():
    dev, lunio = fake_device()
    await ready(dev)
    lunio.generation = 7
    good(await send(dev, [0x12, 0, 0, 0, 36, 0]))
    good(await send(dev, [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
    check(await send(dev, TUR), 0x6, 0x28, 0x00)


@asynctest
async def test_ua_reported_before_invalid_opcode_and_in_descriptor_format():
    dev, _ = mem_device()
    await ready(dev)
    await dev.target_reset(NX_B)
    dev.mode._current[0x0A][2] |= 0x04       # D_SENSE (a reset restores the default)
    r = await send(dev, [0xC5] + [0] * 15)
    assert bytes(r.sense)[:4] == bytes([0x72, 0x06, 0x29, 0x00])
    check(await send(dev, [0xC5] + [0] * 15), 0x5, 0x20, 0x00)


@asynctest
async def test_resets_queue_ua_for_every_nexus_and_replace_pending_ones():
    dev, lunio = fake_device()
    await ready(dev, NX_A, NX_B)
    lunio.generation += 1
    good(await send(dev, [0x12, 0, 0, 0, 36, 0]))   # notices the change, queues 28/00
    await dev.lun_reset(NX_A)
    for nx in (NX_A, NX_B):      # the issuer too (SAM-5; libiscsi MultipathIO.Reset)
        check(await send(dev, TUR, nexus=nx), 0x6, 0x29, 0x03)
        good(await send(dev, TUR, nexus=nx))
    await dev.target_reset(NX_B)
    for nx in (NX_A, NX_B):
        check(await send(dev, TUR, nexus=nx), 0x6, 0x29, 0x00)
        good(await send(dev, TUR, nexus=nx))


@asynctest
async def test_nexus_loss_forgets_the_nexus():
    dev, _ = mem_device()
    await ready(dev)
    dev.nexus_lost(NX_A)
    check(await send(dev, TUR), 0x6, 0x29, 0x00)     # a new nexus is told again


@asynctest
async def test_not_ready_state():
    dev, lunio = fake_device()
    await ready(dev)
    lunio.state = AccessState(Access.NOT_READY, "clone during protected restore")
    check(await send(dev, TUR), 0x2, 0x04, 0x03)
    check(await send(dev, READ), 0x2, 0x04, 0x03)
    check(await send(dev, WRITE, bytes(BS)), 0x2, 0x04, 0x03)
    check(await send(dev, [0x35] + [0] * 9), 0x2, 0x04, 0x03)
    good(await send(dev, [0x12, 0, 0, 0, 36, 0]))
    good(await send(dev, [0x25] + [0] * 9))
    good(await send(dev, [0x1A, 0, 0x3F, 0, 255, 0]))
    data = good(await send(dev, [0x03, 0, 0, 0, 18, 0]))
    assert sense_of(data) == (0x2, 0x04, 0x03)
    assert lunio.writes == []
    lunio.state = AccessState(Access.READ_WRITE)
    good(await send(dev, TUR))


@asynctest
async def test_read_only_state():
    dev, lunio = fake_device()
    await ready(dev)
    lunio.state = AccessState(Access.READ_ONLY, "clone while paired")
    r = await send(dev, WRITE, bytes(BS))
    assert bytes(r.sense) == bytes([0x70, 0, 0x07, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x27, 0, 0, 0, 0, 0])
    for cdb, data in ((cdb16(0x93, 0, 1), bytes(BS)), (cdb10(0x2E, 0, 1), bytes(BS)),
                      (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), bytes(24))):
        check(await send(dev, cdb, data), 0x7, 0x27, 0x00)
    good(await send(dev, READ))
    good(await send(dev, [0x35] + [0] * 9))
    assert lunio.writes == [] and lunio.unmaps == []


@asynctest
async def test_read_only_option_and_plain_lunio_read_only():
    from target.scsi import DeviceOptions
    dev, _ = fake_device(options=DeviceOptions(read_only=True))
    await ready(dev)
    check(await send(dev, WRITE, bytes(BS)), 0x7, 0x27, 0x00)
    dev, store = mem_device(read_only=True)
    await ready(dev)
    check(await send(dev, WRITE, bytes(BS)), 0x7, 0x27, 0x00)
    assert good(await send(dev, [0x1A, 0, 0x08, 0, 255, 0]))[2] & 0x80


@asynctest
async def test_lunio_exceptions_are_mapped():
    dev, lunio = fake_device()
    await ready(dev)
    lunio.read_error = NotReadyError("restore took the clone away")
    check(await send(dev, READ), 0x2, 0x04, 0x03)
    lunio.read_error = None
    lunio.write_error = WriteProtectedError("paired")
    check(await send(dev, WRITE, bytes(BS)), 0x7, 0x27, 0x00)
    lunio.write_error = MediumError("EIO", 4096 + 3, write=True)
    r = await send(dev, cdb10(0x2A, 5, 4), bytes(4 * BS))
    check(r, 0x3, 0x0C, 0x00)
    assert info_of(r.sense) == 8
    lunio.write_error = MediumError("EIO")                 # offset unknown: first LBA
    r = await send(dev, cdb10(0x2A, 5, 4), bytes(4 * BS))
    check(r, 0x3, 0x0C, 0x00)
    assert info_of(r.sense) == 5


@asynctest
async def test_medium_error_on_read_reports_lba():
    dev, store = mem_device(blocks=64)
    await ready(dev)
    store.fail_at.add(10 * BS + 100)
    r = await send(dev, cdb10(0x28, 8, 4))
    assert bytes(r.sense) == bytes([0xF0, 0, 0x03, 0, 0, 0, 10, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])
    good(await send(dev, cdb10(0x28, 0, 8)))


@asynctest
async def test_medium_error_beyond_32_bits_needs_descriptor_sense():
    lunio = FakeLunIO(1 << 45, sparse=True)
    lunio.bad_offset = (1 << 44) + 512 * 3
    dev, _ = fake_device(lunio)
    await ready(dev)
    lba = (1 << 44) // 512
    r = await send(dev, cdb16(0x88, lba, 8))
    check(r, 0x3, 0x11, 0x00)
    assert bytes(r.sense)[0] == 0x70                     # INFORMATION does not fit: VALID=0
    dev.mode._current[0x0A][2] |= 0x04
    r = await send(dev, cdb16(0x88, lba, 8))
    assert bytes(r.sense)[0] == 0x72 and info_of(r.sense) == lba + 3


def test_unexpected_exception_is_hardware_error(caplog):
    async def go():
        dev, lunio = fake_device()
        await ready(dev)
        lunio.read_error = ZeroDivisionError("bug")
        with caplog.at_level(logging.ERROR):
            r = await send(dev, READ)
        check(r, 0x4, 0x44, 0x00)
        assert any("ZeroDivisionError" in (rec.exc_text or "") or rec.exc_info
                   for rec in caplog.records)
        # The device keeps working.
        lunio.read_error = None
        good(await send(dev, READ))
    asyncio.run(go())


@asynctest
async def test_commands_run_concurrently():
    """Two reads are in the backend at the same time: no global lock."""
    class Gate(FakeLunIO):
        def __init__(self):
            super().__init__()
            self.inside = 0
            self.peak = 0
            self.release = asyncio.Event()

        async def read(self, offset, length):
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            if self.peak >= 2:
                self.release.set()
            await self.release.wait()
            self.inside -= 1
            return bytearray(length)

    lunio = Gate()
    dev, _ = fake_device(lunio)
    await ready(dev)
    r1, r2 = await asyncio.wait_for(asyncio.gather(send(dev, READ), send(dev, cdb10(0x28, 9, 1))), 10)
    good(r1), good(r2)
    assert lunio.peak == 2
