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

from tests.ceph.util import read_image, take_over
from tests.peers import cunit
from tests.support import IQN, LR, ROOT, Daemon, qemu_io
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


def test_takeover_under_1m_writes_through_iscsi_then_relink_and_a_clean_exit(ceph, tmp_path):
    """Another client takes the image while a host writes 1 MiB at depth 8
    through iSCSI: the host's writes fail within a bounded time, the volume
    goes offline, and a relink once the other client let go brings it back.
    Then a takeover while the host is idle: its next write fails at once and
    never lands. The daemon stops cleanly after both. (Zero-copy writes, which
    librbd 16.2.15 never completes after a blocklisting, hung here: see
    RbdStore._open.)"""
    spec = ceph.spec()
    d = Daemon(tmp_path).start()
    try:
        d.cli("volume", "create", "r", "--rbd", spec.image_name, "--ceph-conf", ceph.conf,
              "--size", "64M")
        d.cli("export", "create", IQN, "--lun", "0=r")
        bench = subprocess.Popen(["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-n",
                                  "-c", "1000000", "-d", "8", "-s", "1M", "--pattern", "165",
                                  f"{d.url}/0"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        time.sleep(3)                                   # writes flowing
        assert bench.poll() is None, bench.communicate()[0]
        img, close = take_over(spec)
        t0 = time.monotonic()
        try:
            out = bench.communicate(timeout=60)[0]
            assert bench.returncode != 0, out           # a write failed: the host was told
            assert time.monotonic() - t0 < 15, "the host's writes waited out the takeover"
            v = show(d, "r")
            assert v["access"] == "not-ready" and "blocklisted" in v["offline"], v
            img.write(b"\x11" * 4096, 0)               # the new owner's data
        finally:
            close()
        d.cli("volume", "relink", "r")
        v = show(d, "r")
        assert v["offline"] is None and v["access"] == "read-write", v

        img, close = take_over(spec)
        try:
            time.sleep(1)
            t0 = time.monotonic()
            out = qemu_io(d, "write -P 0x33 8192 4096", ok=False)
            assert "error" in out.lower(), out
            assert time.monotonic() - t0 < 15, "the host's write waited out the takeover"
            assert "blocklisted" in show(d, "r")["offline"]
        finally:
            close()
        d.cli("volume", "relink", "r")
        out = qemu_io(d, "write -P 0x22 4096 4096")
        assert "error" not in out.lower(), out
    finally:
        rc = d.stop()
    assert rc == 0
    # 0xa5: the bench's writes acknowledged before the first takeover
    # (every 1 MiB of the image, many times over); 0x33 never landed
    assert read_image(spec, 0, 12288) == b"\x11" * 4096 + b"\x22" * 4096 + b"\xa5" * 4096
    log = open(d.log).read()
    assert "Traceback" not in log and log.count("fenced:") == 2, log[-3000:]
