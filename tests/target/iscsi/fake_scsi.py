"""A small ScsiTarget for the iSCSI transport tests: LUNs over an in-memory
(or any LunIO-like) store answering INQUIRY, READ CAPACITY, READ/WRITE,
TEST UNIT READY, REPORT LUNS, MODE SENSE, SYNCHRONIZE CACHE.

``gate``: when set to an asyncio.Event, commands whose first CDB byte is in
``gated_opcodes`` wait on it (to keep a command in flight for TMF tests).
"""
from __future__ import annotations

import asyncio
import struct

from target.scsi.api import CHECK_CONDITION, GOOD, Nexus, ScsiCommand, ScsiResponse

BLOCK = 512


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    s = bytearray(18)
    s[0] = 0x70
    s[2] = key
    s[7] = 10
    s[12] = asc
    s[13] = ascq
    return bytes(s)


ILLEGAL_OPCODE = sense(0x05, 0x20)
LBA_OUT_OF_RANGE = sense(0x05, 0x21)
LUN_NOT_SUPPORTED = sense(0x05, 0x25)
INVALID_FIELD = sense(0x05, 0x24)


class MemLun:
    """LunIO-like in-memory store."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.generation = 0

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int):
        return memoryview(self.data)[offset:offset + length]

    async def write(self, offset: int, data, fua: bool = False) -> None:
        self.data[offset:offset + len(data)] = data

    async def flush(self) -> None:
        pass


class FakeScsiTarget:
    def __init__(self, luns: dict[int, object] | None = None, *, serial: str = "FAKE0001") -> None:
        self.luns_map = luns if luns is not None else {0: MemLun(8 << 20)}
        self.serial = serial
        self.gate: asyncio.Event | None = None
        self.gated_opcodes = {0x28, 0x2A, 0x88, 0x8A}
        self.executed: list[tuple[str, bytes]] = []
        self.lun_resets: list[int] = []
        self.target_resets = 0
        self.lost: list[Nexus] = []
        self.cancelled = 0

    def luns(self) -> list[int]:
        return sorted(self.luns_map)

    async def lun_reset(self, lun: int, nexus: Nexus) -> None:
        self.lun_resets.append(lun)

    async def target_reset(self, nexus: Nexus) -> None:
        self.target_resets += 1

    def nexus_lost(self, nexus: Nexus) -> None:
        self.lost.append(nexus)

    async def execute(self, cmd: ScsiCommand) -> ScsiResponse:
        cdb = bytes(cmd.cdb)
        op = cdb[0]
        self.executed.append((cmd.nexus.initiator, cdb))
        if self.gate is not None and op in self.gated_opcodes:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        lu = self.luns_map.get(cmd.lun)
        if op == 0x12:
            return self._inquiry(cdb, lu, cmd.lun)
        if op == 0xA0:
            alloc = struct.unpack_from(">I", cdb, 6)[0]
            body = b"".join(struct.pack(">HHI", lun if lun < 256 else 0x4000 | lun, 0, 0)
                            for lun in self.luns())
            data = struct.pack(">II", len(body), 0) + body
            return ScsiResponse(GOOD, data_in=data[:alloc])
        if lu is None:
            return ScsiResponse(CHECK_CONDITION, LUN_NOT_SUPPORTED)
        nblocks = lu.size // BLOCK
        if op == 0x00:
            return ScsiResponse(GOOD)
        if op == 0x25:
            return ScsiResponse(GOOD, data_in=struct.pack(">II", min(nblocks - 1, 0xFFFFFFFF), BLOCK))
        if op == 0x9E and (cdb[1] & 0x1F) == 0x10:
            alloc = struct.unpack_from(">I", cdb, 10)[0]
            data = struct.pack(">QI", nblocks - 1, BLOCK) + bytes(20)
            return ScsiResponse(GOOD, data_in=data[:alloc])
        if op in (0x1A, 0x5A):
            if op == 0x1A:
                data = bytes((3, 0, 0, 0))
                alloc = cdb[4]
            else:
                data = bytes((0, 6, 0, 0, 0, 0, 0, 0))
                alloc = struct.unpack_from(">H", cdb, 7)[0]
            return ScsiResponse(GOOD, data_in=data[:alloc])
        if op in (0x35, 0x91):
            await lu.flush()
            return ScsiResponse(GOOD)
        if op in (0x08, 0x0A, 0x28, 0x2A, 0x88, 0x8A):
            if op in (0x08, 0x0A):
                lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
                n = cdb[4] or 256
            elif op in (0x28, 0x2A):
                lba = struct.unpack_from(">I", cdb, 2)[0]
                n = struct.unpack_from(">H", cdb, 7)[0]
            else:
                lba = struct.unpack_from(">Q", cdb, 2)[0]
                n = struct.unpack_from(">I", cdb, 10)[0]
            if lba + n > nblocks:
                return ScsiResponse(CHECK_CONDITION, LBA_OUT_OF_RANGE)
            nbytes = n * BLOCK
            if op in (0x08, 0x28, 0x88):
                data = await lu.read(lba * BLOCK, nbytes)
                return ScsiResponse(GOOD, data_in=data)
            dout = cmd.data_out if cmd.data_out is not None else b""
            if len(dout) < nbytes:
                return ScsiResponse(CHECK_CONDITION, INVALID_FIELD)
            await lu.write(lba * BLOCK, memoryview(dout)[:nbytes])
            return ScsiResponse(GOOD, transfer_length=nbytes)
        return ScsiResponse(CHECK_CONDITION, ILLEGAL_OPCODE)

    def _inquiry(self, cdb: bytes, lu, lun: int) -> ScsiResponse:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        pq = 0x00 if lu is not None else 0x7F
        if cdb[1] & 1:
            page = cdb[2]
            if page == 0x00:
                body = bytes((0x00, 0x80, 0x83))
            elif page == 0x80:
                body = f"{self.serial}-{lun}".encode()
            elif page == 0x83:
                ident = f"LIVERST {self.serial}-{lun}".encode()
                body = bytes((0x02, 0x01, 0x00, len(ident))) + ident   # T10 vendor ID, ASCII
            else:
                return ScsiResponse(CHECK_CONDITION, INVALID_FIELD)
            data = bytes((pq, page)) + struct.pack(">H", len(body)) + body
        else:
            if cdb[2]:
                return ScsiResponse(CHECK_CONDITION, INVALID_FIELD)
            data = bytearray(36)
            data[0] = pq
            data[2] = 0x06
            data[3] = 0x02
            data[4] = 31
            data[7] = 0x02       # CMDQUE
            data[8:16] = b"LIVERST "
            data[16:32] = b"FAKE DISK       "
            data[32:36] = b"0001"
            data = bytes(data)
        return ScsiResponse(GOOD, data_in=data[:alloc])
