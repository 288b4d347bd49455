"""A private tgtd (the Linux SCSI target framework, a C iSCSI target) on
loopback, as a peer to compare liverestore's target against.

Each instance gets its own portal and its own control port (tgtd -C N uses
the management socket /var/run/tgtd/socket.N), so it never touches a system
tgtd on 3260. LUN 0 of a tgtd target is its controller; file-backed LUNs
start at 1.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import time

from tests.support import free_port

TGTD = shutil.which("tgtd") or "/usr/sbin/tgtd"
TGTADM = shutil.which("tgtadm") or "/usr/sbin/tgtadm"
RUN_DIR = "/var/run/tgtd"


def available() -> bool:
    return os.access(TGTD, os.X_OK) and os.access(TGTADM, os.X_OK) and os.geteuid() == 0


def _free_control_port() -> int:
    """tgtd takes control ports up to 32767; pick one no tgtd has a socket for."""
    used = {os.path.basename(p).split(".")[1] for p in glob.glob(f"{RUN_DIR}/socket.*")}
    for _ in range(1000):
        n = random.randint(10000, 32767)
        if str(n) not in used:
            return n
    raise RuntimeError("no free tgtd control port")


class Tgtd:
    def __init__(self, log_path: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.control = _free_control_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.tids: list[int] = []

    def adm(self, *args: str) -> str:
        r = subprocess.run([TGTADM, "-C", str(self.control), "--lld", "iscsi", *args],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def start(self) -> "Tgtd":
        os.makedirs(RUN_DIR, exist_ok=True)
        self.proc = subprocess.Popen(
            [TGTD, "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
            start_new_session=True)
        for _ in range(100):
            if self.proc.poll() is not None:
                raise RuntimeError("tgtd exited:\n" + open(self.log_path).read()[-2000:])
            try:
                self.adm("--mode", "target", "--op", "show")
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except (RuntimeError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("tgtd did not come up:\n" + open(self.log_path).read()[-2000:])

    def add_target(self, iqn: str, backing: list[str], tid: int | None = None) -> int:
        """A target with file-backed LUNs 1..n, open to any initiator."""
        tid = tid or (max(self.tids) + 1 if self.tids else 1)
        self.adm("--mode", "target", "--op", "new", "--tid", str(tid), "-T", iqn)
        self.tids.append(tid)
        for lun, path in enumerate(backing, start=1):
            self.adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                     "--lun", str(lun), "-b", path)
        self.adm("--mode", "target", "--op", "bind", "--tid", str(tid), "-I", "ALL")
        return tid

    def url(self, iqn: str, lun: int = 1) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{iqn}/{lun}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:   # graceful: drop targets (and their sessions), then the daemon
                for tid in self.tids:
                    self.adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
                subprocess.run([TGTADM, "-C", str(self.control), "--mode", "system",
                                "--op", "delete"], capture_output=True, timeout=30)
                self.proc.wait(timeout=10)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for p in (f"{RUN_DIR}/socket.{self.control}", f"{RUN_DIR}/socket.{self.control}.lock"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.proc = None
