"""restoreconfig checks the whole document before it changes anything and
applies it all-or-nothing; no stored value can crash the next start."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from restore_core.throttle import KNOBS
from target.configdoc import InvalidConfig, check_document
from target.control import Client, ControlError
from tests.support import IQN, LR, ROOT, Daemon, free_port

SECRET = "s3cret-s3cret"


def call(d: Daemon, op: str, **args):
    with Client(d.sock) as c:
        return c.call(op, **args)


def serve_without_portal(d: Daemon) -> subprocess.CompletedProcess | None:
    """`serve` as the shipped systemd unit runs it (no --portal). Returns the
    finished process when it refused to start, None once it answered."""
    proc = subprocess.Popen([*LR, "--socket", d.sock, "serve", "--state-dir", d.dir],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        if proc.poll() is not None:
            out = proc.stdout.read()
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        try:
            Client(d.sock).call("status")
            d.proc = proc
            return None
        except ControlError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve neither started nor refused")


def test_bad_portals_are_refused_and_the_next_start_without_portal_works(daemon) -> None:
    port = free_port()
    call(daemon, "portal.set", portals=[f"127.0.0.1:{port}"])
    with pytest.raises(ControlError) as e:
        call(daemon, "restoreconfig", config={"version": 1, "portals": "xyz"})
    assert "$.portals" in str(e.value) and "nothing was changed" in str(e.value)
    assert daemon.stop() == 0
    assert serve_without_portal(daemon) is None, "serve refused to start"
    try:
        assert call(daemon, "status")["portals"] == [f"127.0.0.1:{port}"]
    finally:
        daemon.stop()


def _store_setting(d: Daemon, key: str, text: str) -> None:
    with sqlite3.connect(os.path.join(d.dir, "liverestore.db")) as db:
        db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, text))


@pytest.mark.parametrize("stored", ['"xyz"', '["xyz"]', '[["127.0.0.1", 0]]', "[]", "{not json"])
def test_a_bad_stored_portals_value_is_one_line_not_a_traceback(daemon, stored) -> None:
    """What an older version's restoreconfig (or a hand edit) left behind."""
    assert daemon.stop() == 0
    _store_setting(daemon, "portals", stored)
    r = serve_without_portal(daemon)
    assert r is not None and r.returncode == 1, "serve started with a bad portals setting"
    assert "Traceback" not in r.stdout, r.stdout
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "setting portals" in lines[0] and "--portal" in lines[0], lines
    # --portal overrides the stored value: the way out.
    daemon.start()
    call(daemon, "portal.set", portals=[f"127.0.0.1:{daemon.port}"])


def _files(d: Daemon) -> list[str]:
    vols = os.path.join(d.dir, "volumes")
    return sorted(os.listdir(vols)) if os.path.isdir(vols) else []


def test_a_failing_step_leaves_nothing_changed(daemon) -> None:
    call(daemon, "volume.create", name="keep", size="1M")
    call(daemon, "portal.set", portals=[f"127.0.0.1:{daemon.port}"])
    before = call(daemon, "saveconfig")
    files = _files(daemon)
    doc = {"version": 1, "portals": ["127.0.0.1:3999"],
           "volumes": [{"name": "db1", "size": 1 << 20}, {"name": "db1-clone", "size": 1 << 20}],
           "pairs": [{"source": "db1", "clone": "db1-clone"}],
           "targets": {IQN: {"luns": {"0": "db1"}, "chap": ["u", SECRET]},
                       # refers to a volume nobody has: the last step fails
                       IQN + "b": {"luns": {"0": "missing"}}}}
    with pytest.raises(ControlError) as e:
        call(daemon, "restoreconfig", config=doc)
    assert "missing" in str(e.value) and "nothing was changed" in str(e.value), e.value
    assert call(daemon, "saveconfig") == before
    assert _files(daemon) == files                      # the made images are gone too
    # Fixed, the same document applies in full.
    del doc["targets"][IQN + "b"]
    out = call(daemon, "restoreconfig", config=doc)
    assert out["created"] == {"volumes": ["db1", "db1-clone"], "pairs": ["db1-clone"],
                              "groups": [], "targets": [IQN]}
    assert call(daemon, "saveconfig")["portals"] == [["127.0.0.1", 3999]]


def test_a_saved_throttle_with_retired_knobs_still_loads() -> None:
    check_document({"version": 1, "pairs": [{"source": "a", "clone": "b", "throttle": {
        "rate": 0, "host_yield_ms": 20, "host_pause_us": 200}}]})


@pytest.mark.parametrize("doc, where", [
    ({"version": 2}, "version 1"),
    ({"version": 1, "portals": ["127.0.0.1:70000"]}, "$.portals[0]"),
    ({"version": 1, "portals": [["127.0.0.1", "3260"]]}, "$.portals[0]"),
    ({"version": 1, "volumes": [{"name": "v\n", "size": 512}]}, "$.volumes[0].name"),
    ({"version": 1, "volumes": [{"name": "v", "size": "1M", "path": "rel"}]}, "$.volumes[0]"),
    ({"version": 1, "pairs": [{"source": "a", "clone": "b", "throttle": {"rate": -1}}]},
     "$.pairs[0].throttle.rate"),
    ({"version": 1, "targets": {IQN + "\n": {"luns": {}}}}, "$.targets"),
    ({"version": 1, "targets": {IQN: {"luns": {"0": "v"}, "acl": ["iqn.2026-11.h:x\n"]}}},
     "acl[0]"),
    ({"version": 1, "targets": {IQN: {"luns": {"0": "v"}, "chap": ["u\r", SECRET]}}},
     "chap[0]"),
    ({"version": 1, "targets": {IQN: {"luns": {"99999": "v"}}}}, ".luns"),
    ({"version": 1, "targets": {IQN: {"luns": {}, "tpgt": 0}}}, ".tpgt"),
    ({"version": 1, "surprise": True}, "surprise"),
])
def test_schema_errors_name_the_json_path(doc, where) -> None:
    with pytest.raises(InvalidConfig) as e:
        check_document(doc)
    assert where in str(e.value) and "\n" not in str(e.value), e.value


def test_a_bad_stored_target_is_left_out_and_the_rest_serve(daemon) -> None:
    """An older version accepted an IQN with a trailing newline: the daemon
    starts without it, says so once, and `export delete` removes it."""
    call(daemon, "volume.create", name="a", size="1M")
    call(daemon, "volume.create", name="b", size="1M")
    call(daemon, "export.create", iqn=IQN, luns={"0": "a"})
    assert daemon.stop() == 0
    bad = IQN + "x\n"
    with sqlite3.connect(os.path.join(daemon.dir, "liverestore.db")) as db:
        db.execute("INSERT INTO targets (iqn, config) VALUES (?, ?)",
                   (bad, json.dumps({"luns": {"0": "b"}, "acl": None, "chap": None,
                                     "mutual_chap": None, "tpgt": 1})))
    daemon.start()
    assert call(daemon, "export.show", iqn=IQN)["luns"] == {"0": "a"}
    log = open(daemon.log).read()
    assert "Traceback" not in log and log.count("not serving target") == 1, log
    shown = {e["iqn"]: e for e in call(daemon, "export.list")}
    assert "not an iSCSI name" in shown[bad]["problem"] and "problem" not in shown[IQN]
    with pytest.raises(ControlError, match="only 'export delete' works on it"):
        call(daemon, "export.acl.add", iqn=bad, initiator="iqn.2026-11.io.h:x")
    assert call(daemon, "export.delete", iqn=bad) == {"deleted": bad, "cut_off": []}
    assert [e["iqn"] for e in call(daemon, "export.list")] == [IQN]
    daemon.stop(signal.SIGTERM)


def test_an_undecodable_stored_target_is_one_line_not_a_traceback(daemon) -> None:
    call(daemon, "portal.set", portals=[f"127.0.0.1:{daemon.port}"])
    assert daemon.stop() == 0
    with sqlite3.connect(os.path.join(daemon.dir, "liverestore.db")) as db:
        db.execute("INSERT INTO targets (iqn, config) VALUES (?, ?)", (IQN, "{not json"))
    r = serve_without_portal(daemon)
    assert r is not None and r.returncode == 1 and "Traceback" not in r.stdout, r
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and f"target {IQN}" in lines[0] and "not valid JSON" in lines[0], lines


def _pairs_doc(**throttle: int) -> dict:
    return {"version": 1, "volumes": [], "pairs": [
        {"source": "db", "clone": "db-clone", "throttle": throttle}]}


@pytest.mark.parametrize("knob", [k for k in KNOBS if k.hi is not None], ids=lambda k: k.name)
def test_a_throttle_knob_past_its_range_is_refused_before_anything_changes(knob):
    """The schema takes each knob's range from the engine's table: the file
    is refused up front, naming the knob, rather than half-way through
    at the engine's own check."""
    check_document(_pairs_doc(**{knob.name: knob.hi}))
    with pytest.raises(InvalidConfig, match=f"throttle.{knob.name}: {knob.hi + 1} is greater"):
        check_document(_pairs_doc(**{knob.name: knob.hi + 1}))
