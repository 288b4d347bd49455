"""Issue 10 item 4: metadata damage and a rolled-back database are noticed.

Map chunks and pair records carry checksums; a chunk that fails is widened
to the safe side (its extents are copied by the next job) and the pair is
marked damaged. A database older than the generation file (a deleted -wal,
an old copy restored) holds the pairs that changed since until the admin
acknowledges them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3

import pytest

from persistence.config import ConfigStore, VolumeRecord
from persistence.db import SCHEMA_VERSION, Database, _v1
from persistence.generation import FILE_NAME
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.blockstore import MemoryBlockStore
from restore_core.engine import Engine, EngineError
from restore_core.extentmap import CHUNK_BITS
from restore_core.lunio import Access, NotReadyError
from restore_core.pair import PairState

ES = 4096
N = 64
SIZE = N * ES


def stores() -> tuple[MemoryBlockStore, MemoryBlockStore]:
    src, cln = MemoryBlockStore(SIZE, "s"), MemoryBlockStore(SIZE, "c")
    src.current[:] = os.urandom(SIZE)
    return src, cln


async def open_engine(path: str, src, cln, create: bool = False) -> tuple[Engine, Database]:
    d = Database(path, create=create)
    eng = Engine(SqliteMetadataStore(d))
    eng.add_volume("s", src)
    eng.add_volume("c", cln)
    await eng.start()
    return eng, d


async def fractured_with_writes(path: str, src, cln, extents: range) -> None:
    """A synchronized-then-fractured pair whose source changed in ``extents``."""
    eng, d = await open_engine(path, src, cln, create=True)
    p = await eng.create_pair("s", "c", extent_size=ES)
    await eng.wait_job(p.id, 10)
    await eng.fracture(p.id)
    sio = eng.volume_io("s")
    for e in extents:
        await sio.write(e * ES, os.urandom(ES))
    await eng.close()
    d.close()


def flip_bits(path: str, map_key: str) -> None:
    """Invert every bit of the map's chunk 0 behind the database's back:
    SQLite's own checks cannot see it."""
    c = sqlite3.connect(path)
    (blob,) = c.execute("SELECT blob FROM map_chunks WHERE map_key = ? AND chunk = 0",
                        (map_key,)).fetchone()
    # The all-ones marker (an empty blob) flips to explicit zero bits.
    flipped = bytes(b ^ 0xFF for b in blob) if blob else bytes(CHUNK_BITS // 8)
    c.execute("UPDATE map_chunks SET blob = ? WHERE map_key = ? AND chunk = 0",
              (flipped, map_key))
    c.commit()
    assert c.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    c.close()


def test_flipped_delta_bits_are_widened_and_synced(tmp_path, caplog):
    path = str(tmp_path / "lr.db")
    src, cln = stores()
    changed = range(10, 20)
    asyncio.run(fractured_with_writes(path, src, cln, changed))
    assert bytes(src.current) != bytes(cln.current)
    flip_bits(path, "c/delta")
    flip_bits(path, "c/intent")      # else the dirty region alone would cover it

    async def check():
        caplog.set_level(logging.ERROR)
        eng, d = await open_engine(path, src, cln)
        p = eng.pair("c")
        await eng.sync(p.id)
        await eng.wait_job(p.id, 10)
        # What the flipped bits hid was copied all the same.
        assert bytes(src.current) == bytes(cln.current)
        assert p.state is PairState.SYNCHRONIZED and p.damaged is None   # cleared by the job
        await eng.close()
        d.close()

    asyncio.run(check())
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("pair c: map delta chunk 0 failed its checksum" in m for m in lines), lines


def test_damaged_chunk_is_rewritten_and_pair_marked_until_next_job(tmp_path):
    path = str(tmp_path / "lr.db")
    src, cln = stores()
    asyncio.run(fractured_with_writes(path, src, cln, range(3, 5)))
    flip_bits(path, "c/delta")

    async def first():
        eng, d = await open_engine(path, src, cln)
        p = eng.pair("c")
        assert "map delta chunk(s) 0 failed their checksum" in p.damaged
        assert p.delta.count() == N                  # the whole chunk: "may differ"
        await eng.close()
        d.close()

    async def second():
        eng, d = await open_engine(path, src, cln)   # rewritten with a good checksum
        p = eng.pair("c")
        assert p.damaged and p.delta.count() == N    # the mark survives a restart
        await eng.close()
        d.close()

    asyncio.run(first())
    asyncio.run(second())


def test_damaged_done_chunk_counts_as_not_copied(tmp_path):
    """A progress map's safe side is empty: the restore copies again."""
    path = str(tmp_path / "lr.db")
    src, cln = stores()
    asyncio.run(fractured_with_writes(path, src, cln, range(0, 40)))

    async def restore_half():
        eng, d = await open_engine(path, src, cln)
        p = eng.pair("c")
        p.throttle.batch_extents = 1
        await eng.restore(p.id, paused=True)
        # copy 20 extents by hand, as the copier would: done bits made durable
        await p.copier.ensure_copied(0, 20)
        await eng.close()
        d.close()

    asyncio.run(restore_half())
    c = sqlite3.connect(path)
    (blob,) = c.execute("SELECT blob FROM map_chunks WHERE map_key = 'c/done'").fetchone()
    c.execute("UPDATE map_chunks SET blob = ? WHERE map_key = 'c/done'",
              (bytes(len(blob) * [0xFF]),))          # claims everything was restored
    c.commit()
    c.close()

    async def check():
        eng, d = await open_engine(path, src, cln)
        p = eng.pair("c")
        assert p.done.count() == 0 and p.damaged
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        assert bytes(src.current) == bytes(cln.current)
        await eng.close()
        d.close()

    asyncio.run(check())


def test_damaged_pair_record_holds_the_pair(tmp_path):
    path = str(tmp_path / "lr.db")
    src, cln = stores()
    asyncio.run(fractured_with_writes(path, src, cln, range(3, 5)))
    c = sqlite3.connect(path)
    (rec,) = c.execute("SELECT record FROM pairs WHERE id = 'c'").fetchone()
    assert '"state": "fractured"' in rec
    c.execute("UPDATE pairs SET record = ? WHERE id = 'c'",
              (rec.replace('"state": "fractured"', '"state": "synchronized"'),))
    c.commit()
    c.close()

    async def check():
        eng, d = await open_engine(path, src, cln)
        p = eng.pair("c")
        assert p.hold and "checksum" in p.hold
        assert eng.volume_io("s").access_state().access is Access.NOT_READY
        with pytest.raises(EngineError, match="acknowledge"):
            await eng.sync(p.id)
        await eng.acknowledge(p.id)
        assert p.state is PairState.FRACTURED and p.delta.count() == N
        await eng.sync(p.id)
        await eng.wait_job(p.id, 10)
        assert bytes(src.current) == bytes(cln.current)
        await eng.close()
        d.close()

    asyncio.run(check())


def test_unusable_damaged_pair_record_does_not_stop_the_start(tmp_path, caplog):
    path = str(tmp_path / "lr.db")
    src, cln = stores()
    asyncio.run(fractured_with_writes(path, src, cln, range(3, 5)))
    c = sqlite3.connect(path)
    (rec,) = c.execute("SELECT record FROM pairs WHERE id = 'c'").fetchone()
    c.execute("UPDATE pairs SET record = ? WHERE id = 'c'",
              (rec.replace(f'"size": {SIZE}', f'"size": {SIZE * 2}'),))
    c.commit()
    c.close()

    async def check():
        eng, d = await open_engine(path, src, cln)
        assert eng.pairs == {}
        await eng.close()
        d.close()

    caplog.set_level(logging.ERROR)
    asyncio.run(check())
    assert any("damaged record cannot be used" in r.getMessage() for r in caplog.records)


def rolled_back_copy(state: str, into: str) -> str:
    """What deleting the -wal after a kill -9 leaves: the main file (as of
    the last checkpoint) and the generation file written since."""
    os.makedirs(into)
    shutil.copyfile(os.path.join(state, "lr.db"), os.path.join(into, "lr.db"))
    shutil.copyfile(os.path.join(state, FILE_NAME), os.path.join(into, FILE_NAME))
    return os.path.join(into, "lr.db")


def test_rolled_back_database_holds_changed_pairs_until_acknowledged(tmp_path):
    state = str(tmp_path / "state")
    os.makedirs(state)
    path = os.path.join(state, "lr.db")
    src, cln = stores()

    async def first():
        eng, d = await open_engine(path, src, cln, create=True)
        p = await eng.create_pair("s", "c", extent_size=ES)
        await eng.wait_job(p.id, 10)
        await eng.fracture(p.id)
        ConfigStore(d).put_volume(VolumeRecord("old", "/images/old.img", SIZE, ES))
        d.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # After the checkpoint: only in the WAL, lost with it.
        sio = eng.volume_io("s")
        for e in range(5, 55):
            await sio.write(e * ES, os.urandom(ES))
        await eng.committer.commit()
        await eng.fracture(p.id)                   # commits the exact delta
        ConfigStore(d).put_volume(VolumeRecord("late", "/images/late.img", SIZE, ES))
        ConfigStore(d).delete_volume("old")
        return rolled_back_copy(state, str(tmp_path / "rolled"))

    copy = asyncio.run(first())

    async def second():
        eng, d = await open_engine(copy, src, cln)
        assert d.rollback is not None
        p = eng.pair("c")
        assert p.hold and "rolled back" in p.hold
        for name in ("s", "c"):
            st = eng.volume_io(name).access_state()
            assert st.access is Access.NOT_READY and "acknowledge" in st.reason
        with pytest.raises(NotReadyError):
            await eng.volume_io("s").write(0, b"x" * 512)
        assert not eng.volume_io("s").try_write(0, [memoryview(b"x" * 512)])
        for op in (eng.sync, eng.restore, eng.fracture):
            with pytest.raises(EngineError, match="acknowledge"):
                await op(p.id)
        rep = d.rollback_report()
        assert rep["vanished_volumes"] == {"late": "/images/late.img"}
        assert rep["held_pairs"] == ["c"]
        assert rep["resurrected_volumes"] == {"old": "/images/old.img"}
        await eng.close()
        d.close()

    async def third():
        # Still held after a restart (the hold is in the pair record), and
        # no longer a rollback: the database moved past the file.
        eng, d = await open_engine(copy, src, cln)
        assert d.rollback is None
        p = eng.pair("c")
        assert p.hold
        await eng.acknowledge(p.id)
        assert eng.volume_io("s").access_state().access is Access.READ_WRITE
        assert p.delta.count() == N
        await eng.sync(p.id)
        await eng.wait_job(p.id, 10)
        assert bytes(src.current) == bytes(cln.current)
        await eng.close()
        d.close()

    asyncio.run(second())
    asyncio.run(third())


def test_rollback_holds_only_the_pairs_that_changed_after_it(tmp_path):
    state = str(tmp_path / "state")
    os.makedirs(state)
    path = os.path.join(state, "lr.db")
    vols = {n: MemoryBlockStore(SIZE, n) for n in ("s", "c", "s2", "c2")}

    async def engine(db_path: str, create: bool = False) -> tuple[Engine, Database]:
        d = Database(db_path, create=create)
        eng = Engine(SqliteMetadataStore(d))
        for n, st in vols.items():
            eng.add_volume(n, st)
        await eng.start()
        return eng, d

    async def first():
        eng, d = await engine(path, create=True)
        for s_, c_ in (("s", "c"), ("s2", "c2")):
            p = await eng.create_pair(s_, c_, extent_size=ES)
            await eng.wait_job(p.id, 10)
            await eng.fracture(p.id)
        d.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await eng.volume_io("s").write(0, b"x" * ES)      # only pair c changes after it
        await eng.committer.commit()
        return rolled_back_copy(state, str(tmp_path / "rolled"))

    copy = asyncio.run(first())

    async def second():
        eng, d = await engine(copy)
        assert eng.pair("c").hold and eng.pair("c2").hold is None
        assert eng.volume_io("c2").access_state().access is Access.READ_WRITE
        await eng.close()
        d.close()

    asyncio.run(second())


def test_torn_or_missing_generation_file_is_not_a_rollback(tmp_path, caplog):
    path = str(tmp_path / "lr.db")
    gen = tmp_path / FILE_NAME
    d = Database(path, create=True)
    ConfigStore(d).set("k", 1)
    d.close()
    gen.write_bytes(b"LRGEN1 999 0000\n{\"gen")           # torn
    caplog.set_level(logging.WARNING)
    d = Database(path)
    assert d.rollback is None
    assert sum("generation file" in r.getMessage() for r in caplog.records) == 1
    ConfigStore(d).set("k", 2)
    d.close()
    assert gen.read_bytes().startswith(b"LRGEN1 ")      # rewritten
    gen.unlink()                                          # an upgrade from before the file
    d = Database(path)
    assert d.rollback is None and gen.exists()
    d.close()


def test_migration_checksums_existing_chunks(tmp_path):
    """A schema 1 database (no checksums) opens with every chunk verified."""
    import sqlite_utils
    path = str(tmp_path / "lr.db")
    c = sqlite3.connect(path, isolation_level=None)
    _v1(sqlite_utils.Database(c))
    c.execute("PRAGMA application_id=0x4C525354")
    c.execute("PRAGMA user_version=1")
    c.execute("INSERT INTO pairs (id, record) VALUES ('c', '{\"id\": \"c\"}')")
    c.execute("INSERT INTO map_chunks VALUES ('c/delta', 0, ?)", (b"\x0f" * 8,))
    c.execute("INSERT INTO map_chunks VALUES ('c/marks', 0, ?)", (b"",))   # ALL_ONES
    c.close()
    d = Database(path)
    assert d.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    snap = SqliteMetadataStore(d).load()
    assert snap.damaged == {}
    assert snap.maps == {"c/delta": {0: b"\x0f" * 8}, "c/marks": {0: b""}}
    assert "hold" not in snap.pairs["c"]
    d.close()


def test_chunk_index_beyond_the_map_is_dropped(tmp_path):
    path = str(tmp_path / "lr.db")
    src, cln = stores()
    asyncio.run(fractured_with_writes(path, src, cln, range(3, 5)))
    c = sqlite3.connect(path)
    c.execute("UPDATE map_chunks SET chunk = 7 WHERE map_key = 'c/delta'")   # misplaced row
    c.execute("DELETE FROM map_chunks WHERE map_key = 'c/intent'")           # hide the regions
    c.commit()
    c.close()

    async def check():
        eng, d = await open_engine(path, src, cln)
        p = eng.pair("c")
        assert p.damaged
        await eng.close()
        rows = d.conn.execute("SELECT chunk FROM map_chunks WHERE map_key = 'c/delta'").fetchall()
        assert rows == [(0,)]                     # the bogus row 7 is gone
        assert p.delta.count() == N               # chunk 0 lost its row: all of it differs
        d.close()

    asyncio.run(check())
    assert CHUNK_BITS > N


def test_a_pair_note_that_fails_its_check_is_reported_not_returned(tmp_path):
    d = Database(str(tmp_path / "n.db"), create=True)
    cfg = ConfigStore(d)
    cfg.put_pair_note("c1", {"fractured_at": 1.0})
    cfg.put_pair_note("c2", {"fractured_at": 2.0})
    d.conn.execute("UPDATE pair_notes SET note = ? WHERE id = 'c2'", ('{"fractured_at": 3.0}',))
    assert cfg.pair_notes() == ({"c1": {"fractured_at": 1.0}}, ["c2"])
    d.close()
