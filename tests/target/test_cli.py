"""The `liverestore` CLI against a real daemon process: init, lifecycles
with --json, saveconfig -> restoreconfig into a fresh daemon, --wait
progress (tests/target/test_cli_wait.py), one-line errors, socket group."""
from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from tests.support import IQN, LR, ROOT, Daemon, secret_file

SECRET = "supersecret123"


def lr(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*LR, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def js(d: Daemon, *args: str):
    return json.loads(d.cli(*args, "--json").stdout)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_creates_private_state_once_and_serve_uses_it(tmp_path):
    state = tmp_path / "state"
    r = lr("init", "--state-dir", str(state))
    assert r.stdout.strip() == f"initialised {state}"
    assert mode(state) == 0o700 and mode(state / "liverestore.db") == 0o600
    r = lr("init", "--state-dir", str(state))
    assert r.stdout.strip() == f"{state} is already initialised"
    d = Daemon(tmp_path, init=False).start()      # no --init needed any more
    try:
        d.cli("volume", "create", "v", "--size", "1M")
        d.cli("export", "create", IQN, "--lun", "0=v", "--chap-user", "u",
              "--chap-secret-file", secret_file(d, SECRET))
        for f in os.listdir(state):
            if f.startswith("liverestore.db"):
                assert mode(state / f) == 0o600, f
    finally:
        d.stop()
    # Still idempotent over a used database; the data survives.
    assert "already initialised" in lr("init", "--state-dir", str(state)).stdout
    d = Daemon(tmp_path, init=False).start()
    try:
        assert [v["name"] for v in js(d, "volume", "list")] == ["v"]
    finally:
        d.stop()
    # Something that is not a database: refused in one line.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "liverestore.db").write_text("not sqlite")
    r = lr("init", "--state-dir", str(bad), ok=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("liverestore: ") and "Traceback" not in r.stderr


def test_volume_pair_export_lifecycle_with_json(daemon):
    assert mode(os.path.join(daemon.dir, "liverestore.db")) == 0o600      # serve --init
    v = js(daemon, "volume", "create", "db1", "--size", "8M", "--extent-size", "128K")
    assert (v["name"], v["size"], v["extent_size"], v["role"]) == ("db1", 8 << 20, 128 << 10,
                                                                     "standalone")
    js(daemon, "volume", "create", "db1-clone", "--size", "8M")
    p = js(daemon, "pair", "create", "db1", "db1-clone", "--wait")
    assert p["state"] == "synchronized" and p["extent_size"] == 128 << 10
    assert [x["id"] for x in js(daemon, "pair", "list")] == ["db1-clone"]
    assert js(daemon, "volume", "show", "db1-clone")["role"] == "clone"
    assert js(daemon, "pair", "fracture", "db1-clone")["state"] == "fractured"
    p = js(daemon, "pair", "throttle", "db1-clone", "--rate", "100M", "--depth", "4")
    assert p["throttle"]["rate"] == 100 << 20 and p["throttle"]["depth"] == 4
    p = js(daemon, "pair", "throttle", "db1-clone", "--host-window", "4", "--min-progress-pct", "25",
           "--calibrate-ms", "0")
    assert p["throttle"]["host_window"] == 4 and p["throttle"]["min_progress_pct"] == 25
    assert p["throttle"]["calibrate_ms"] == 0
    bad = daemon.cli("pair", "throttle", "db1-clone", "--min-progress-pct", "0", ok=False)
    assert bad.returncode != 0 and "min_progress_pct must be 1..100" in bad.stderr
    p = js(daemon, "pair", "restore", "db1/db1-clone", "--wait")
    assert p["state"] == "fractured" and p["progress"]["job"] is None
    p = js(daemon, "pair", "sync", "db1-clone", "--full", "--wait")
    assert p["state"] == "synchronized"
    assert js(daemon, "pair", "wait", "db1-clone")["state"] == "synchronized"
    e = js(daemon, "export", "create", IQN, "--lun", "0=db1", "--acl",
           "iqn.1994-05.com.example:h1", "--chap-user", "u", "--chap-secret-file",
           secret_file(daemon, SECRET))
    assert e["luns"] == {"0": "db1"} and e["chap"] == {"user": "u", "secret": "********"}
    assert [x["iqn"] for x in js(daemon, "export", "list")] == [IQN]
    assert js(daemon, "export", "show", IQN)["acl"] == ["iqn.1994-05.com.example:h1"]
    st = js(daemon, "status")
    assert st["volumes"][0]["exported_by"] == IQN and st["pairs"][0]["id"] == "db1-clone"
    table = daemon.cli("pair", "list").stdout
    assert table.splitlines()[0].split()[:4] == ["PAIR", "SOURCE", "CLONE", "STATE"]
    assert "synchronized" in table
    r = daemon.cli("volume", "delete", "db1", ok=False)
    assert r.returncode == 1 and "remove the export first" in r.stderr
    assert js(daemon, "export", "delete", IQN) == {"deleted": IQN, "cut_off": []}
    assert js(daemon, "pair", "delete", "db1-clone") == {"deleted": "db1-clone"}
    for name in ("db1", "db1-clone"):
        assert js(daemon, "volume", "delete", name)["deleted"] == name
    assert js(daemon, "volume", "list") == [] and js(daemon, "pair", "list") == []
    assert daemon.cli("volume", "list").stdout.strip() == "(none)"


def test_saveconfig_restoreconfig_into_a_fresh_daemon(daemon, tmp_path):
    daemon.cli("volume", "create", "db1", "--size", "4M")
    daemon.cli("volume", "create", "db1-clone", "--size", "4M")
    daemon.cli("volume", "create", "logs", "--size", "1M")
    daemon.cli("pair", "create", "db1", "db1-clone", "--wait")
    daemon.cli("pair", "throttle", "db1-clone", "--rate", "50M")
    daemon.cli("export", "create", IQN, "--lun", "0=db1", "--lun", "3=logs", "--chap-user", "u",
               "--chap-secret-file", secret_file(daemon, SECRET))
    saved = tmp_path / "saved.json"
    assert daemon.cli("saveconfig", str(saved)).stdout.strip() == f"saved to {saved}"
    assert mode(saved) == 0o600                   # it has the CHAP secret
    assert daemon.stop() == 0
    # a file saved by a version with the retired host-yield knobs still loads
    doc = json.loads(saved.read_text())
    doc["pairs"][0]["throttle"].update(host_yield_ms=20, host_pause_us=200)
    saved.write_text(json.dumps(doc))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    d2 = Daemon(fresh).start()
    try:
        assert js(d2, "volume", "list") == []
        out = json.loads(d2.cli("restoreconfig", str(saved), "--json").stdout)
        assert out["created"] == {"volumes": ["db1", "db1-clone", "logs"],
                                  "pairs": ["db1-clone"], "groups": [], "targets": [IQN]}
        vols = {v["name"]: v for v in js(d2, "volume", "list")}
        assert {n: v["size"] for n, v in vols.items()} == {
            "db1": 4 << 20, "db1-clone": 4 << 20, "logs": 1 << 20}
        p = js(d2, "pair", "show", "db1-clone")
        # Fractured, every extent to copy: the file cannot know what changed.
        assert p["state"] == "fractured" and p["progress"]["delta_extents"] == 64
        assert p["throttle"]["rate"] == 50 << 20
        e = js(d2, "export", "show", IQN)
        assert e["luns"] == {"0": "db1", "3": "logs"} and e["chap"]["user"] == "u"
        assert SECRET not in d2.cli("status", "--json").stdout
        # Running it again creates nothing.
        out = json.loads(d2.cli("restoreconfig", str(saved), "--json").stdout)
        assert out["created"] == {"volumes": [], "pairs": [], "groups": [], "targets": []}
    finally:
        d2.stop()


def test_errors_are_one_line_with_nonzero_exit(daemon, tmp_path):
    cases = [
        (("pair", "wait", "nope"), "liverestore: no pair 'nope'"),
        (("restoreconfig", str(tmp_path / "missing.json")), "liverestore: cannot read "),
        (("saveconfig", str(tmp_path / "no" / "dir" / "x.json")), "liverestore: "),
        (("export", "show", IQN), f"liverestore: no target {IQN}"),
        (("export", "create", IQN, "--lun", "zero"), "liverestore: --lun wants N=VOLUME"),
    ]
    for args, start in cases:
        r = daemon.cli(*args, ok=False)
        assert r.returncode == 1, args
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(start), r.stderr
    (tmp_path / "notjson").write_text("{")
    r = daemon.cli("restoreconfig", str(tmp_path / "notjson"), ok=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1


def test_serve_group_makes_the_socket_0660(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    d = Daemon(tmp_path)
    d.sock = str(tmp_path / "g.sock")
    proc = subprocess.Popen([*LR, "--socket", d.sock, "serve", "--init", "--state-dir", d.dir,
                             "--portal", f"127.0.0.1:{d.port}", "--group", group], cwd=ROOT,
                            stdout=open(d.log, "a"), stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if os.path.exists(d.sock) and d.cli("status", ok=False).returncode == 0:
                break
            assert proc.poll() is None, open(d.log).read()
            time.sleep(0.05)
        st = os.stat(d.sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    r = lr("--socket", str(tmp_path / "h.sock"), "serve", "--state-dir", d.dir, "--portal",
           f"127.0.0.1:{d.port}", "--group", "no-such-group-xyz", ok=False)
    assert r.returncode == 1 and "no group named no-such-group-xyz" in r.stderr
