"""RBD volumes through a real `liverestore serve`: the CLI and the shell,
a kill -9 of the daemon (the restart takes back its own image at once),
and libiscsi's conformance suite on an RBD-backed LU against a file-backed
LU of the same daemon, in the same run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.peers import cunit
from tests.support import IQN, LR, ROOT, Daemon
from tests.target.test_conformance import SUITE, report, run_suite

MiB = 1 << 20


def shell(d: Daemon, *line: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LR, "--socket", d.sock, "shell", *line], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def show(d: Daemon, name: str) -> dict:
    return json.loads(d.cli("volume", "show", name, "--json").stdout)


def test_cli_shell_and_kill9_restart(ceph, daemon, tmp_path):
    img = ceph.spec().image_name
    d = daemon
    d.cli("volume", "create", "r", "--rbd", img, "--ceph-conf", ceph.conf, "--size", "8M")
    out = d.cli("volume", "list").stdout
    header, row = out.splitlines()[0], next(ln for ln in out.splitlines() if ln.startswith("r "))
    assert "STORE" in header and " rbd " in row and f"rbd:{img}:conf=" in row
    for bad in ("rbd/a;b", "rbd/$(id)", "../x/y"):
        r = d.cli("volume", "create", "bad", "--rbd", bad, "--ceph-conf", ceph.conf,
                  "--size", "4M", ok=False)
        assert r.returncode != 0 and "bad RBD" in r.stderr and len(r.stderr.splitlines()) == 1
    r = d.cli("volume", "create", "bad", "--rbd", "rbd/x", "--path", "/tmp/x", ok=False)
    assert r.returncode != 0 and "not allowed with" in r.stderr
    s_img = ceph.spec().image_name
    r = shell(d, "/volumes", "create", "s", f"rbd={s_img}", f"ceph_conf={ceph.conf}", "size=4M")
    assert r.returncode == 0 and f"at rbd:{s_img}" in r.stdout, r.stderr
    r = shell(d, "ls", "/volumes")
    assert f"on {s_img} (RBD)" in r.stdout
    d.cli("volume", "delete", "s")

    # kill -9 while the daemon holds the image's lock: the restart breaks
    # the lock its dead run left (recorded owner) instead of waiting it out
    d.stop(signal.SIGKILL)
    t0 = time.monotonic()
    d.init = False
    d.start()
    v = show(d, "r")
    assert v["offline"] is None and v["access"] == "read-write", v
    assert time.monotonic() - t0 < 20, "the restart waited for the dead client's watch"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("iscsi-test-cu"), reason="iscsi-test-cu not installed")
@pytest.mark.timeout(3600)
def test_iscsi_test_cu_rbd_lu_vs_file_lu(ceph, tmp_path, measured):
    names = cunit.listing(SUITE)
    d = Daemon(tmp_path).start()
    size = "128M"
    try:
        d.cli("volume", "create", "onfile", "--size", size)
        d.cli("volume", "create", "onrbd", "--rbd", ceph.spec().image_name,
              "--ceph-conf", ceph.conf, "--size", size)
        d.cli("export", "create", IQN, "--lun", "0=onfile", "--lun", "1=onrbd")
        on_file = run_suite(f"{d.url}/0", str(tmp_path / "file"), names)
        on_rbd = run_suite(f"{d.url}/1", str(tmp_path / "rbd"), names)
    finally:
        if d.proc and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
    measured(f"iscsi-test-cu --dataloss ({len(names)} tests): file-backed LU {on_file.passed} "
             f"passed, RBD-backed LU {on_rbd.passed}")
    worse = report("RBD-backed LU (vs the file-backed LU)", on_rbd, on_file)
    assert on_rbd.passed >= on_file.passed, f"failing on RBD only: {', '.join(worse)}"
