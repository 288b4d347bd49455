"""LunIO errors become sense data in one place, and the engine's host I/O
class is served by the SCSI layer as it is (no adapter in between)."""
from __future__ import annotations

from restore_core.lunio import LunIOError, MediumError
from target.scsi import ScsiDevice
from target.scsi.lunio_access import map_lunio_error
from target.scsi.sense import CheckCondition
from tests.restore_core.util import ES, Rig, pattern

from .util import IDENT, asynctest, cdb10, check, info_of, ready, send

BS = 512


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


def test_every_lunio_error_has_its_sense():
    # A new LunIOError without a mapping would reach hosts as HARDWARE ERROR
    # with a traceback in the log.
    subs = _all_subclasses(LunIOError)
    assert subs
    for cls in subs:
        e = cls("x") if cls is not MediumError else cls("x", 1024, write=True)
        assert isinstance(map_lunio_error(e, BS), CheckCondition), cls


@asynctest
async def test_engine_volume_io_errors_reach_hosts_as_sense():
    r = Rig(16)
    eng = await r.boot()
    src = ScsiDevice(r.sio, IDENT, block_size=BS)
    cln = ScsiDevice(r.cios[0], IDENT, block_size=BS)
    await ready(src)
    await ready(cln)
    p = await r.fractured_pair()
    await r.sio.write(0, pattern(1, 4 * ES))
    await eng.restore(p.id, paused=True)
    await ready(src)                                  # the restore's unit attention
    await ready(cln)
    check(await send(cln, cdb10(0x28, 0, 1)), 0x2, 0x04, 0x03)         # NOT READY
    r.cln.fail_at = {2 * ES + 7}                      # an unrestored extent is read from the clone
    resp = await send(src, cdb10(0x28, 2 * ES // BS, 1))
    check(resp, 0x3, 0x11, 0x00)                      # MEDIUM ERROR, unrecovered read
    assert info_of(resp.sense) == (2 * ES + 7) // BS
    r.cln.fail_at = set()
    await eng.resume(p.id)
    await eng.wait_job(p.id, 10)
    await eng.sync(p.id)
    await ready(cln)
    check(await send(cln, cdb10(0x2A, 0, 1), bytes(BS)), 0x7, 0x27, 0x00)   # DATA PROTECT
    await eng.close()
