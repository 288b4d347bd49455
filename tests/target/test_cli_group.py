"""`liverestore group ...` against a real daemon: lifecycle, one-by-one
refusals, --wait, one-line errors, saveconfig/restoreconfig with groups."""
from __future__ import annotations

import json

from tests.support import Daemon


def js(d: Daemon, *args: str):
    return json.loads(d.cli(*args, "--json").stdout)


def two_pairs(d: Daemon) -> None:
    for lu in ("data", "log"):
        d.cli("volume", "create", lu, "--size", "1M")
        d.cli("volume", "create", lu + "-clone", "--size", "1M")
        d.cli("pair", "create", lu, lu + "-clone", "--wait")


def test_group_lifecycle_through_the_cli(daemon):
    two_pairs(daemon)
    g = js(daemon, "group", "create", "db", "data-clone", "log/log-clone")
    assert g["pairs"] == ["data-clone", "log-clone"] and g["state"] == "synchronized"
    assert js(daemon, "pair", "show", "log-clone")["group"] == "db"

    r = daemon.cli("pair", "fracture", "data-clone", ok=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "pair data-clone belongs to group db" in r.stderr
    assert "group remove db data-clone" in r.stderr

    out = daemon.cli("group", "fracture", "db").stdout
    assert "db" in out and "fractured" in out and "data-clone" in out
    assert [m["state"] for m in js(daemon, "group", "show", "db")["members"]] == \
        ["fractured", "fractured"]
    g = js(daemon, "group", "restore", "db", "--unprotected", "--wait")
    assert g["state"] == "synchronized"
    js(daemon, "group", "fracture", "db")
    g = js(daemon, "group", "restore", "db", "--wait")
    assert g["state"] == "fractured"
    for pair in g["pairs"]:           # slow enough to still be running when paused
        daemon.cli("pair", "throttle", pair, "--rate", "256K")
    g = js(daemon, "group", "sync", "db", "--full")
    assert g["state"] == "syncing"
    g = js(daemon, "group", "pause", "db")
    assert [m["paused"] for m in g["members"]] == [True, True]
    r = daemon.cli("group", "wait", "db", ok=False)       # a paused job never ends
    assert r.returncode == 3 and "is paused" in r.stderr, (r.returncode, r.stderr)
    for pair in g["pairs"]:
        daemon.cli("pair", "throttle", pair, "--rate", "0")
    js(daemon, "group", "resume", "db")
    assert js(daemon, "group", "wait", "db")["state"] == "synchronized"

    js(daemon, "group", "remove", "db", "log-clone")
    daemon.cli("pair", "sync", "log-clone")              # free again
    assert [x["name"] for x in js(daemon, "group", "list")] == ["db"]
    assert "deleted group db" in daemon.cli("group", "delete", "db").stdout
    assert js(daemon, "group", "list") == []


def test_group_errors_are_one_line(daemon):
    two_pairs(daemon)
    daemon.cli("group", "create", "db", "data-clone")
    for args, want in ((("group", "create", "db"), "group db already exists"),
                       (("group", "add", "other", "log-clone"), "no group 'other'"),
                       (("group", "create", "x", "log-clone", "data-clone"),
                        "pair data-clone is in group db"),
                       (("group", "create", "bad/name"), "invalid group name"),
                       (("group", "restore", "db"), "pair data-clone is synchronized"),
                       (("group", "pause", "db"), "group db has no sync or restore running")):
        r = daemon.cli(*args, ok=False)
        assert r.returncode == 1, args
        assert want in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert js(daemon, "group", "list")[0]["pairs"] == ["data-clone"]   # nothing half done


def test_saveconfig_restoreconfig_carry_groups(daemon, tmp_path):
    two_pairs(daemon)
    daemon.cli("group", "create", "db", "data-clone", "log-clone")
    saved = tmp_path / "cfg.json"
    daemon.cli("saveconfig", str(saved))
    doc = json.loads(saved.read_text())
    assert doc["groups"] == [{"name": "db", "pairs": ["data-clone", "log-clone"]}]
    daemon.stop()
    (tmp_path / "fresh").mkdir()
    fresh = Daemon(tmp_path / "fresh").start()
    try:
        out = json.loads(fresh.cli("restoreconfig", str(saved), "--json").stdout)
        assert out["created"]["groups"] == ["db"]
        assert js(fresh, "group", "show", "db")["pairs"] == ["data-clone", "log-clone"]
        doc["groups"] = [{"name": "x", "pairs": ["data-clone", "data-clone"]}]
        saved.write_text(json.dumps(doc))
        r = fresh.cli("restoreconfig", str(saved), ok=False)
        assert "groups" in r.stderr and "nothing was changed" in r.stderr
        # a failing group step takes back the whole document
        fresh.cli("group", "delete", "db")
        fresh.cli("pair", "delete", "log-clone")
        doc["groups"] = [{"name": "db", "pairs": ["data-clone", "nope"]}]
        saved.write_text(json.dumps(doc))
        r = fresh.cli("restoreconfig", str(saved), ok=False)
        assert "no pair 'nope'" in r.stderr and "nothing was changed" in r.stderr, r.stderr
        assert js(fresh, "group", "list") == []
        assert [p["id"] for p in js(fresh, "pair", "list")] == ["data-clone"]
    finally:
        fresh.stop()


def test_group_keep_undo_restore_abort_and_commit(daemon):
    two_pairs(daemon)
    js(daemon, "group", "create", "db", "data-clone", "log-clone")
    js(daemon, "group", "fracture", "db")
    g = js(daemon, "group", "restore", "db", "--keep-undo", "--wait")
    assert g["state"] == "fractured" and all(m["undo"] for m in g["members"])
    r = daemon.cli("pair", "commit", "data-clone", ok=False)
    assert r.returncode == 1 and "belongs to group db" in r.stderr
    g = js(daemon, "group", "abort", "db", "--wait")
    assert g["state"] == "fractured" and not any(m["undo"] for m in g["members"])
    r = daemon.cli("group", "commit", "db", ok=False)
    assert r.returncode == 1 and "keeps no undo image; nothing to commit" in r.stderr
    js(daemon, "group", "restore", "db", "--keep-undo", "--wait")
    g = js(daemon, "group", "commit", "db")
    assert not any(m["undo"] for m in g["members"])
