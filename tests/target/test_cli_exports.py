"""Exports as an admin meets them through the CLI and the shell: who is
logged in, and a delete that will not cut hosts off by surprise."""
from __future__ import annotations

import json
import subprocess
import time

from tests.support import IQN, LR, ROOT, Daemon
from tests.target.held_session import logged_in

HOST = "iqn.1993-08.org.debian:01:host1"


def exported(d: Daemon) -> None:
    d.cli("volume", "create", "db1", "--size", "4M")
    d.cli("export", "create", IQN, "--lun", "0=db1")


def test_delete_refuses_while_logged_in_and_every_view_names_the_initiator(daemon):
    exported(daemon)
    with logged_in(daemon.port, IQN, HOST):
        r = daemon.cli("export", "delete", IQN, ok=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"has 1 logged-in session ({HOST})" in r.stderr and "force" in r.stderr
        assert json.loads(daemon.cli("export", "show", IQN, "--json").stdout)["sessions"][0][
            "initiator"] == HOST
        show = daemon.cli("export", "show", IQN).stdout
        assert "1 session logged in" in show and f"{HOST} from 127.0.0.1:" in show, show
        status = daemon.cli("status").stdout
        assert "LOGGED IN" in status and HOST in status, status
        shell = daemon.cli("shell", f"/iscsi/{IQN}/tpg1", "ls").stdout
        assert "1 session logged in" in shell and f"{HOST}" in shell, shell
        r = daemon.cli("export", "delete", IQN, "--force")
        assert r.stdout.strip() == f"deleted {IQN} (cut off 1 session: {HOST})"
    assert json.loads(daemon.cli("export", "list", "--json").stdout) == []
    # Nobody logged in: no force needed.
    daemon.cli("export", "create", IQN, "--lun", "0=db1")
    assert daemon.cli("export", "delete", IQN).stdout.strip() == f"deleted {IQN}"


def test_saveconfig_saves_the_portals_the_daemon_serves(daemon, tmp_path):
    """serve --portal is the stored setting from then on: saveconfig, status
    and a later start without --portal agree on it."""
    served = ["127.0.0.1", daemon.port]
    assert json.loads(daemon.cli("saveconfig").stdout)["portals"] == [served]
    daemon.cli("export", "portal", "127.0.0.1:3999")
    status = daemon.cli("status").stdout.splitlines()[0]
    assert status.startswith(f"portals: 127.0.0.1:{daemon.port} (after a reload or restart: "
                             "127.0.0.1:3999)"), status
    assert json.loads(daemon.cli("saveconfig").stdout)["portals"] == [["127.0.0.1", 3999]]
    # A restart without --portal serves the stored setting: the one it served.
    daemon.cli("export", "portal", f"127.0.0.1:{daemon.port}")
    assert daemon.stop() == 0
    proc = subprocess.Popen([*LR, "--socket", daemon.sock, "serve", "--state-dir", daemon.dir],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            r = daemon.cli("status", "--json", ok=False)
            if r.returncode == 0:
                break
            assert proc.poll() is None
            time.sleep(0.05)
        assert json.loads(r.stdout)["portals"] == [f"127.0.0.1:{daemon.port}"]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
