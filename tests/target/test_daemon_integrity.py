"""Issue 10 item 4 against a real `liverestore serve`: metadata damage done
while the daemon is stopped, and a database rolled back by deleting its
-wal after a kill -9, are noticed at the next start; the SCSI layer refuses
a held pair's LUs until the admin acknowledges."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time

from tests.support import IQN, Daemon
from tests.target.iscsi.initiator import Initiator

ES = 64 << 10
BLOCK = 512
NOT_READY = 0x2


def setup(d: Daemon) -> None:
    d.cli("volume", "create", "db1", "--size", "8M")
    d.cli("volume", "create", "db1-clone", "--size", "8M")
    d.cli("pair", "create", "db1", "db1-clone", "--wait")
    d.cli("pair", "fracture", "db1-clone")
    d.cli("export", "create", IQN, "--lun", "0=db1", "--lun", "1=db1-clone")


async def _session(port: int, fn):
    i = Initiator("127.0.0.1", port)
    await i.login(IQN)
    try:
        for lun in (0, 1):             # consume the power-on unit attentions
            for _ in range(3):
                r = await i.scsi(lun, bytes(6))
                if not (r.status == 2 and r.sense[2] & 0x0F == 0x6):
                    break
        return await fn(i)
    finally:
        await i.close()


def write_extents(d: Daemon, extents: list[int]) -> None:
    async def go(i: Initiator) -> None:
        for e in extents:
            await i.write(0, e * ES // BLOCK, os.urandom(ES))
    asyncio.run(_session(d.port, go))


def unit_ready(d: Daemon, lun: int) -> tuple[int, bytes]:
    async def go(i: Initiator):
        r = await i.scsi(lun, bytes(6))
        return r.status, r.sense
    return asyncio.run(_session(d.port, go))


def images(d: Daemon) -> tuple[bytes, bytes]:
    vols = os.path.join(d.dir, "volumes")
    with open(os.path.join(vols, "db1.img"), "rb") as a, \
            open(os.path.join(vols, "db1-clone.img"), "rb") as b:
        return a.read(), b.read()


def restart(d: Daemon) -> None:
    d.init = False
    d.start()


def show(d: Daemon, *args: str):
    return json.loads(d.cli(*args, "--json").stdout)


def test_flipped_map_bits_found_on_start_and_synced(daemon):
    setup(daemon)
    write_extents(daemon, list(range(0, 128, 4)))       # 32 extents differ
    assert daemon.stop() == 0
    db = sqlite3.connect(os.path.join(daemon.dir, "liverestore.db"))
    for key in ("db1-clone/delta", "db1-clone/intent"):
        row = db.execute("SELECT blob FROM map_chunks WHERE map_key = ?", (key,)).fetchone()
        if row is None:
            continue
        blob = bytes(row[0])
        flipped = bytes(b ^ 0xFF for b in blob) if blob else bytes(4096)
        db.execute("UPDATE map_chunks SET blob = ? WHERE map_key = ?", (flipped, key))
    db.commit()
    assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    db.close()

    restart(daemon)
    a, b = images(daemon)
    assert a != b
    daemon.cli("pair", "sync", "db1-clone", "--wait")
    a, b = images(daemon)
    assert a == b, "a sync after the damage left extents different"
    log = open(daemon.log).read()
    assert "pair db1-clone: map delta chunk 0 failed its checksum" in log
    assert "Traceback" not in log


def test_damaged_reason_shown_until_the_next_job(daemon):
    setup(daemon)
    write_extents(daemon, [3])
    daemon.stop()
    db = sqlite3.connect(os.path.join(daemon.dir, "liverestore.db"))
    db.execute("UPDATE map_chunks SET blob = x'00' WHERE map_key = 'db1-clone/delta'")
    db.commit()
    db.close()
    restart(daemon)
    p = show(daemon, "pair", "show", "db1-clone")
    assert "failed their checksum" in p["damaged"]
    assert "DAMAGED" in daemon.cli("pair", "list").stdout
    assert show(daemon, "status")["pairs"][0]["damaged"]
    daemon.cli("pair", "sync", "db1-clone", "--wait")
    assert show(daemon, "pair", "show", "db1-clone")["damaged"] is None


def test_deleted_wal_after_kill9_holds_the_pair_until_acknowledged(daemon):
    setup(daemon)
    daemon.stop()                     # graceful: everything so far is in the main file
    restart(daemon)
    write_extents(daemon, list(range(20, 70)))          # 50 extents, tracked in the WAL only
    daemon.cli("volume", "create", "late", "--size", "1M")
    time.sleep(1.5)                   # the lazy commit makes the exact delta durable
    daemon.stop(signal.SIGKILL)
    dbpath = os.path.join(daemon.dir, "liverestore.db")
    os.unlink(dbpath + "-wal")
    if os.path.exists(dbpath + "-shm"):
        os.unlink(dbpath + "-shm")

    restart(daemon)
    status, sense = unit_ready(daemon, 0)
    assert status == 2 and sense[2] & 0x0F == NOT_READY, (status, sense.hex())
    status, sense = unit_ready(daemon, 1)
    assert status == 2 and sense[2] & 0x0F == NOT_READY
    vol = show(daemon, "volume", "show", "db1")
    assert vol["access"] == "not-ready" and "acknowledge" in vol["access_reason"]
    st = show(daemon, "status")
    assert "late" in st["rollback"]["vanished_volumes"]
    assert st["rollback"]["vanished_volumes"]["late"].endswith("late.img")
    assert st["rollback"]["held_pairs"] == ["db1-clone"]
    assert "ROLLBACK" in daemon.cli("status").stdout
    r = daemon.cli("pair", "sync", "db1-clone", ok=False)
    assert r.returncode == 1 and "acknowledge" in r.stderr and "Traceback" not in r.stderr
    log = open(daemon.log).read()
    assert "rolled back" in log and "late.img" in log

    r = daemon.cli("pair", "acknowledge", "db1-clone")
    assert "128 extents" in r.stdout and "8.0 MiB" in r.stdout, r.stdout
    status, _ = unit_ready(daemon, 0)
    assert status == 0
    daemon.cli("pair", "sync", "db1-clone", "--wait")
    a, b = images(daemon)
    assert a == b
    assert show(daemon, "status")["rollback"]["vanished_volumes"] == {"late": os.path.join(
        daemon.dir, "volumes", "late.img")}
    assert "Traceback" not in open(daemon.log).read()
