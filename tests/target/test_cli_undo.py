"""`pair restore --keep-undo`, `pair abort`, `pair commit` against a real
daemon: the undo image in the state dir, exit statuses, one-line errors."""
from __future__ import annotations

import json
import os
import select
import subprocess

from tests.support import LR, ROOT, Daemon


def js(d: Daemon, *args: str):
    return json.loads(d.cli(*args, "--json").stdout)


def fractured_pair(d: Daemon) -> None:
    d.cli("volume", "create", "db", "--size", "4M")
    d.cli("volume", "create", "db-clone", "--size", "4M")
    d.cli("pair", "create", "db", "db-clone", "--no-sync")   # fractured, every extent differs


def test_keep_undo_restore_abort_commit(daemon):
    fractured_pair(daemon)
    p = js(daemon, "pair", "restore", "db-clone", "--keep-undo", "--wait")
    assert p["state"] == "fractured" and p["progress"]["undo"]
    assert p["history"]["current_point_restored"]
    image = p["undo_image"]
    assert image == os.path.join(daemon.dir, "undo", "db-clone.undo.img")
    assert os.path.exists(image)
    out = daemon.cli("pair", "show", "db-clone").stdout
    assert "undo image" in out and "pair abort db-clone" in out
    assert "undo kept" in daemon.cli("pair", "list").stdout
    for args, want in ((("pair", "sync", "db-clone"), "keeps the undo image of its restore"),
                       (("pair", "restore", "db-clone"), "keeps the undo image of its restore"),
                       (("pair", "restore", "db-clone", "--undo-volume", "x"),
                        "keeps the undo image")):
        r = daemon.cli(*args, ok=False)
        assert r.returncode == 1 and want in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = daemon.cli("pair", "abort", "db-clone", "--wait")
    assert "put back" in r.stdout + r.stderr, (r.stdout, r.stderr)
    p = js(daemon, "pair", "show", "db-clone")
    assert p["state"] == "fractured" and not p["progress"]["undo"] and p["undo_image"] is None
    assert not os.path.exists(image)
    # the history no longer says the clone's point was restored (Ansible's
    # state=restored would otherwise skip the next restore)
    assert p["history"]["last_job"]["kind"] == "abort"
    assert p["history"]["last_job"]["result"] == "finished"
    assert not p["history"]["current_point_restored"]
    r = daemon.cli("pair", "abort", "db-clone", ok=False)
    assert r.returncode == 1 and "keeps no undo image" in r.stderr

    # an admin-named undo volume, then commit
    daemon.cli("volume", "create", "undo1", "--size", "4M")
    p = js(daemon, "pair", "restore", "db-clone", "--keep-undo", "--undo-volume", "undo1",
           "--wait")
    assert p["undo_image"] == "volume undo1"
    v = js(daemon, "volume", "show", "undo1")
    assert v["access"] == "not-ready" and v["undo_of"] == "db-clone"
    r = daemon.cli("volume", "delete", "undo1", ok=False)
    assert r.returncode == 1 and "undo image of pair db-clone" in r.stderr
    p = js(daemon, "pair", "commit", "db-clone")
    assert not p["progress"]["undo"]
    assert js(daemon, "volume", "show", "undo1")["access"] == "read-write"


def test_waiting_on_a_restore_that_gets_aborted_exits_5(daemon):
    fractured_pair(daemon)
    daemon.cli("pair", "throttle", "db-clone", "--rate", "64K")
    daemon.cli("pair", "restore", "db-clone", "--keep-undo")
    w = subprocess.Popen([*LR, "--socket", daemon.sock, "pair", "wait", "db-clone"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # abort only once the waiter follows the restore (its first progress
        # line): a waiter that starts after the abort began follows the abort
        assert select.select([w.stdout], [], [], 30)[0], "pair wait printed nothing in 30 s"
        first = w.stdout.readline()
        assert "restore" in first, first
        daemon.cli("pair", "abort", "db-clone")
        out, err = w.communicate(timeout=60)
    finally:
        if w.poll() is None:
            w.kill()
    assert w.returncode == 5, (w.returncode, out, err)
    assert "restore was aborted" in err
    # following the abort itself: it ends like any job
    daemon.cli("pair", "throttle", "db-clone", "--rate", "0")
    r = daemon.cli("pair", "wait", "db-clone")
    assert "put back" in r.stdout or "no job running" in r.stdout, r.stdout
    assert js(daemon, "pair", "show", "db-clone")["undo_image"] is None
