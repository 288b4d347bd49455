"""systemd integration: the notify protocol against a fake NOTIFY_SOCKET,
a reload (SIGHUP) that applies new portals while an iSCSI session stays up,
STATUS= with a running restore, and the unit file through systemd-analyze."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from persistence.config import ConfigStore
from persistence.db import Database
from target.control import Client, ControlError
from target.sdnotify import Notifier
from tests.support import IQN, LR, ROOT, free_port
from tests.target.iscsi.initiator import Initiator

UNIT = os.path.join(ROOT, "target", "systemd", "liverestore.service")
MiB = 1 << 20


class FakeSystemd:
    """The datagram socket systemd listens on for a Type=notify service."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[list[str]] = []

    def wait_for(self, line: str, timeout: float = 30, prefix: bool = False) -> list[str]:
        """The first message (after those already taken) with ``line`` in it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(4096).decode().split("\n")
            except socket.timeout:
                continue
            self.messages.append(msg)
            if any(m.startswith(line) if prefix else m == line for m in msg):
                return msg
        raise AssertionError(f"no {line!r} from the daemon; got {self.messages}")


def test_notifier_speaks_the_protocol_to_path_and_abstract_sockets(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    n = Notifier(str(tmp_path / "notify"))
    n.ready("serving")
    assert fake.wait_for("READY=1") == ["READY=1", "STATUS=serving"]
    n.status("serving")                         # unchanged: not sent again
    n.status("restoring db1-clone 42%")
    assert fake.wait_for("STATUS=restoring db1-clone 42%") == ["STATUS=restoring db1-clone 42%"]
    assert len(fake.messages) == 2
    n.reloading()
    msg = fake.wait_for("RELOADING=1")
    assert msg[1].startswith("MONOTONIC_USEC=")
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"liverestore-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(5)
    Notifier("@" + name).stopping()
    assert abstract.recv(4096).decode().startswith("STOPPING=1\n")
    Notifier("").ready()                        # not under systemd: nothing, no error


def _serve(tmp_path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`serve` on the stored portals (no --portal: reload may change them)."""
    sock = str(tmp_path / "control.sock")
    state = str(tmp_path / "state")
    log = open(tmp_path / "daemon.log", "a")
    proc = subprocess.Popen([*LR, "--socket", sock, "serve", "--state-dir", state],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(200):
        try:
            Client(sock).call("status")
            return proc, sock
        except ControlError:
            assert proc.poll() is None, open(tmp_path / "daemon.log").read()
            time.sleep(0.05)
    raise AssertionError("daemon did not come up")


def test_reload_applies_portals_keeps_sessions_and_status_shows_the_restore(tmp_path):
    p1, p2 = free_port(), free_port()
    state = tmp_path / "state"
    subprocess.run([*LR, "init", "--state-dir", str(state)], cwd=ROOT, check=True,
                   capture_output=True)
    db = Database(str(state / "liverestore.db"))
    ConfigStore(db).set("portals", [["127.0.0.1", p1]])
    db.close()
    fake = FakeSystemd(str(tmp_path / "notify"))
    proc, sock = _serve(tmp_path, {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})

    def cli(*args: str) -> str:
        r = subprocess.run([*LR, "--socket", sock, *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout
    try:
        ready = fake.wait_for("READY=1")
        assert any(m.startswith("STATUS=serving") for m in ready)
        cli("volume", "create", "db1", "--size", "8M")
        cli("volume", "create", "db1-clone", "--size", "8M")
        cli("pair", "create", "db1", "db1-clone", "--wait")
        cli("pair", "fracture", "db1-clone")
        cli("export", "create", IQN, "--lun", "0=db1")
        cli("export", "portal", f"127.0.0.1:{p1}", f"127.0.0.1:{p2}")

        async def session_survives_reload() -> None:
            ini = Initiator("127.0.0.1", p1)
            await ini.login(IQN)
            await ini.scsi(0, bytes(6))                    # takes the power-on UA
            await ini.write(0, 0, b"\x5a" * 8 * MiB)
            proc.send_signal(signal.SIGHUP)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, fake.wait_for, "RELOADING=1")
            await loop.run_in_executor(None, fake.wait_for, "READY=1")
            assert await ini.read(0, 0, 8) == b"\x5a" * 4096     # the same session
            other = Initiator("127.0.0.1", p2)                    # the new portal
            await other.login(IQN)
            await other.logout()
            await other.close()
            await ini.logout()
            await ini.close()
        asyncio.run(session_survives_reload())
        assert "daemon.reloaded" in cli("events")
        cli("pair", "throttle", "db1-clone", "--rate", "1M")
        cli("pair", "restore", "db1-clone")
        msg = fake.wait_for("STATUS=restoring db1-clone ", prefix=True)
        pct = int(next(m for m in msg if m.startswith("STATUS=")).split()[-1].rstrip("%"))
        assert 0 <= pct < 100
        cli("pair", "throttle", "db1-clone", "--rate", "0")
        proc.send_signal(signal.SIGTERM)
        fake.wait_for("STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze (package systemd) not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify wants ExecStart's program to exist: point it at this install's
    text = open(UNIT).read().replace("/opt/liverestore/.venv/bin/liverestore",
                                     os.path.join(os.path.dirname(sys.executable), "liverestore"))
    unit = tmp_path / "liverestore.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    # it exits 0 even for a line it ignores: any message is a failure
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    assert "Type=notify" in text and "ExecReload=" in text
