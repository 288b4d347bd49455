"""libiscsi's conformance suite (`iscsi-test-cu --dataloss`, every test)
against a peer C target (tgtd, equal file-backed LUN) and against our
embedded iSCSI target, in the same run; then against our target again while
a protected restore is in progress on the LUN under test (the pair's source).

Our pass count must be at least tgtd's, both idle and during the restore.
The test prints both counts, the tests we fail that tgtd passes (with the
suite's own failure messages), and keeps each run's full output in the
test's tmp dir (`<tmp>/{tgtd,ours,ours-restoring}/suite.txt`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.peers import cunit
from tests.peers.tgt import Tgtd, available as tgt_available
from tests.support import IQN, Daemon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("iscsi-test-cu"),
                       reason="iscsi-test-cu (libiscsi-bin) not installed"),
    pytest.mark.skipif(not tgt_available(), reason="tgtd/tgtadm (tgt) not installed, or not root"),
]

SUITE = shutil.which("iscsi-test-cu") or "iscsi-test-cu"
TGT_IQN = "iqn.2026-11.io.liverestore.peer:tgt"
SIZE = 128 << 20                 # both LUNs: 128 MiB, file-backed
SUITE_TIMEOUT = 900              # one whole-suite run (normally 1-3 minutes)
RESTORE_RATE = "64K"             # bytes/s: the restore outlasts a suite run by far


def run_suite(url: str, workdir: str, names: list[str]) -> cunit.Result:
    """The whole suite with destructive tests allowed, verbose (per-test
    verdicts and messages); output kept in workdir/suite.txt."""
    os.makedirs(workdir, exist_ok=True)
    out_path = os.path.join(workdir, "suite.txt")
    with open(out_path, "w") as out:
        try:
            r = subprocess.run([SUITE, "--dataloss", url], cwd=workdir, stdout=out,
                               stderr=subprocess.STDOUT, timeout=SUITE_TIMEOUT)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = open(out_path, errors="replace").read()
    res = cunit.parse(text, names)
    assert res.passed is not None, (
        f"iscsi-test-cu against {url} gave no run summary (exit {rc}); "
        f"tail of {out_path}:\n{text[-3000:]}")
    assert res.consistent(), (
        f"parsed {len(res.tests)} tests / {len(res.failed)} failures but the summary says "
        f"ran {res.ran} / failed {res.failed_count}: see {out_path}")
    return res


def worse_than(ours: cunit.Result, peer: cunit.Result) -> list[str]:
    return [n for n in ours.tests if n in ours.failed and n not in peer.failed]


def details(url: str, tests: list[str], workdir: str, limit: int = 30) -> dict[str, list[str]]:
    """Re-run each given test alone with libiscsi's verbose SCSI logging
    (-V) for the target's actual answers ("[FAILED] Target returned error
    SENSE KEY:... ASCQ:..."), which the whole-suite output leaves out."""
    os.makedirs(workdir, exist_ok=True)
    out: dict[str, list[str]] = {}
    for name in tests[:limit]:
        try:
            r = subprocess.run([SUITE, "--dataloss", "-V", "-t", name, url], cwd=workdir,
                               capture_output=True, text=True, timeout=120)
            text = r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") + "\n[FAILED] timed out"
        with open(os.path.join(workdir, name + ".txt"), "w") as f:
            f.write(text)
        lines = [ln.strip() for ln in text.splitlines()
                 if "[FAILED]" in ln or "did not" in ln or "does not" in ln]
        out[name] = list(dict.fromkeys(lines))[:8]
    return out


def report(label: str, ours: cunit.Result, peer: cunit.Result,
           more: dict[str, list[str]] | None = None) -> list[str]:
    worse = worse_than(ours, peer)
    better = [n for n in ours.tests if n in peer.failed and n not in ours.failed]
    print(f"\n== {label}: {ours.passed}/{ours.total} passed, {ours.failed_count} failed "
          f"(tgtd: {peer.passed}/{peer.total})")
    print(f"   failed here but passed by tgtd ({len(worse)}):")
    for n in worse:
        whys = list(dict.fromkeys((more or {}).get(n, []) + ours.failed[n]))
        for i, why in enumerate(whys or ["(no message)"]):
            print(f"     {n if i == 0 else ' ' * len(n)}  {why}")
        if n in peer.skipped:
            print(f"     {' ' * len(n)}  (tgtd only skipped this test, counted as a pass)")
    print(f"   passed here but failed by tgtd ({len(better)}): {', '.join(better) or '-'}")
    return worse


def pair_state(d: Daemon) -> dict:
    return json.loads(d.cli("pair", "show", "db1-clone", "--json").stdout)


def fill(url: str) -> None:
    """Write every block of the LUN (so a restore has every extent to copy)."""
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", url],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fail" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


@pytest.mark.timeout(4 * SUITE_TIMEOUT + 600)
def test_iscsi_test_cu_vs_tgtd(tmp_path, measured):
    names = cunit.listing(SUITE)
    assert len(names) > 500, "iscsi-test-cu -l listed too few tests"

    # (a) the peer: tgtd, one file-backed LUN of the same size
    backing = str(tmp_path / "tgt-lun.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    tgt = Tgtd(str(tmp_path / "tgtd.log"))
    d = None
    more: dict[str, list[str]] = {}
    try:
        tgt.start()
        tgt.add_target(TGT_IQN, [backing])
        t0 = time.monotonic()
        peer = run_suite(tgt.url(TGT_IQN, 1), str(tmp_path / "tgtd"), names)
        t_peer = time.monotonic() - t0
        tgt.stop()

        # (b) ours: the source of a fractured pair, exported as LUN 0
        d = Daemon(tmp_path).start()
        size = f"{SIZE >> 20}M"
        d.cli("volume", "create", "db1", "--size", size)
        d.cli("volume", "create", "db1-clone", "--size", size)
        d.cli("pair", "create", "db1", "db1-clone", "--wait")
        d.cli("pair", "fracture", "db1-clone")
        d.cli("export", "create", IQN, "--lun", "0=db1")
        url = f"{d.url}/0"
        t0 = time.monotonic()
        ours = run_suite(url, str(tmp_path / "ours"), names)
        t_ours = time.monotonic() - t0
        # the failures tgtd does not have, one by one with the target's answers
        # (once per distinct Suite.Test: the families repeat suites)
        distinct = {}
        for n in worse_than(ours, peer):
            distinct.setdefault(n.split(".", 1)[1], n)
        more = details(url, list(distinct.values()), str(tmp_path / "ours-detail"))
        more = {n: more[distinct[n.split(".", 1)[1]]] for n in worse_than(ours, peer)
                if distinct[n.split(".", 1)[1]] in more}

        # (c) ours during a protected restore of that LUN from its clone,
        # throttled so that it stays in progress for the whole run
        if shutil.which("qemu-io"):
            fill(url)
        d.cli("pair", "throttle", "db1-clone", "--rate", RESTORE_RATE)
        started = json.loads(d.cli("pair", "restore", "db1-clone", "--json").stdout)
        assert started["state"] == "restoring", started
        t0 = time.monotonic()
        during = run_suite(url, str(tmp_path / "ours-restoring"), names)
        t_during = time.monotonic() - t0
        after = pair_state(d)
    finally:
        tgt.stop()
        if d is not None and d.proc and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(timeout=60)

    print(f"\niscsi-test-cu --dataloss, {len(names)} tests; output under {tmp_path}")
    print(f"tgtd:                 {peer.passed} passed, {peer.failed_count} failed "
          f"({t_peer:.0f} s)")
    print(f"ours:                 {ours.passed} passed, {ours.failed_count} failed "
          f"({t_ours:.0f} s)")
    print(f"ours during restore:  {during.passed} passed, {during.failed_count} failed "
          f"({t_during:.0f} s; restore {after['progress']['extents_done']}/"
          f"{after['progress']['extents_total']} extents, state {after['state']})")
    measured(f"iscsi-test-cu --dataloss ({len(names)} tests): tgtd {peer.passed} passed, "
             f"ours {ours.passed}, ours during a protected restore {during.passed}")
    worse = report("ours", ours, peer, more)
    worse_during = report("ours during a protected restore", during, peer, more)

    # The restore must really have been in progress for the whole run (c).
    assert after["state"] == "restoring" and after["progress"]["job"] == "restore", after
    problems = []
    if ours.passed < peer.passed:
        problems.append(f"ours passes {ours.passed} < tgtd's {peer.passed}; failing where "
                        f"tgtd passes: {', '.join(worse)}")
    if during.passed < peer.passed:
        problems.append(f"ours during a restore passes {during.passed} < tgtd's {peer.passed}; "
                        f"failing where tgtd passes: {', '.join(worse_during)}")
    assert not problems, "\n".join(problems)
