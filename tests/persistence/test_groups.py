"""Consistency group records in SQLite: migration, checksums, generation."""
from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest
import sqlite_utils

from persistence.db import SCHEMA_VERSION, Database, _v1, _v2
from persistence.group_store import SqliteGroupStore
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.blockstore import MemoryBlockStore
from restore_core.engine import Engine, EngineError
from restore_core.groups import Groups

ES = 4096
SIZE = 16 * ES


async def boot(path: str, create: bool = False) -> tuple[Engine, Groups, Database]:
    d = Database(path, create=create)
    eng = Engine(SqliteMetadataStore(d))
    for n in ("a", "a-clone", "b", "b-clone"):
        eng.add_volume(n, MemoryBlockStore(SIZE, n))
    await eng.start()
    groups = Groups(eng, SqliteGroupStore(d))
    await groups.load()
    return eng, groups, d


async def with_group(path: str) -> None:
    eng, groups, d = await boot(path, create=True)
    for lu in ("a", "b"):
        p = await eng.create_pair(lu, lu + "-clone", extent_size=ES)
        await eng.wait_job(p.id, 10)
    gen = d.generation
    await groups.create("db", ["a-clone", "b-clone"])
    assert d.generation == gen + 1           # a group change is a generation like any other
    await eng.close()
    d.close()


async def boot_with_stored_record(path: str, sql: str) -> tuple[Engine, Groups, Database]:
    """A database with group db whose record ``sql`` changed behind its back."""
    await with_group(path)
    c = sqlite3.connect(path)
    c.execute(sql)
    c.commit()
    c.close()
    return await boot(path)


def test_groups_survive_a_restart_and_deletes_too(tmp_path):
    async def go():
        path = str(tmp_path / "lr.db")
        await with_group(path)
        eng, groups, d = await boot(path)
        assert groups.show("db")["pairs"] == ["a-clone", "b-clone"]
        await groups.fracture("db")
        await groups.delete("db")
        await eng.close()
        d.close()
        eng, groups, d = await boot(path)
        assert groups.list() == []
        assert [p.state.value for p in eng.pairs.values()] == ["fractured", "fractured"]
        await eng.close()
        d.close()
    asyncio.run(go())


def test_group_record_that_fails_its_checksum_only_allows_show_and_delete(tmp_path, caplog):
    async def go():
        path = str(tmp_path / "lr.db")
        with caplog.at_level(logging.ERROR):
            eng, groups, d = await boot_with_stored_record(
                path, "UPDATE groups SET record = replace(record, 'b-clone', 'b-clonf')")
        assert "group db: its record in" in caplog.text and "failed its checksum" in caplog.text
        shown = groups.show("db")
        assert "failed its checksum" in shown["damaged"]
        with pytest.raises(EngineError, match="group db: its database record failed its "
                           "checksum.*delete it and create it again"):
            await groups.fracture("db")
        with pytest.raises(EngineError, match="belongs to group db"):
            await eng.fracture("a-clone")     # still owned until the group is deleted
        await groups.delete("db")
        await eng.fracture("a-clone")
        await eng.close()
        d.close()
    asyncio.run(go())


def test_unreadable_group_record_is_left_out(tmp_path, caplog):
    async def go():
        path = str(tmp_path / "lr.db")
        with caplog.at_level(logging.ERROR):
            eng, groups, d = await boot_with_stored_record(
                path, "UPDATE groups SET record = 'not json'")
        assert "group db: its record in" in caplog.text and "cannot be read" in caplog.text
        assert groups.list() == []
        await eng.fracture("a-clone")         # free
        await eng.close()
        d.close()
    asyncio.run(go())


def test_schema_2_database_gains_the_groups_table(tmp_path):
    path = str(tmp_path / "lr.db")
    c = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(c)
    _v1(db)
    _v2(db)
    c.execute("PRAGMA application_id=0x4C525354")
    c.execute("PRAGMA user_version=2")
    c.close()
    d = Database(path)
    assert d.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert SqliteGroupStore(d).load() == {}
    d.close()
