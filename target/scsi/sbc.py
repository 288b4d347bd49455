"""Block (SBC-3) command handlers: capacity, the data path, verify, cache
sync, WRITE SAME, UNMAP, COMPARE AND WRITE and GET LBA STATUS.

Data moves as memoryviews from Data-Out straight to the LunIO and from the
LunIO straight to Data-In. READ and WRITE ask the LunIO once where they go
(route_read/route_write): done at once, or the work to await. Writes that
wait hold the device's range lock shared (they never wait for each other);
COMPARE AND WRITE takes it exclusive, and while it holds or waits for it
writes do not go straight to the store.
"""
from __future__ import annotations

import struct
from asyncio import Future
from typing import TYPE_CHECKING, Any, Awaitable, Coroutine

from restore_core.lunio import MediumError

from . import constants as c
from .api import ScsiCommand
from .cdb import Data, be, data_len, data_out_view, first_difference
from .lunio_access import medium_error
from .sense import CheckCondition, invalid_cdb, invalid_opcode, invalid_param, lba_out_of_range
from .sense import param_list_length_error, short_data_out

if TYPE_CHECKING:
    from .commands import Cdb
    from .device import ScsiDevice

_CHUNK = 1 << 20    # bytes per backend call for WRITE SAME / VERIFY scans


class _Placed:
    """What a READ returns when its data went into ScsiCommand.into."""

    def __repr__(self) -> str:
        return "PLACED"


PLACED = _Placed()


class ReadInFlight:
    """What a READ returns while its store reads straight into its buffer
    (BlockStore.start_readinto, via LunIO.route_read): ScsiDevice.submit
    answers it from ``work``'s done-callback with ``data`` (PLACED or the
    buffer), or read_failed's error -- no coroutine and no Task per read."""

    __slots__ = ("work", "data", "lba")

    def __init__(self, work: "Future[None]", data: object, lba: int) -> None:
        self.work = work
        self.data = data
        self.lba = lba


def read_failed(dev: "ScsiDevice", e: BaseException, lba: int) -> BaseException:
    """What a READ at ``lba`` reports for its LunIO's error."""
    return medium_error(e, dev.block_size, lba) if isinstance(e, MediumError) else e


def check_range(dev: "ScsiDevice", lba: int, blocks: int) -> None:
    if lba + blocks > dev.num_blocks:      # (blocks >= 0: covers lba beyond the end)
        raise lba_out_of_range()


def _check_transfer(dev: "ScsiDevice", blocks: int, field: int) -> None:
    if blocks > dev.limits.max_transfer:
        raise invalid_cdb(field)


async def _read_done(dev: "ScsiDevice", pending: Awaitable[Data | None], length: int, lba: int,
                     placed: object = None) -> Data:
    """``placed``: what the READ answers when ``pending`` filled its
    buffers itself (returned None; LunIO.route_read)."""
    try:
        data = await pending
    except MediumError as e:
        raise read_failed(dev, e, lba) from e
    if data is None and placed is not None:
        return placed                      # type: ignore[return-value]
    if len(data) != length:
        raise RuntimeError(f"LunIO.read returned {len(data)} bytes, wanted {length}")
    return data


async def _read(dev: "ScsiDevice", offset: int, length: int, lba: int) -> Data:
    return await _read_done(dev, dev.lunio.read(offset, length), length, lba)


async def _write_done(dev: "ScsiDevice", pending: Awaitable[None], lba: int) -> None:
    try:
        await pending
    except MediumError as e:
        e.write = True
        raise medium_error(e, dev.block_size, lba) from e


async def _write(dev: "ScsiDevice", offset: int, data: Data, fua: bool, lba: int) -> None:
    await _write_done(dev, dev.lunio.write(offset, data, fua), lba)


def _miscompare(offset: int) -> CheckCondition:
    return CheckCondition(c.MISCOMPARE, c.ASC_MISCOMPARE_DURING_VERIFY, information=offset)


# -- capacity -------------------------------------------------------------------

async def read_capacity_10(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    cdb = d.raw
    if not cdb[8] & 0x01 and be(cdb, 2, 6) != 0:
        raise invalid_cdb(2)               # SBC-3: LBA must be 0 when PMI is 0
    last = max(dev.num_blocks - 1, 0)
    # More than 2^32 blocks: FFFFFFFFh tells the host to use READ CAPACITY(16).
    return struct.pack(">II", min(last, 0xFFFFFFFF), dev.block_size)


async def read_capacity_16(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    alloc = be(d.raw, 10, 14)
    last = max(dev.num_blocks - 1, 0)
    lbp = 0xC000 if dev.options.thin_provisioning else 0      # LBPME | LBPRZ
    data = struct.pack(">QIBBH", last, dev.block_size, 0,
                       dev.limits.physical_exponent & 0x0F, lbp) + bytes(16)
    return data[:alloc]


# -- reads and writes -------------------------------------------------------------

def read(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> object:
    """READ(6/10/12/16): the data at once (PLACED: into the transport's
    buffers) when the LunIO routes it straight from the store, a
    ReadInFlight when the store reads it straight into the buffer
    asynchronously, else the coroutine that waits for it."""
    cdb, lba, blocks = d.raw, d.lba, d.count
    if cdb[0] != c.READ_6 and cdb[1] & 0xE0:
        raise invalid_cdb(1, 7)            # RDPROTECT: no protection information
    check_range(dev, lba, blocks)
    _check_transfer(dev, blocks, d.count_at)
    if blocks == 0:
        return b""
    bs = dev.block_size
    n = blocks * bs
    into = cmd.into
    out: object
    if into is not None and (len(into[0]) == n if len(into) == 1 else sum(map(len, into)) == n):
        bufs, out = into, PLACED
    else:
        out = bytearray(n)
        bufs = [memoryview(out)]
    work = dev.lunio.route_read(lba * bs, bufs)
    if work is None:
        return out
    if work.__class__ is Future:
        return ReadInFlight(work, out, lba)     # type: ignore[arg-type]
    return _read_done(dev, work, n, lba, out)


def write(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> object:
    """WRITE(6/10/12/16): None at once when the LunIO wrote it straight to
    the store, else the coroutine that finishes it."""
    cdb, lba, blocks = d.raw, d.lba, d.count
    fua = False
    if cdb[0] != c.WRITE_6:
        if cdb[1] & 0xE0:
            raise invalid_cdb(1, 7)        # WRPROTECT
        fua = bool(cdb[1] & 0x08)
    check_range(dev, lba, blocks)
    _check_transfer(dev, blocks, d.count_at)
    if blocks == 0:
        return None
    fua = fua or not dev.mode.write_cache
    if dev.range_lock.exclusive_pending:
        # a COMPARE AND WRITE holds or waits for a range: take our turn
        return _write_blocks(dev, cmd, lba, blocks, fua)
    # Nothing is ordered against this write: if the LunIO can do it at once
    # it completes before anything else runs, which the shared range lock
    # would not change.
    bs = dev.block_size
    work = dev.lunio.route_write(lba * bs, data_out_view(cmd.data_out, blocks * bs), fua)
    if work is None:
        return None
    return _write_locked(dev, work, lba, blocks)


async def _write_locked(dev: "ScsiDevice", pending: Coroutine[Any, Any, None], lba: int,
                        blocks: int) -> None:
    """Await a write's LunIO work holding its range shared (COMPARE AND
    WRITE holds it exclusive)."""
    bs = dev.block_size
    lock = dev.range_lock
    req = lock.try_shared(lba * bs, blocks * bs)
    if req is None:
        try:
            req = await lock.acquire(lba * bs, blocks * bs)
        except BaseException:
            pending.close()                # never started: nothing to undo
            raise
    try:
        await _write_done(dev, pending, lba)
    finally:
        lock.release(req)


async def _write_blocks(dev: "ScsiDevice", cmd: ScsiCommand, lba: int, blocks: int,
                        fua: bool) -> None:
    bs = dev.block_size
    view = data_out_view(cmd.data_out, blocks * bs)
    await _write_locked(dev, dev.lunio.write(lba * bs, view, fua), lba, blocks)


async def write_and_verify(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    cdb, lba, blocks, lfield = d.raw, d.lba, d.count, d.count_at
    if cdb[1] & 0xE0:
        raise invalid_cdb(1, 7)
    if (cdb[1] >> 1) & 0x03 > 1:
        raise invalid_cdb(1, 2)            # BYTCHK 10b/11b are reserved here
    check_range(dev, lba, blocks)
    _check_transfer(dev, blocks, lfield)
    if blocks == 0:
        return None
    # "Verified on the medium" is what FUA guarantees; the bytes read back
    # would be the bytes just written, so no read-back compare is done.
    await _write_blocks(dev, cmd, lba, blocks, True)


async def verify(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    cdb, lba, blocks, lfield = d.raw, d.lba, d.count, d.count_at
    if cdb[1] & 0xE0:
        raise invalid_cdb(1, 7)            # VRPROTECT
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 2:
        raise invalid_cdb(1, 2)
    check_range(dev, lba, blocks)
    if blocks == 0:
        return None
    bs = dev.block_size
    if bytchk == 1:
        _check_transfer(dev, blocks, lfield)
        expected = data_out_view(cmd.data_out, blocks * bs)
        current = await _read(dev, lba * bs, blocks * bs, lba)
        diff = first_difference(current, expected)
        if diff >= 0:
            raise _miscompare(diff)
        return None
    pattern = data_out_view(cmd.data_out, bs) if bytchk == 3 else None
    # BYTCHK 0: read everything to surface medium errors; BYTCHK 3: compare
    # each block with the single Data-Out block.
    per = max(1, _CHUNK // bs)
    done = 0
    rep = bytes(pattern) * min(per, blocks) if pattern is not None else b""
    while done < blocks:
        n = min(per, blocks - done)
        current = await _read(dev, (lba + done) * bs, n * bs, lba + done)
        if pattern is not None:
            diff = first_difference(current, memoryview(rep)[:n * bs])
            if diff >= 0:
                raise _miscompare(diff % bs)    # offset in the Data-Out buffer
        done += n
    return None


async def pre_fetch(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    """PRE-FETCH(10/16): there is no cache of ours to load (the backend's
    page cache is not ours to steer), so after the range check: GOOD, which
    SBC-3 allows ("not enough cache" is reported as GOOD, not CONDITION MET)."""
    check_range(dev, d.lba, d.count)
    return None


async def synchronize_cache(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    check_range(dev, d.lba, d.count)
    # IMMED is honoured by simply finishing the flush before GOOD: the data
    # is durable when the host hears back either way.
    try:
        await dev.lunio.flush()
    except MediumError as e:
        e.write = True
        raise medium_error(e, dev.block_size, None) from e
    return None


# -- WRITE SAME, UNMAP ------------------------------------------------------------

async def write_same(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    cdb, lba, blocks, lfield = d.raw, d.lba, d.count, d.count_at
    sixteen = cdb[0] == c.WRITE_SAME_16
    flags = cdb[1]
    if flags & 0xE0:
        raise invalid_cdb(1, 7)            # WRPROTECT
    if flags & 0x10:
        raise invalid_cdb(1, 4)            # ANCHOR: ANC_SUP=0
    if flags & 0x04:
        raise invalid_cdb(1, 2)            # PBDATA (obsolete)
    if flags & 0x02:
        raise invalid_cdb(1, 1)            # LBDATA (obsolete)
    ndob = sixteen and bool(flags & 0x01)
    unmap = bool(flags & 0x08)
    if blocks == 0 or blocks > dev.limits.max_write_same:
        raise invalid_cdb(lfield)          # WSNZ=1: 0 blocks is not "to the end"
    check_range(dev, lba, blocks)
    bs = dev.block_size
    if ndob:
        block = bytes(bs)
    else:
        # Exactly one block of Data-Out: more is as wrong as less (the
        # initiator and the CDB disagree about what is being written).
        if data_len(cmd.data_out) > bs:
            raise short_data_out()
        block = bytes(data_out_view(cmd.data_out, bs))
    offset, length = lba * bs, blocks * bs
    zeros = block == bytes(bs)
    async with dev.range_lock.hold(offset, length):
        if unmap and zeros and dev.options.thin_provisioning:
            # LBPRZ=1: unmapped blocks read back as zeros, so unmapping is
            # writing the zero block. A non-zero block is written instead.
            await _unmap(dev, offset, length, lba)
            return None
        fua = not dev.mode.write_cache
        per = max(1, _CHUNK // bs)
        pattern = memoryview(block * min(per, blocks))
        done = 0
        while done < blocks:
            n = min(per, blocks - done)
            await _write(dev, offset + done * bs, pattern[:n * bs], fua, lba + done)
            done += n
    return None


async def _unmap(dev: "ScsiDevice", offset: int, length: int, lba: int) -> None:
    try:
        await dev.lunio.unmap(offset, length)
    except MediumError as e:
        e.write = True
        raise medium_error(e, dev.block_size, lba) from e


async def unmap(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    if not dev.options.thin_provisioning:
        raise invalid_opcode()             # LBPU=0: UNMAP is not supported
    if d.raw[1] & 0x01:
        raise invalid_cdb(1, 0)            # ANCHOR
    plen = d.count
    if plen == 0:
        return None
    if plen < 8:
        raise param_list_length_error()
    params = bytes(data_out_view(cmd.data_out, plen))
    data_len = be(params, 0, 2)
    desc_len = be(params, 2, 4)
    # SBC-3 5.28: lengths must agree with the parameter list length.
    if data_len + 2 > plen or desc_len + 8 > plen or data_len < desc_len + 6:
        raise param_list_length_error()
    count = desc_len // 16
    if count > dev.limits.max_unmap_descriptors:
        raise invalid_param(2)
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):               # validate every descriptor before any unmap
        at = 8 + 16 * i
        lba, blocks = struct.unpack_from(">QI", params, at)
        if blocks > dev.limits.max_unmap:
            raise invalid_param(at + 8)
        check_range(dev, lba, blocks)
        total += blocks
        if blocks:
            ranges.append((lba, blocks))
    if total > dev.limits.max_unmap:
        raise invalid_param(2)
    bs = dev.block_size
    for lba, blocks in ranges:
        async with dev.range_lock.hold(lba * bs, blocks * bs):
            await _unmap(dev, lba * bs, blocks * bs, lba)
    return None


# -- COMPARE AND WRITE ------------------------------------------------------------

async def compare_and_write(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    cdb, lba, blocks = d.raw, d.lba, d.count
    if cdb[1] & 0xE0:
        raise invalid_cdb(1, 7)
    if blocks > dev.limits.max_compare_and_write:
        raise invalid_cdb(13)
    bs = dev.block_size
    n = blocks * bs
    # Data-Out must be exactly verify + write data: with any other amount
    # the NUMBER OF LOGICAL BLOCKS field is what disagrees with the data.
    if data_len(cmd.data_out) != 2 * n:
        raise invalid_cdb(13)
    check_range(dev, lba, blocks)
    if blocks == 0:
        return None
    data = data_out_view(cmd.data_out, 2 * n)
    expected, new = data[:n], data[n:]
    fua = bool(cdb[1] & 0x08) or not dev.mode.write_cache
    # Exclusive: no overlapping write may land between the compare and the
    # write, and no other COMPARE AND WRITE may compare against stale data.
    async with dev.range_lock.hold(lba * bs, n, exclusive=True):
        current = await _read(dev, lba * bs, n, lba)
        diff = first_difference(current, expected)
        if diff >= 0:
            raise _miscompare(diff)
        await _write(dev, lba * bs, new, fua, lba)
    return None


# -- GET LBA STATUS -----------------------------------------------------------------

_LBA_STATUS_SPAN = 1 << 32     # bytes examined per command: enough, and bounded
_LBA_STATUS_MAX_DESCRIPTORS = 1024   # the host asks again from where we stopped


async def get_lba_status(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    lba = d.lba
    alloc = be(d.raw, 10, 14)
    if lba >= dev.num_blocks:
        raise lba_out_of_range()
    bs = dev.block_size
    end_block = min(dev.num_blocks, lba + _LBA_STATUS_SPAN // bs)
    if dev.options.thin_provisioning:
        runs = await dev.lunio.allocation(lba * bs, (end_block - lba) * bs)
    else:
        runs = [(lba * bs, (end_block - lba) * bs, True)]   # LBPME=0: all mapped
    # Byte runs to whole blocks: a block partly mapped counts as mapped.
    descs: list[list[int]] = []       # [start, end, status]
    pos = lba
    for off, length, mapped in runs:
        if mapped:
            s, e = off // bs, -(-(off + length) // bs)
        else:
            s, e = -(-off // bs), (off + length) // bs
        s, e = max(s, pos), min(e, end_block)
        if e <= s:
            continue
        if s > pos:                   # gap left by a partial block: mapped
            _append(descs, pos, s, 0)
        _append(descs, s, e, 0 if mapped else 1)
        pos = e
    if pos < end_block:               # runs stopped short: report the rest mapped
        _append(descs, pos, end_block, 0)
    out = bytearray()
    for s, e, status in descs[:_LBA_STATUS_MAX_DESCRIPTORS]:
        while e > s:                  # NUMBER OF LOGICAL BLOCKS is 32 bits
            n = min(e - s, 0xFFFFFFFF)
            out += struct.pack(">QIB3x", s, n, status)
            s += n
    data = struct.pack(">I", len(out) + 4) + bytes(4) + bytes(out)
    return data[:alloc]


def _append(descs: list[list[int]], s: int, e: int, status: int) -> None:
    if descs and descs[-1][1] == s and descs[-1][2] == status:
        descs[-1][1] = e
    else:
        descs.append([s, e, status])
