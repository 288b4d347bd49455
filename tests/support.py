"""What several test modules need to run `liverestore serve` as a real
process: paths, a free port, and the Daemon wrapper (start, CLI, stop).
The ``daemon`` fixture built on it lives in tests/conftest.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from target.control import Client, ControlError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = [sys.executable, "-m", "target.cli"]
IQN = "iqn.2026-11.io.liverestore.test:t1"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    def __init__(self, tmp, init: bool = True, extra: tuple[str, ...] = (),
                 state_dir: str | None = None, sock: str | None = None,
                 cwd: str = ROOT) -> None:
        self.dir = state_dir or str(tmp / "state")
        self.sock = sock or str(tmp / "control.sock")
        self.extra = list(extra)          # more `serve` options
        self.port = free_port() if not hasattr(tmp, "port") else tmp.port
        self.init = init
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log = str(tmp / "daemon.log")

    def start(self) -> "Daemon":
        args = [*LR, "--socket", self.sock, "serve", "--state-dir", self.dir,
                "--portal", f"127.0.0.1:{self.port}"]
        if self.init:
            args.append("--init")
        args += self.extra
        self.proc = subprocess.Popen(args, cwd=self.cwd, stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT)
        for _ in range(200):
            if os.path.exists(self.sock):
                try:
                    Client(self.sock).call("status")
                    return self
                except ControlError:
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(open(self.log).read())
            time.sleep(0.05)
        raise AssertionError("daemon did not come up:\n" + open(self.log).read())

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*LR, "--socket", self.sock, *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    def stop(self, sig=signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}"


def qemu_io(d: Daemon, *cmds: str, lun: int = 0, ok: bool = True) -> str:
    """Run qemu-io's commands, in one process, against LUN `lun` of the
    daemon's export through iSCSI; its output. With ok (as Daemon.cli), the
    run must exit 0 and no command may report a failure."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [f"{d.url}/{lun}"], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    if ok:
        assert r.returncode == 0 and "fail" not in out.lower(), out
    return out


def secret_file(d: Daemon, secret: str) -> str:
    """A file holding a CHAP secret for `--chap-secret-file` (never argv)."""
    path = os.path.join(os.path.dirname(d.dir), "chap-secret")
    with open(path, "w") as f:
        f.write(secret + "\n")
    return path
