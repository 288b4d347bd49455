"""`liverestore shell` one-shot on /groups: the same operations as the CLI."""
from __future__ import annotations

import json

from tests.support import Daemon

from .test_shell import shell_cmd


def test_groups_through_the_one_shot_shell(daemon: Daemon):
    for lu in ("data", "log"):
        daemon.cli("volume", "create", lu, "--size", "1M")
        daemon.cli("volume", "create", lu + "-clone", "--size", "1M")
        daemon.cli("pair", "create", lu, lu + "-clone", "--wait")
    out = shell_cmd(daemon, "/groups", "create", "db", "data-clone").stdout
    assert "Created group db: synchronized, pairs data-clone." in out
    out = shell_cmd(daemon, "/groups/db", "add", "log/log-clone").stdout
    assert "pairs data-clone, log-clone" in out
    assert "db" in shell_cmd(daemon, "ls", "/groups").stdout
    out = shell_cmd(daemon, "/groups/db", "fracture").stdout
    assert "Fractured group db: fractured, pairs data-clone, log-clone." in out
    r = shell_cmd(daemon, "/pairs/data/data-clone", "sync", ok=False)
    assert r.returncode != 0 and "belongs to group db" in r.stderr
    out = shell_cmd(daemon, "/groups/db", "restore", "unprotected").stdout
    assert "Restoring group db" in out
    shell_cmd(daemon, "/groups/db", "wait")
    show = json.loads(daemon.cli("group", "show", "db", "--json").stdout)
    assert show["state"] == "synchronized"
    out = shell_cmd(daemon, "/groups/db", "remove", "log-clone").stdout
    assert "pairs data-clone." in out
    assert "Deleted group db." in shell_cmd(daemon, "/groups", "delete", "db").stdout
    assert json.loads(daemon.cli("group", "list", "--json").stdout) == []


def test_keep_undo_abort_commit_through_the_one_shot_shell(daemon: Daemon):
    for lu in ("data", "log"):
        daemon.cli("volume", "create", lu, "--size", "1M")
        daemon.cli("volume", "create", lu + "-clone", "--size", "1M")
        daemon.cli("pair", "create", lu, lu + "-clone", "--no-sync")
    out = shell_cmd(daemon, "/pairs/log/log-clone", "restore", "keep_undo=true").stdout
    assert "Restoring log/log-clone" in out
    shell_cmd(daemon, "/pairs/log/log-clone", "wait")
    assert "undo kept" in shell_cmd(daemon, "ls", "/pairs").stdout
    out = shell_cmd(daemon, "/pairs/log/log-clone", "abort").stdout
    assert "Aborting log/log-clone" in out
    shell_cmd(daemon, "/pairs/log/log-clone", "wait")
    assert json.loads(daemon.cli("pair", "show", "log-clone", "--json").stdout)[
        "undo_image"] is None
    r = shell_cmd(daemon, "/pairs/log/log-clone", "commit", ok=False)
    assert r.returncode != 0 and "keeps no undo image" in r.stderr

    shell_cmd(daemon, "/groups", "create", "db", "data-clone", "log-clone")
    out = shell_cmd(daemon, "/groups/db", "restore", "keep_undo=true").stdout
    assert "Restoring group db" in out
    shell_cmd(daemon, "/groups/db", "wait")
    out = shell_cmd(daemon, "/groups/db", "commit").stdout
    assert "Committed group db: fractured" in out
    show = json.loads(daemon.cli("group", "show", "db", "--json").stdout)
    assert not any(m["undo"] for m in show["members"])
    shell_cmd(daemon, "/groups/db", "restore", "keep_undo=true")
    shell_cmd(daemon, "/groups/db", "wait")
    assert "Aborting group db" in shell_cmd(daemon, "/groups/db", "abort").stdout
    shell_cmd(daemon, "/groups/db", "wait")
    show = json.loads(daemon.cli("group", "show", "db", "--json").stdout)
    assert show["state"] == "fractured" and not any(m["undo"] for m in show["members"])
