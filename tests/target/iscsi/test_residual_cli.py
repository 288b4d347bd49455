"""The ``python -m target.iscsi`` entry point (its CLI parsers and a run)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from target.iscsi.__main__ import parse_portal, parse_size
from tests.support import free_port


def test_cli_parsers():
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    assert parse_portal("127.0.0.1:3261") == ("127.0.0.1", 3261)
    assert parse_portal("[::1]:3262") == ("::1", 3262)
    for bad in ("nonsense", "1:2:3"):
        with pytest.raises(Exception):
            parse_portal(bad)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.skipif(not shutil.which("iscsi-ls"), reason="libiscsi-bin (iscsi-ls) not installed")
def test_cli_serves_files(tmp_path):
    port = free_port()
    iqn = "iqn.2025-01.org.test:cli"
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "target.iscsi", "--lun0", f"{tmp_path}/a.img:16M",
                             "--lun3", f"{tmp_path}/b.img:8M", "--portal", f"127.0.0.1:{port}",
                             "--iqn", iqn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith(f"serving {iqn} LUNs [0, 3]"), line + proc.stderr.read(4096).decode()
        out = subprocess.run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{port}"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Lun:0" in out.stdout and "Lun:3" in out.stdout
        assert os.path.getsize(tmp_path / "a.img") == 16 << 20
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(5)
    assert rc == 0
    err = proc.stderr.read().decode()
    assert "Traceback" not in err


def test_cli_reports_bad_config_without_traceback(tmp_path):
    for args in (["--lun0", f"{tmp_path}/missing-dir/x.img:1M"],
                 ["--lun0", f"{tmp_path}/x.img:1M", "--iqn", "not-an-iqn"]):
        p = subprocess.run([sys.executable, "-m", "target.iscsi", *args], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
