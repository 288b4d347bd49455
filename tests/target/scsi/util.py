"""Shared helpers for the target/scsi tests: device factories, a scriptable
fake LunIO, and sense decoding for both formats."""
from __future__ import annotations

import asyncio
import struct
from typing import Awaitable, Callable

from restore_core.blockstore import MemoryBlockStore
from restore_core.lunio import Access, AccessState, MediumError
from restore_core.plain_lunio import PlainLunIO
from target.scsi import (DeviceIdentity, DeviceOptions, LunSet, MemoryReservationStore, Nexus,
                         ScsiCommand, ScsiDevice, ScsiResponse)

IDENT = DeviceIdentity(product_id="lr-disk", revision="0001", serial="LR0001",
                       naa="6001405aabbccdd00112233445566778", t10_vendor_id="LR0001")
TPORT = "iqn.2026-01.io.liverestore:tgt,t,0x1"
NX_A = Nexus("iqn.1994-05.com.redhat:a,i,0x23d000000001", TPORT, "iqn.1994-05.com.redhat:a")
NX_B = Nexus("iqn.1994-05.com.redhat:b,i,0x23d000000002", TPORT, "iqn.1994-05.com.redhat:b")
NX_C = Nexus("iqn.1994-05.com.redhat:c,i,0x23d000000003", TPORT, "iqn.1994-05.com.redhat:c")

GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18


def run(coro: Awaitable) -> object:
    return asyncio.run(coro)


def mem_device(blocks: int = 256, block_size: int = 512, **kw) -> tuple[ScsiDevice, MemoryBlockStore]:
    store = MemoryBlockStore(blocks * block_size)
    read_only = kw.pop("read_only", False)
    dev = ScsiDevice(PlainLunIO(store, read_only=read_only), IDENT, block_size=block_size, **kw)
    return dev, store


class FakeLunIO:
    """A LunIO whose failures, state, size and generation tests control.

    ``size`` may be huge: data lives in a dict of touched bytes ranges only
    when ``sparse`` is set; otherwise a bytearray.
    """

    def __init__(self, size: int = 256 * 512, *, sparse: bool = False, yields: int = 0) -> None:
        self._size = size
        self.buf = None if sparse else bytearray(size)
        self.generation = 0
        self.state = AccessState(Access.READ_WRITE)
        self.read_error: BaseException | None = None
        self.write_error: BaseException | None = None
        self.flush_error: BaseException | None = None
        self.bad_offset: int | None = None
        self.flushes = 0
        self.writes: list[tuple[int, int, bool]] = []
        self.unmaps: list[tuple[int, int]] = []
        self.runs: list[tuple[int, int, bool]] | None = None
        self.yields = yields

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def access_state(self) -> AccessState:
        return self.state

    async def _yield(self) -> None:
        for _ in range(self.yields):
            await asyncio.sleep(0)

    async def read(self, offset: int, length: int) -> bytearray:
        await self._yield()
        if self.read_error is not None:
            raise self.read_error
        if self.bad_offset is not None and offset <= self.bad_offset < offset + length:
            raise MediumError("bad sector", self.bad_offset)
        if self.buf is None:
            return bytearray(length)
        return self.buf[offset:offset + length]

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self._yield()
        if self.write_error is not None:
            raise self.write_error
        if self.bad_offset is not None and offset <= self.bad_offset < offset + len(data):
            raise MediumError("bad sector", self.bad_offset, write=True)
        self.writes.append((offset, len(data), fua))
        if self.buf is not None:
            self.buf[offset:offset + len(data)] = data
        await self._yield()

    # no direct path: every READ/WRITE is the awaited work (read/write)
    def route_read(self, offset: int, into: list[memoryview]):
        return self.read(offset, sum(map(len, into)))

    def route_write(self, offset: int, data, fua: bool):
        return self.write(offset, data, fua)

    async def flush(self) -> None:
        if self.flush_error is not None:
            raise self.flush_error
        self.flushes += 1

    async def unmap(self, offset: int, length: int) -> None:
        self.unmaps.append((offset, length))
        if self.buf is not None:
            self.buf[offset:offset + length] = bytes(length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if self.runs is not None:
            return [r for r in self.runs if r[0] + r[1] > offset and r[0] < offset + length]
        return [(offset, length, True)]


def fake_device(lunio: FakeLunIO | None = None, block_size: int = 512,
                **kw) -> tuple[ScsiDevice, FakeLunIO]:
    lunio = lunio or FakeLunIO()
    return ScsiDevice(lunio, IDENT, block_size=block_size, **kw), lunio


async def send(target: ScsiDevice | LunSet, cdb, data=None, nexus: Nexus = NX_A,
               lun: int = 0) -> ScsiResponse:
    return await target.execute(ScsiCommand(bytes(cdb), lun, nexus, data))


async def ready(target: ScsiDevice | LunSet, *nexuses: Nexus, lun: int = 0) -> None:
    """Consume the power-on unit attention (and any other) on each nexus."""
    for nx in nexuses or (NX_A,):
        for _ in range(20):
            r = await send(target, [0, 0, 0, 0, 0, 0], nexus=nx, lun=lun)
            if r.status != CHECK_CONDITION or sense_of(r.sense)[0] != 0x6:
                break


def sense_of(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) from fixed or descriptor sense."""
    sense = bytes(sense)
    if sense[0] & 0x7F in (0x70, 0x71):
        return sense[2] & 0xF, sense[12], sense[13]
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    raise AssertionError(f"not sense data: {sense.hex()}")


def info_of(sense: bytes) -> int | None:
    sense = bytes(sense)
    if sense[0] & 0x7F == 0x70:
        return struct.unpack_from(">I", sense, 3)[0] if sense[0] & 0x80 else None
    pos = 8
    while pos < 8 + sense[7]:
        if sense[pos] == 0x00:
            return struct.unpack_from(">Q", sense, pos + 4)[0]
        pos += 2 + sense[pos + 1]
    return None


def field_pointer(sense: bytes) -> tuple[bool, int, int | None] | None:
    """(in_cdb, byte, bit or None) from the sense-key-specific field."""
    sense = bytes(sense)
    if sense[0] & 0x7F == 0x70:
        sks = sense[15:18]
    else:
        sks = None
        pos = 8
        while pos < 8 + sense[7]:
            if sense[pos] == 0x02:
                sks = sense[pos + 4:pos + 7]
            pos += 2 + sense[pos + 1]
        if sks is None:
            return None
    if not sks[0] & 0x80:
        return None
    bit = sks[0] & 0x07 if sks[0] & 0x08 else None
    return bool(sks[0] & 0x40), (sks[1] << 8) | sks[2], bit


def check(resp: ScsiResponse, key: int, asc: int, ascq: int) -> None:
    assert resp.status == CHECK_CONDITION, (resp.status, bytes(resp.sense).hex())
    assert sense_of(resp.sense) == (key, asc, ascq), bytes(resp.sense).hex()


def good(resp: ScsiResponse) -> bytes:
    assert resp.status == GOOD, (resp.status, bytes(resp.sense).hex())
    return bytes(resp.data_in)


def cdb10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def cdb12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)


def cdb6(op: int, lba: int, blocks: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0))


def asynctest(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run an ``async def test_...`` under asyncio.run (no plugin needed)."""
    def wrapper() -> None:
        asyncio.run(fn())
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


__all__ = ["DeviceOptions", "MemoryReservationStore", "LunSet", "ScsiDevice"]
