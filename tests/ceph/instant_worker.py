"""Subprocess for the kill -9 test of a fracture snapshot: an engine on
SQLite with a file source and an RBD clone.

  setup DIR LOCATION   make the pair (clone image created), sync, fracture
  write DIR LOCATION SEED
                       write the clone LU at random after the fracture (two at
                       a time), logging each write before it ("I off len")
                       and once acknowledged ("A off len"); print HALF when
                       half are acknowledged (writes go on) and WROTE when
                       all are, then wait to be killed: the lazy commit is
                       held off, so the exact delta bits of most writes never
                       reach disk
  recover DIR LOCATION start (recovering) and print the delta's extents and
                       the pair's instants as one JSON line
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys

from persistence.db import Database
from persistence.sqlite_store import SqliteMetadataStore
from restore_core import engine as engine_mod
from restore_core.engine import Engine
from restore_core.stores import open_store
from restore_core.stores.file import FileBlockStore
from restore_core.stores.owners import read_owner, write_owner
from restore_core.stores.rbd import RbdStore
from restore_core.stores.spec import RbdSpec

SIZE = 64 << 20
ES = 64 << 10
PAIR = "clone"
WRITES = 24


async def open_engine(d: str, location: str, create: bool = False) -> tuple[Engine, Database]:
    db = Database(os.path.join(d, "lr.db"), create=create)
    eng = Engine(SqliteMetadataStore(db))
    eng.add_volume("source", FileBlockStore(os.path.join(d, "source.img"), SIZE, create=create))
    owner = os.path.join(d, "clone.owner")
    store = open_store(RbdSpec.parse_location(location), SIZE, create=create,
                       stale_owner=read_owner(owner))
    assert isinstance(store, RbdStore) and store.owner is not None
    write_owner(owner, store.owner)
    eng.add_volume(PAIR, store)
    await eng.start()
    return eng, db


async def setup(d: str, location: str) -> None:
    with open(os.path.join(d, "source.img"), "wb") as f:
        f.write(random.Random(1).randbytes(SIZE))       # every clone object exists after the sync
    eng, db = await open_engine(d, location, create=True)
    pair = await eng.create_pair("source", PAIR, extent_size=ES)
    await eng.wait_job(pair.id, 300)
    await eng.fracture(pair.id)
    print(json.dumps(pair.instants), flush=True)
    await eng.close()
    db.close()


async def write(d: str, location: str, seed: int) -> None:
    engine_mod.LAZY_COMMIT_S = 3600.0       # only the region commits reach disk
    eng, _db = await open_engine(d, location)
    cio = eng.volume_io(PAIR)
    rnd = random.Random(seed)
    log = os.open(os.path.join(d, "writes.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    acked = [0]

    async def writer(todo: list[tuple[int, bytes]]) -> None:
        for off, data in todo:
            os.write(log, f"I {off} {len(data)}\n".encode())
            await cio.write(off, data, fua=rnd.random() < 0.3)
            os.write(log, f"A {off} {len(data)}\n".encode())
            acked[0] += 1
            if acked[0] == WRITES // 2:
                print("HALF", flush=True)
    writes = []
    for _ in range(WRITES):
        # two of the four 16 MiB regions, any alignment; the two writers'
        # ranges apart (one in each half of a region), so no two overlap
        n = rnd.choice([512, 4096, 3 * 4096, ES + 4096])
        half = len(writes) % 2
        off = rnd.choice([0, 32 << 20]) + half * (8 << 20) + rnd.randrange(0, (8 << 20) - n)
        writes.append((off, rnd.randbytes(n)))
    await asyncio.gather(writer(writes[0::2]), writer(writes[1::2]))
    print("WROTE", flush=True)
    await asyncio.sleep(3600)


async def recover(d: str, location: str) -> None:
    eng, db = await open_engine(d, location)
    pair = eng.pair(PAIR)
    print(json.dumps({"delta": pair.maps.delta.set_in(0, pair.nextents),
                      "instants": pair.instants}), flush=True)
    await eng.close()
    db.close()


def main() -> None:
    cmd, d, location = sys.argv[1:4]
    if cmd == "setup":
        asyncio.run(setup(d, location))
    elif cmd == "write":
        asyncio.run(write(d, location, int(sys.argv[4])))
    else:
        asyncio.run(recover(d, location))


if __name__ == "__main__":
    main()
