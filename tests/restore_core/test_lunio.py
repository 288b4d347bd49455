"""The host I/O interface lives in one bottom module that the engine's host
I/O class implements directly (no adapter re-raising its errors)."""
from __future__ import annotations

import ast
import asyncio
import pathlib
import re

import pytest

import restore_core.lunio as lunio
from restore_core.lunio import (Access, AccessState, LunIO, MediumError, NotReadyError,
                                WriteProtectedError)
from restore_core.plain_lunio import PlainLunIO
from restore_core.volume_io import VolumeIO

from .util import ES, Rig, pattern

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRODUCT = ("restore_core", "persistence", "target")
# What an I/O error class of the interface is called, wherever it would be defined.
IO_ERROR_NAME = re.compile(r"NotReady|WriteProtected|Medium\w*Error|HostIO|LunIOError")


def _product_modules() -> list[pathlib.Path]:
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def test_interface_module_imports_no_project_module():
    # At the bottom of the import graph: target/scsi and restore_core both
    # import it, so it must import neither.
    tree = ast.parse(pathlib.Path(lunio.__file__).read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert not {m for m in imported if m and m.split(".")[0] in PRODUCT}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def test_io_errors_and_access_states_are_defined_once():
    # One set of errors for the whole host I/O path: a second hierarchy
    # (and an adapter translating between the two) must not come back.
    where = {}
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (IO_ERROR_NAME.search(node.name)
                                                   or node.name in ("Access", "AccessState")):
                where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert where and all(files == ["restore_core/lunio.py"] for files in where.values()), where


def test_volume_io_is_the_lunio_and_raises_its_errors():
    async def go():
        r = Rig(16)
        eng = await r.boot()
        assert isinstance(r.sio, VolumeIO)
        assert isinstance(r.sio, LunIO) and isinstance(PlainLunIO(r.src), LunIO)
        assert r.sio.access_state() == AccessState(Access.READ_WRITE)
        p = await r.fractured_pair()
        await r.sio.write(0, pattern(1, 4 * ES))
        await eng.restore(p.id, paused=True)
        st = r.cios[0].access_state()
        assert st.access is Access.NOT_READY and "protected restore" in st.reason
        with pytest.raises(NotReadyError, match="protected restore"):
            await r.cios[0].read(0, 512)
        r.cln.fail_at = {2 * ES + 7}              # an unrestored extent is read from the clone
        with pytest.raises(MediumError) as e:
            await r.sio.read(2 * ES, 512)
        assert not e.value.write
        r.cln.fail_at = set()
        await eng.resume(p.id)
        await eng.wait_job(p.id, 10)
        await eng.sync(p.id)                      # a syncing clone is read-only
        assert r.cios[0].access_state().access is Access.READ_ONLY
        with pytest.raises(WriteProtectedError):
            await r.cios[0].write(0, b"x" * 512)
        await eng.close()
    asyncio.run(go())

