import asyncio
import os
import sqlite3

import pytest

from persistence.config import ConfigStore, SqliteReservationStore, VolumeRecord
from persistence.db import SCHEMA_VERSION, Database, DatabaseError
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.blockstore import MemoryBlockStore
from restore_core.engine import Engine
from restore_core.metadata import Transaction


def test_missing_database_is_refused_without_creating_it(tmp_path):
    p = tmp_path / "lr.db"
    with pytest.raises(DatabaseError, match="no liverestore database"):
        Database(str(p))
    assert not p.exists()


def test_corrupt_database_is_refused_and_left_alone(tmp_path):
    p = tmp_path / "lr.db"
    p.write_bytes(b"this is not sqlite" * 100)
    before = p.read_bytes()
    with pytest.raises(DatabaseError, match="not an SQLite database"):
        Database(str(p))
    assert p.read_bytes() == before
    p.write_bytes(b"")
    with pytest.raises(DatabaseError, match="empty"):
        Database(str(p))


def test_damaged_pages_fail_integrity_check(tmp_path):
    p = tmp_path / "lr.db"
    d = Database(str(p), create=True)
    m = SqliteMetadataStore(d)
    m.commit(Transaction(maps={"x/delta": {c: os.urandom(4096) for c in range(64)}}))
    d.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    d.close()
    raw = bytearray(p.read_bytes())
    raw[4096 * 3:4096 * 3 + 2000] = os.urandom(2000)   # scribble over a b-tree page
    p.write_bytes(raw)
    with pytest.raises(DatabaseError):
        d2 = Database(str(p))
        SqliteMetadataStore(d2).load()


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "lr.db"
    Database(str(p), create=True).close()
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with pytest.raises(DatabaseError, match="newer"):
        Database(str(p))


def test_foreign_sqlite_file_is_refused(tmp_path):
    p = tmp_path / "other.db"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(DatabaseError, match="not a liverestore database"):
        Database(str(p))


def test_wal_and_full_sync(tmp_path):
    d = Database(str(tmp_path / "lr.db"), create=True)
    assert d.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert d.conn.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL


def test_config_round_trip(tmp_path):
    d = Database(str(tmp_path / "lr.db"), create=True)
    cfg = ConfigStore(d)
    cfg.put_volume(VolumeRecord("db1", "/x/db1.img", 1 << 30, 65536))
    assert cfg.volume("db1").size == 1 << 30
    assert [v.name for v in cfg.volumes()] == ["db1"]
    cfg.put_target("iqn.2026-11.org.example:t", {"luns": {"0": "db1"}})
    assert cfg.targets()["iqn.2026-11.org.example:t"]["luns"] == {"0": "db1"}
    cfg.set("portal", ["127.0.0.1", 3260])
    assert cfg.get("portal") == ["127.0.0.1", 3260]
    rs = SqliteReservationStore(cfg, "db1")
    rs.save({"generation": 3, "keys": ["a"]})
    assert rs.load() == {"generation": 3, "keys": ["a"]}
    cfg.delete_volume("db1")
    assert cfg.volume("db1") is None


def test_engine_state_survives_reopen(tmp_path):
    path = str(tmp_path / "lr.db")
    size = 64 * 4096
    src, cln = MemoryBlockStore(size, "s"), MemoryBlockStore(size, "c")
    src.current[:] = os.urandom(size)

    async def first():
        d = Database(path, create=True)
        eng = Engine(SqliteMetadataStore(d))
        sio = eng.add_volume("s", src)
        eng.add_volume("c", cln)
        await eng.start()
        p = await eng.create_pair("s", "c", extent_size=4096)
        await eng.wait_job(p.id, 10)
        await eng.fracture(p.id)
        await sio.write(5 * 4096, b"z" * 4096)
        await eng.restore(p.id, paused=True)
        await sio.write(9 * 4096 + 1, b"y")
        await eng.close()
        d.close()

    async def second():
        d = Database(path)
        eng = Engine(SqliteMetadataStore(d))
        eng.add_volume("s", src)
        eng.add_volume("c", cln)
        await eng.start()
        p = eng.pair("c")
        assert p.state.value == "restoring" and p.job.paused
        assert p.maps.todo.set_in(0, 64) == [5]
        assert p.maps.marks.set_in(0, 64) == [9]
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert p.maps.delta.set_in(0, 64) == [9]
        await eng.close()
        d.close()

    asyncio.run(first())
    asyncio.run(second())
