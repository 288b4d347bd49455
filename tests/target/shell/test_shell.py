"""`liverestore shell` against a real daemon: interactive through a
pseudo-terminal (pexpect), and one-shot mode as a subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pexpect
import pytest

from tests.support import IQN, LR, ROOT, Daemon, secret_file

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SECRET = "supersecret123"


def shell_cmd(d: Daemon, *line: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*LR, "--socket", d.sock, "shell", *line], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


class Screen:
    """The interactive shell on a pseudo-terminal; text without colours."""

    def __init__(self, d: Daemon, tmp, prompt: str = "/> ") -> None:
        env = dict(os.environ, HOME=str(tmp), LIVERESTORE_SHELL_PREFS=str(tmp / "prefs"))
        self.p = pexpect.spawn(sys.executable, [*LR[1:], "--socket", d.sock, "shell"], cwd=ROOT,
                               env=env, encoding="utf-8", dimensions=(60, 200), timeout=30)
        self.p.expect(re.escape(prompt))

    def run(self, line: str, prompt: str = r"\n/\S*> ") -> str:
        """Send a command line; what it printed, up to the next prompt."""
        self.p.sendline(line)
        self.p.expect(re.escape(line))
        self.p.expect(prompt)
        out = ANSI.sub("", self.p.before)
        assert "Traceback" not in out, out
        return out

    def close(self) -> int:
        self.p.sendline("exit")
        self.p.expect(pexpect.EOF)
        self.p.close()
        return self.p.exitstatus


def tree_line(out: str, name: str) -> str:
    """The `ls` line of a node: 'o- name ..... [summary]'."""
    for line in out.splitlines():
        if re.search(rf"o- {re.escape(name)} ", line):
            return line
    raise AssertionError(f"{name} not in:\n{out}")


def test_interactive_tree_cd_completion_and_a_restore_visible_in_ls(daemon, tmp_path):
    daemon.cli("volume", "create", "db1", "--size", "16M")
    daemon.cli("volume", "create", "db1-clone", "--size", "16M")
    sh = Screen(daemon, tmp_path)
    try:
        # Create the pair from the shell, fractured with every extent to copy.
        out = sh.run("/pairs create db1 db1-clone sync=false")
        assert "Created pair db1/db1-clone: fractured, 256 extents differ." in out
        assert "16.0 MiB, source, read-write" in tree_line(sh.run("ls /volumes"), "db1")
        out = sh.run("ls")
        assert "[fractured, 256 extents differ]" in tree_line(out, "db1-clone")
        assert "[1 pair, 0 busy]" in tree_line(out, "pairs")
        # Tab completion of a path, then of a command.
        sh.p.send("cd /pa\t")
        sh.p.expect("/pairs/")
        sh.p.send("db1/db1-c\t")
        sh.p.expect("db1-clone")
        sh.p.sendline("")
        sh.p.expect("/pairs/db1/db1-clone> ")
        sh.p.send("resto\t")
        sh.p.expect("restore ")
        sh.p.sendcontrol("u")
        out = sh.run("pwd")
        assert out.strip().endswith("/pairs/db1/db1-clone")
        out = sh.run("help restore")
        assert "restore [mode]" in out and "mode=protected" in out and "unprotected" in out
        out = sh.run("help")
        for cmd in ("restore [mode]", "sync [mode]", "fracture", "pause", "resume", "wait",
                    "get [group] [parameter...]", "set [group] [parameter=value...]"):
            assert f"- {cmd}" in out, (cmd, out)
        # A slow restore: throttle, start, pause so the state stays put.
        out = sh.run("set throttle rate=256K batch_extents=1 depth=1")
        assert "Parameter rate is now '262144'." in out
        assert "batch_extents=1" in sh.run("get throttle batch_extents")
        sh.run("set throttle min_progress_pct=30 host_window=16 calibrate_ms=20")
        assert "min_progress_pct=30" in sh.run("get throttle min_progress_pct")
        assert "calibrate_ms=20" in sh.run("get throttle calibrate_ms")
        assert "host_window=16" in sh.run("get throttle host_window")
        out = sh.run("restore")
        assert "Restoring db1/db1-clone: restoring" in out and "(protected)" in out
        sh.run("pause")
        out = sh.run("ls /pairs")
        line = tree_line(out, "db1-clone")
        assert re.search(r"\[restoring \d+% \d+/256 extents \(protected\) paused\]", line), line
        assert "[1 pair, 1 busy]" in tree_line(out, "pairs")
        # The same state through the CLI: the shell only showed the daemon's.
        p = json.loads(daemon.cli("pair", "show", "db1-clone", "--json").stdout)
        assert p["state"] == "restoring" and p["progress"]["paused"]
        out = sh.run("cd ../..")
        assert out.strip() == "" and sh.run("pwd").strip().endswith("/pairs")
        # Errors: one line, and the shell goes on.
        out = sh.run("cd /nope")
        assert out.strip().splitlines() == ["error: No such path /nope"]
        out = sh.run("/pairs/db1/db1-clone restore sideways")
        assert out.strip().splitlines() == [
            "error: restore takes 'protected' (the default) or 'unprotected'"]
        out = sh.run("/volumes delete db1")
        assert "error:" in out and len(out.strip().splitlines()) == 1
        assert "restoring" in tree_line(sh.run("ls /pairs"), "db1-clone")
        assert sh.close() == 0
    finally:
        sh.p.close(force=True)
    # A new session starts where the last one left off (if that still exists).
    sh = Screen(daemon, tmp_path, prompt="/pairs> ")
    try:
        assert sh.close() == 0
    finally:
        sh.p.close(force=True)


def test_interactive_chap_secret_masked_and_kept_out_of_history(daemon, tmp_path):
    daemon.cli("volume", "create", "v", "--size", "1M")
    sh = Screen(daemon, tmp_path)
    try:
        assert f"Created target {IQN}." in sh.run(f"/iscsi create {IQN}")
        tpg = f"/iscsi/{IQN}/tpg1"
        assert "Created LUN 0 -> v." in sh.run(f"{tpg}/luns create volume=v")
        out = sh.run(f"{tpg}/acls create iqn.1994-05.com.example:host1")
        assert "Created ACL for iqn.1994-05.com.example:host1." in out
        out = sh.run(f"{tpg} set auth chap_user=alice chap_secret={SECRET}")
        assert "Parameter chap_secret is now '********'." in out and SECRET not in out
        out = sh.run("ls")
        assert "[CHAP user alice]" in tree_line(out, "tpg1")
        assert "[v (1.0 MiB)]" in tree_line(out, "lun0")
        assert "[1 initiator]" in tree_line(out, "acls")
        assert "[may log in]" in tree_line(out, "iqn.1994-05.com.example:host1")
        out = sh.run(f"{tpg} get auth")
        assert "chap_user=alice" in out and "chap_secret=********" in out
        out = sh.run(f"{tpg}/acls delete iqn.1994-05.com.example:host1")
        assert ("Deleted ACL for iqn.1994-05.com.example:host1. Note: the ACL is now empty: "
                "any initiator may log in.") in out
        assert "[any initiator may log in]" in tree_line(sh.run(f"ls {tpg}"), "acls")
        assert "Deleted LUN 0." in sh.run(f"{tpg}/luns delete lun0")
        assert "Created LUN 5 -> v." in sh.run(f"{tpg}/luns create v 5")
        out = sh.run(f"{tpg}/luns create v")
        assert out.strip() == f"error: volume v is already a LUN of {IQN}"
        # Too short a secret: refused by the daemon, one line.
        out = sh.run(f"{tpg} set auth chap_user=bob chap_secret=short")
        assert out.strip().splitlines()[-1].startswith("error: CHAP secrets must be 12")
        assert sh.close() == 0
    finally:
        sh.p.close(force=True)
    assert SECRET not in sh.p.before
    history = (tmp_path / "prefs" / "history.txt").read_text()
    assert "acls create" in history and SECRET not in history
    for f in (tmp_path / "prefs").iterdir():
        assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in open(daemon.log).read()
    t = json.loads(daemon.cli("export", "show", IQN, "--json").stdout)
    assert t["chap"] == {"user": "alice", "secret": "********"}


def test_one_shot_mode(daemon, tmp_path):
    daemon.cli("volume", "create", "db1", "--size", "8M")
    daemon.cli("volume", "create", "db1-clone", "--size", "8M")
    daemon.cli("pair", "create", "db1", "db1-clone", "--no-sync")
    daemon.cli("export", "create", IQN, "--lun", "0=db1", "--chap-user", "u",
               "--chap-secret-file", secret_file(daemon, SECRET))
    daemon.cli("pair", "throttle", "db1-clone", "--rate", "256K", "--batch-extents", "1",
               "--depth", "1")
    r = shell_cmd(daemon, "/pairs/db1/db1-clone", "restore", "unprotected")
    assert r.stdout.startswith("Restoring db1/db1-clone: restoring") and "(unprotected)" in r.stdout
    shell_cmd(daemon, "/pairs/db1/db1-clone", "pause")
    out = shell_cmd(daemon, "ls").stdout
    assert "(unprotected) paused]" in tree_line(out, "db1-clone")
    assert "exported by " + IQN in tree_line(shell_cmd(daemon, "ls", "/volumes").stdout, "db1")
    assert SECRET not in out
    shell_cmd(daemon, "/pairs/db1/db1-clone", "set", "throttle", "rate=0", "batch_extents=16")
    shell_cmd(daemon, "/pairs/db1/db1-clone", "resume")
    r = shell_cmd(daemon, "/pairs/db1/db1-clone", "wait")
    assert r.stdout.splitlines()[-1] == "db1/db1-clone: synchronized.", r.stdout
    r = shell_cmd(daemon, "/pairs/db1/nope", "restore", ok=False)
    assert r.returncode == 1 and r.stderr.strip() == "error: No such path /pairs/db1/nope"
    r = shell_cmd(daemon, "/volumes", "create", "x", "size=lots", ok=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "bad size 'lots'" in r.stderr and "Traceback" not in r.stderr
    save = tmp_path / "cfg.json"
    r = shell_cmd(daemon, "saveconfig", str(save))
    assert f"Configuration saved to {save}" in r.stdout
    assert oct(save.stat().st_mode & 0o777) == "0o600"
    cfg = json.loads(save.read_text())
    assert {v["name"] for v in cfg["volumes"]} == {"db1", "db1-clone"}
    r = shell_cmd(daemon, "restoreconfig", str(save))
    assert r.stdout.strip() == "Created 0 volumes, 0 pairs, 0 groups, 0 targets."
    r = subprocess.run([*LR, "--socket", daemon.sock + ".none", "shell", "ls"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no liverestore daemon" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_volume_resize_grows_only_and_relative_paths_are_the_shells(daemon, tmp_path):
    r = subprocess.run([*LR, "--socket", daemon.sock, "shell", "/volumes", "create", "v",
                        "path=rel.img", "size=1M"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rel.img").stat().st_size == 1 << 20
    r = shell_cmd(daemon, "/volumes/v", "resize", "512K", ok=False)
    assert r.returncode == 1 and "only grows" in r.stderr
    r = shell_cmd(daemon, "/volumes/v", "resize", "2M")
    assert r.stdout.strip() == "Volume v is now 2.0 MiB."
    assert (tmp_path / "rel.img").stat().st_size == 2 << 20
