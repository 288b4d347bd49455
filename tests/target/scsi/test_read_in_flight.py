"""A READ whose store reads straight into its buffer asynchronously
(BlockStore.start_readinto, an RBD image's): ScsiDevice.submit answers it
with a Deferred: the store's future and what makes the answer once it is
done -- no coroutine -- the data, or the sense the coroutine path would
give; an aborted one (its future cancelled) lets the store finish, and
nothing is answered."""
import asyncio

from restore_core.blockstore import BlockStoreError, StoreFencedError
from restore_core.plain_lunio import PlainLunIO
from target.scsi import ScsiDevice
from target.scsi.api import Deferred, ScsiCommand, ScsiResponse
from tests.restore_core.test_direct_read import AsyncReadStore

from .util import IDENT, NX_A, asynctest, cdb10, check, good, info_of

BS = 512


def _device() -> tuple[ScsiDevice, AsyncReadStore]:
    store = AsyncReadStore(64 * BS, "async")
    store.current[:] = bytes(range(256)) * (64 * BS // 256)
    return ScsiDevice(PlainLunIO(store), IDENT, block_size=BS), store


def _read(dev: ScsiDevice, lba: int, blocks: int) -> Deferred:
    cmd = ScsiCommand(cdb10(0x28, lba, blocks), 0, NX_A, None, blocks * BS)
    answer = dev.submit(cmd)
    assert answer.__class__ is Deferred, type(answer)           # not a coroutine
    return answer


async def _settled(dev: ScsiDevice, store: AsyncReadStore, lba: int, blocks: int,
                   fail: BlockStoreError | None = None) -> ScsiResponse:
    answer = _read(dev, lba, blocks)
    assert not answer.future.done()
    store.complete(fail)
    return await answer


@asynctest
async def test_a_read_in_flight_is_answered_from_its_completion():
    dev, store = _device()
    dev.submit(ScsiCommand(bytes(6), 0, NX_A))             # the power-on unit attention
    data = good(await _settled(dev, store, 3, 2))
    assert data == bytes(store.current[3 * BS:5 * BS])
    assert dev.stats.commands[0] == 1 and dev.stats.bytes[0] == 2 * BS      # READ, counted once


@asynctest
async def test_a_failed_read_in_flight_gets_the_sense_of_the_coroutine_path():
    dev, store = _device()
    dev.submit(ScsiCommand(bytes(6), 0, NX_A))
    # no offset from the store: the READ's own LBA, as _read_done gives it
    r = await _settled(dev, store, 7, 1, BlockStoreError("timed out", None))
    check(r, 0x03, 0x11, 0x00)                               # MEDIUM ERROR, UNRECOVERED READ ERROR
    assert info_of(r.sense) == 7
    r = await _settled(dev, store, 7, 2, BlockStoreError("bad object", 8 * BS))
    check(r, 0x03, 0x11, 0x00)
    assert info_of(r.sense) == 8
    r = await _settled(dev, store, 0, 1, StoreFencedError("another client took the lock"))
    check(r, 0x02, 0x04, 0x03)        # NOT READY, MANUAL INTERVENTION REQUIRED: fenced


@asynctest
async def test_an_aborted_read_in_flight_lets_the_store_finish_unanswered():
    dev, store = _device()
    dev.submit(ScsiCommand(bytes(6), 0, NX_A))
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    answer = _read(dev, 0, 1)
    waiter = asyncio.ensure_future(answer)        # as a transport that awaits it (TCMU)
    await asyncio.sleep(0)
    waiter.cancel()                               # ABORT TASK: cancels the store's future
    await asyncio.sleep(0)
    assert answer.future.cancelled() and waiter.cancelled()
    store.complete()                              # the store finishes: nobody answers
    await asyncio.sleep(0)
    assert errors == [] and dev.stats.commands[0] == 0
    assert good(await _settled(dev, store, 1, 1)) == bytes(store.current[BS:2 * BS])
