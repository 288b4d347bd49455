"""Changing who may use an export after creating it, from the CLI: ACL,
LUNs and CHAP (secrets from a file or a prompt, never argv), and the loud
warning for an export open to the network."""
from __future__ import annotations

import json
import re
import sys

import pexpect

from tests.support import IQN, LR, ROOT, Daemon, free_port

HOST = "iqn.1993-08.org.debian:01:host1"
SECRET = "a-secret-of-16ch"


def show(d: Daemon) -> dict:
    return json.loads(d.cli("export", "show", IQN, "--json").stdout)


def test_acl_lun_and_auth_after_creation(daemon, tmp_path):
    d = daemon
    for v in ("db1", "db1-clone"):
        d.cli("volume", "create", v, "--size", "1M")
    r = d.cli("export", "create", IQN, "--lun", "0=db1")
    assert "WARNING" not in r.stderr                # loopback portal: no warning
    out = d.cli("export", "acl", "add", IQN, HOST).stdout
    assert re.search(rf"^ACL\s+{re.escape(HOST)}$", out, re.M), out
    assert show(d)["acl"] == [HOST]
    out = d.cli("export", "acl", "remove", IQN, HOST).stdout
    assert "note: the ACL is now empty: any initiator may log in" in out
    d.cli("export", "lun", "add", IQN, "db1-clone", "--lun", "3")
    assert show(d)["luns"] == {"0": "db1", "3": "db1-clone"}
    d.cli("export", "lun", "remove", IQN, "0")
    assert show(d)["luns"] == {"3": "db1-clone"}
    # CHAP: a secret on the command line is refused, before anything is sent.
    r = d.cli("export", "auth", IQN, "--chap-user", "u", "--chap-secret", SECRET, ok=False)
    assert r.returncode == 2 and "visible to every user" in r.stderr and SECRET not in r.stderr
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    out = d.cli("export", "auth", IQN, "--chap-user", "u", "--chap-secret-file",
                str(secret_file)).stdout
    assert re.search(r"^auth\s+CHAP \(user u\)$", out, re.M), out
    assert json.loads(d.cli("saveconfig").stdout)["targets"][IQN]["chap"] == ["u", SECRET]
    # ... or asked for on the terminal, twice, never echoed.
    p = pexpect.spawn(sys.executable, [*LR[1:], "--socket", d.sock, "export", "auth", IQN,
                                       "--chap-user", "v"], cwd=ROOT, encoding="utf-8",
                      timeout=30)
    p.expect("CHAP secret for v: ")
    p.sendline(SECRET + "x")
    p.expect("again: ")
    p.sendline(SECRET + "x")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and (SECRET + "x") not in p.before, p.before
    assert json.loads(d.cli("saveconfig").stdout)["targets"][IQN]["chap"] == ["v", SECRET + "x"]
    d.cli("export", "auth", IQN, "--none")
    assert show(d)["chap"] is None
    # No terminal and no file: one line that says how.
    r = d.cli("export", "auth", IQN, "--chap-user", "w", ok=False)
    assert r.returncode == 1 and "--chap-secret-file" in r.stderr


def test_an_export_open_to_the_network_is_a_loud_warning(tmp_path):
    """Served on a wildcard portal too (nothing connects to it in this test)."""
    d = Daemon(tmp_path, extra=("--portal", f"0.0.0.0:{free_port()}")).start()
    try:
        d.cli("volume", "create", "db1", "--size", "1M")
        r = d.cli("export", "create", IQN, "--lun", "0=db1")
        assert f"liverestore: WARNING: target {IQN} is open to ANY initiator" in r.stderr
        assert "no ACL and no CHAP" in r.stderr
        r = d.cli("export", "acl", "add", IQN, HOST)
        assert "WARNING" not in r.stderr
    finally:
        d.stop()
