"""Write-residual CDB decoding and the ``python -m target.iscsi`` entry point."""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from target.iscsi.__main__ import parse_portal, parse_size
from target.iscsi.residual import block_size_of, data_out_length
from tests.support import free_port


@pytest.mark.parametrize("cdb,bs,want", [
    (bytes((0x0A, 0, 0, 0, 0, 0)), 512, 256 * 512),                     # WRITE(6): 0 = 256 blocks
    (bytes((0x0A, 0, 0, 0, 3, 0)), 4096, 3 * 4096),
    (struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 7, 0), 512, 7 * 512),         # WRITE(10)
    (struct.pack(">BBIBHB", 0x2E, 0, 0, 0, 2, 0), 512, 1024),           # WRITE AND VERIFY(10)
    (struct.pack(">BBIIBB", 0xAA, 0, 0, 9, 0, 0), 512, 9 * 512),         # WRITE(12)
    (struct.pack(">BBQIBB", 0x8A, 0, 0, 70000, 0, 0), 512, 70000 * 512),  # WRITE(16)
    (struct.pack(">BBQIBB", 0x93, 0, 0, 100, 0, 0), 512, 512),           # WRITE SAME(16): one block
    (struct.pack(">BBQIBB", 0x93, 1, 0, 100, 0, 0), 512, 0),             # ... NDOB
    (bytes((0x89,) + (0,) * 12 + (1, 0, 0)), 512, 1024),               # COMPARE AND WRITE, NLB 1
    (struct.pack(">BBBHIB", 0x5F, 0, 0, 0, 24, 0), None, 24),            # PR OUT: bytes
    (bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0)), None, 24),              # UNMAP
    (bytes((0x15, 0x10, 0, 0, 28, 0)), None, 28),                       # MODE SELECT(6)
    (struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 7, 0), None, None),          # blocks but no block size
    (bytes((0x28,) + (0,) * 9), 512, None),                             # READ: no Data-Out
    (b"", 512, None),
    (bytes((0x8A, 0)), 512, None),                                      # truncated CDB
])
def test_data_out_length(cdb, bs, want):
    assert data_out_length(cdb, bs) == want


def test_block_size_of():
    class Dev:
        block_size = 4096

    class Set:
        def device(self, lun):
            return Dev() if lun == 1 else None
    assert block_size_of(Set(), 1) == 4096
    assert block_size_of(Set(), 2) is None
    assert block_size_of(object(), 0) is None


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
