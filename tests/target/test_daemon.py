"""`liverestore serve` as a real process: CLI, control socket, iSCSI with a
real initiator (qemu-io), restore during host I/O, graceful stop, restart."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time

import pytest

from target.control import Client, ControlError
from tests.support import IQN, LR, ROOT, Daemon, free_port, qemu_io, secret_file



def setup_pair(d: Daemon, size: str = "32M") -> None:
    d.cli("volume", "create", "db1", "--size", size)
    d.cli("volume", "create", "db1-clone", "--size", size)
    d.cli("pair", "create", "db1", "db1-clone", "--wait")
    d.cli("export", "create", IQN, "--lun", "0=db1", "--lun", "1=db1-clone")


def test_control_socket_is_private_and_refuses_strangers(daemon):
    st = os.stat(daemon.sock)
    assert stat.S_IMODE(st.st_mode) == 0o600
    # A process of another user cannot even connect (0600); with the mode
    # opened up, SO_PEERCRED still refuses it.
    os.chmod(daemon.sock, 0o666)
    pid = os.fork()
    if pid == 0:   # child: become nobody and try
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                Client(daemon.sock).call("status")
                os._exit(3)
            except ControlError as e:
                os._exit(0 if "permission denied" in str(e) else 4)
        except BaseException:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_cli_errors_are_one_line(daemon):
    r = daemon.cli("pair", "restore", "nope", ok=False)
    assert r.returncode == 1 and r.stderr.strip() == "liverestore: no pair 'nope'"
    r = daemon.cli("volume", "create", "bad/name", "--size", "1M", ok=False)
    assert r.returncode == 1 and "invalid volume name" in r.stderr and "Traceback" not in r.stderr
    r = daemon.cli("volume", "create", "v", ok=False)
    assert "give a size" in r.stderr
    r = daemon.cli("export", "create", "not-an-iqn", ok=False)
    assert "not an iSCSI name" in r.stderr
    r = subprocess.run([*LR, "--socket", daemon.sock + ".nope", "status"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no liverestore daemon" in r.stderr
    daemon.cli("volume", "create", "a", "--size", "1M")
    daemon.cli("volume", "create", "b", "--size", "2M")
    r = daemon.cli("pair", "create", "a", "b", ok=False)
    assert "sizes differ" in r.stderr
    r = daemon.cli("pair", "throttle", "x", "--rate", "fast", ok=False)
    assert "no pair" in r.stderr or "bad size" in r.stderr


def test_chap_secret_never_shown(daemon):
    daemon.cli("volume", "create", "v", "--size", "1M")
    daemon.cli("export", "create", IQN, "--lun", "0=v", "--chap-user", "u",
               "--chap-secret-file", secret_file(daemon, "supersecret123"))
    for args in (["status"], ["status", "--json"], ["export", "list", "--json"],
                 ["export", "list"]):
        assert "supersecret123" not in daemon.cli(*args).stdout


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-io (qemu-utils) not installed")
def test_restore_under_real_initiator_then_restart(daemon, tmp_path):
    """Issue 4's check: patterns, fracture, change, protected restore; reads
    during the restore see the clone's data, writes during it survive, the
    clone is unchanged; then a graceful stop and a restart."""
    setup_pair(daemon)

    qemu_io(daemon, "write -P 0x11 0 16M")
    daemon.cli("pair", "sync", "db1-clone", "--wait")
    daemon.cli("pair", "fracture", "db1-clone")
    qemu_io(daemon, "write -P 0x22 0 8M", "write -P 0x23 20M 1M")
    daemon.cli("pair", "throttle", "db1-clone", "--rate", "2M")
    out = json.loads(daemon.cli("pair", "restore", "db1-clone", "--json").stdout)
    assert out["state"] == "restoring"
    # clone: not ready during a protected restore
    assert "read 512/512" not in qemu_io(daemon, "read 0 512", lun=1, ok=False)
    qemu_io(daemon, "read -P 0x11 0 4M", "write -P 0x44 1M 64k", "read -P 0x44 1M 64k",
            "read -P 0x00 20M 1M")
    daemon.cli("pair", "throttle", "db1-clone", "--rate", "0")   # applies at once
    for _ in range(600):
        p = json.loads(daemon.cli("pair", "show", "db1-clone", "--json").stdout)
        if p["state"] == "fractured":
            break
        time.sleep(0.1)
    assert p["state"] == "fractured" and p["progress"]["delta_extents"] == 1
    qemu_io(daemon, "read -P 0x11 0 1M", "read -P 0x44 1M 64k", "read -P 0x11 2M 14M")
    qemu_io(daemon, "read -P 0x11 0 16M", lun=1)           # the clone is unchanged
    assert daemon.stop() == 0                    # SIGTERM: graceful
    d2 = Daemon.__new__(Daemon)
    d2.__dict__.update(daemon.__dict__)
    d2.init = False
    d2.start()
    try:
        qemu_io(daemon, "read -P 0x44 1M 64k")
        assert "fractured" in d2.cli("pair", "list").stdout
    finally:
        d2.stop()


def test_serve_refuses_missing_database_without_init(tmp_path):
    r = subprocess.run([*LR, "--socket", str(tmp_path / "s"), "serve", "--state-dir",
                        str(tmp_path / "none"), "--portal", f"127.0.0.1:{free_port()}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--init" in r.stderr and "Traceback" not in r.stderr
