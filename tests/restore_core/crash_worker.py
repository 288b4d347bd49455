"""Subprocess for the kill -9 crash test: a real engine on SQLite and image
files runs a restore while a writer issues random host writes.

  setup DIR SEED PROTECTED [UNDO]
                             make source+clone, sync, fracture, change the
                             source, save the clone's image, start a restore
                             (UNDO: a keep-undo one; the source's image before
                             it is saved too)
  run DIR SEED RATE [LAST]   resume the restore (at RATE bytes/s, 0 = no
                             limit) under host writes; when it ends start
                             the next one (the clone never changes, so its
                             saved image stays the reference) -- with LAST,
                             exit once the current restore has ended
  run DIR SEED RATE abort|finish
                             keep-undo: resume the restore or abort; "abort"
                             aborts a running restore after a random delay;
                             a finished restore is always aborted; exit when
                             the abort has ended (the undo image is gone)

The writer logs "I seq off len" before each write and "A seq" after its
acknowledgement (O_APPEND; the page cache survives SIGKILL), so the checker
knows which writes were acknowledged and which were in flight, "R t" when a
new restore (job started at t) has begun and "X" when an abort has (no
write is in flight across a restore or abort start).
"""
from __future__ import annotations

import asyncio
import os
import random
import sys

from persistence.db import Database
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.blockstore import BlockStore
from restore_core.engine import Engine
from restore_core.stores import open_store
from restore_core.stores.file import FileBlockStore
from restore_core.stores.owners import read_owner, write_owner
from restore_core.stores.rbd import RbdStore
from restore_core.stores.spec import RbdSpec
from restore_core.stores.undo_images import StoreUndoImages

SIZE = 16 << 20
ES = 64 << 10
PAIR = "clone"
#: an RBD location (rbd:POOL/IMAGE:conf=..:id=..): the clone lives there
#: instead of in clone.img (tests/ceph runs the same test that way)
CLONE_RBD_ENV = "LR_CRASH_CLONE_RBD"


def write_data(seq: int, n: int) -> bytes:
    return random.Random(seq).randbytes(n)


def paths(d: str) -> dict[str, str]:
    return {k: os.path.join(d, v) for k, v in dict(
        db="lr.db", src="source.img", cln="clone.img", orig="clone.orig",
        log="writes.log", owner="clone.owner", pre="source.pre",
        undo="undo").items()}


def open_clone(d: str, create: bool) -> BlockStore:
    p = paths(d)
    where = os.environ.get(CLONE_RBD_ENV)
    if not where:
        return FileBlockStore(p["cln"], SIZE, create=create)
    # as the daemon does: break only the lock this worker's killed run held
    store = open_store(RbdSpec.parse_location(where), SIZE, create=create,
                       stale_owner=read_owner(p["owner"]))
    assert isinstance(store, RbdStore) and store.owner is not None
    write_owner(p["owner"], store.owner)
    return store


async def open_engine(d: str, create: bool = False) -> tuple[Engine, Database]:
    p = paths(d)
    db = Database(p["db"], create=create)
    eng = Engine(SqliteMetadataStore(db), StoreUndoImages(p["undo"]))
    eng.add_volume("source", FileBlockStore(p["src"], SIZE, create=create))
    eng.add_volume(PAIR, open_clone(d, create))
    await eng.start()
    return eng, db


async def setup(d: str, seed: int, protected: bool, keep_undo: bool) -> None:
    rnd = random.Random(seed)
    p = paths(d)
    with open(p["src"], "wb") as f:
        f.write(rnd.randbytes(SIZE))
    eng, db = await open_engine(d, create=True)
    pair = await eng.create_pair("source", PAIR, extent_size=ES)
    await eng.wait_job(pair.id, 120)
    await eng.fracture(pair.id)
    sio = eng.volume_io("source")
    for _ in range(40):   # change about half the extents after the fracture
        off = rnd.randrange(0, SIZE - 2 * ES)
        await sio.write(off, rnd.randbytes(rnd.randrange(1, 2 * ES)))
    await sio.flush()
    await eng.volume_io(PAIR).flush()
    with open(p["orig"], "wb") as f:
        f.write(await eng.volumes[PAIR].store.read(0, SIZE))
    await sio.flush()
    with open(p["pre"], "wb") as f:
        f.write(await eng.volumes["source"].store.read(0, SIZE))
    await eng.restore(pair.id, protected=protected, paused=True, keep_undo=keep_undo)
    await eng.close()
    db.close()


async def run(d: str, seed: int, rate: int, last: bool, undo: str | None = None) -> None:
    p = paths(d)
    eng, db = await open_engine(d)
    pair = eng.pair(PAIR)
    sio = eng.volume_io("source")
    log = os.open(p["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    # sequence numbers continue across restarts
    seq_base = 0
    with open(p["log"]) as f:
        for line in f:
            if line.startswith("I "):
                seq_base = max(seq_base, int(line.split()[1]) + 1)
    rnd = random.Random(seed * 7919 + seq_base)
    inflight: list[tuple[int, int]] = []
    counter = [seq_base]
    stop = [False]
    print("running", flush=True)

    async def writer() -> None:
        while pair.job is not None and not stop[0]:
            while True:
                n = rnd.choice([512, 4096, 4096 * 3, ES, ES + 4096, 2 * ES])
                off = rnd.randrange(0, (SIZE - n) // 512) * 512
                if rnd.random() < 0.3:
                    off = off // ES * ES   # whole-extent writes (fills)
                if not any(off < o + ln and o < off + n for o, ln in inflight):
                    break
            seq = counter[0]
            counter[0] += 1
            inflight.append((off, n))
            os.write(log, f"I {seq} {off} {n}\n".encode())
            await sio.write(off, write_data(seq, n), fua=rnd.random() < 0.2)
            os.write(log, f"A {seq}\n".encode())
            inflight.remove((off, n))
            await asyncio.sleep(rnd.random() * 0.03)

    async def abort(writers: list[asyncio.Future[None]]) -> None:
        """Abort with no write in flight, so the log says which writes
        came before it."""
        stop[0] = True
        await asyncio.gather(*writers)
        stop[0] = False
        await eng.abort(PAIR)
        os.write(log, b"X\n")

    async def abort_later(writers: list[asyncio.Future[None]]) -> None:
        await asyncio.sleep(rnd.uniform(0.0, 0.3))
        if pair.state.value == "restoring":
            await abort(writers)
            writers[:] = [asyncio.ensure_future(writer()) for _ in range(2)]

    while undo is not None:
        if pair.job is None:
            if pair.undo is None:
                break                 # the abort has ended
            await abort([])
        await eng.set_throttle(PAIR, rate=rate, batch_extents=1, depth=1)
        if pair.job is not None and pair.job.paused:
            await eng.resume(PAIR)
        writers = [asyncio.ensure_future(writer()) for _ in range(2)]
        if undo == "abort":
            await abort_later(writers)
        await eng.wait_job(PAIR)
        await asyncio.gather(*writers)
    while undo is None:
        if pair.job is None:
            if last:
                break
            await eng.restore(PAIR, protected=True)
            assert pair.job is not None
            os.write(log, f"R {pair.job.started_at!r}\n".encode())
        await eng.set_throttle(PAIR, rate=rate, batch_extents=1, depth=1)
        if pair.job.paused:
            await eng.resume(PAIR)
        writers = [asyncio.ensure_future(writer()) for _ in range(2)]
        await eng.wait_job(PAIR)
        await asyncio.gather(*writers)
    await eng.close()
    db.close()
    print("DONE", flush=True)


def main() -> None:
    cmd, d, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "setup":
        asyncio.run(setup(d, seed, sys.argv[4] == "1", sys.argv[5:] == ["undo"]))
    else:
        mode = sys.argv[5] if len(sys.argv) > 5 else None
        asyncio.run(run(d, seed, int(sys.argv[4]), mode == "last",
                        mode if mode in ("abort", "finish") else None))


if __name__ == "__main__":
    main()
