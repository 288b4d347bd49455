"""Following a job with `--wait` / `pair wait` as a user does: the live bar
on a real pseudo-terminal (bytes, rate, ETA, 100%, a final line), plain
lines on a pipe, the exit status of each outcome, and Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pexpect

from target.follow import EXIT_STATUS, Outcome, outcome
from tests.support import LR, ROOT, Daemon

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
MIB = 1 << 20


def slow_pair(d: Daemon, size: str = "4M", rate: str = "2M") -> None:
    """db1 with a fractured clone whose every extent differs, copied at ``rate``."""
    d.cli("volume", "create", "db1", "--size", size)
    d.cli("volume", "create", "db1-clone", "--size", size)
    d.cli("pair", "create", "db1", "db1-clone", "--no-sync")
    d.cli("pair", "throttle", "db1-clone", "--rate", rate, "--batch-extents", "1", "--depth", "1")


def on_pty(d: Daemon, *args: str, timeout: float = 60) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, [*LR[1:], "--socket", d.sock, *args], cwd=ROOT,
                         encoding="utf-8", dimensions=(40, 160), timeout=timeout,
                         env=dict(os.environ, COLUMNS="160"))


def pair(d: Daemon) -> dict:
    return json.loads(d.cli("pair", "show", "db1-clone", "--json").stdout)


def wait_for(cond, what: str, limit: float = 30) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_live_bar_counts_bytes_reaches_100_and_says_what_it_did(daemon):
    slow_pair(daemon)                      # 4 MiB at 2 MiB/s: about 2 s
    p = on_pty(daemon, "pair", "restore", "db1-clone", "--wait")
    p.expect(pexpect.EOF)
    p.close()
    out = ANSI.sub("\n", p.before)
    assert p.exitstatus == 0, out
    # Bytes, not extents: "1.2 MiB / 4.0 MiB", a rate in MiB/s (a 2 MiB/s copy,
    # not "30 bytes/s" of extents), and an ETA.
    assert re.search(r"\d+\.\d MiB / 4\.0 MiB", out), out
    rates = [float(x) for x in re.findall(r"([\d.]+) MiB/s", out)]
    assert rates and max(rates) >= 1.0, out
    assert "extents" not in out.split("restored")[0], out
    assert re.search(r"ETA \d:\d\d:\d\d", out), out
    assert "100%" in out and "4.0 MiB / 4.0 MiB" in out, out
    assert re.search(r"db1-clone: restored 4\.0 MiB in \ds; state fractured, 0 B differ", out), out


def test_plain_lines_on_a_pipe_end_with_what_was_done(daemon):
    slow_pair(daemon)
    r = daemon.cli("pair", "restore", "db1-clone", "--wait")
    lines = r.stdout.splitlines()
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert re.fullmatch(r"db1-clone: restore \d+% [\d.]+ \w?i?B of 4\.0 MiB, [\d.]+ \w?i?B/s, "
                        r"eta [\d:-]+", lines[0]), lines
    assert re.fullmatch(r"db1-clone: restored 4\.0 MiB in \ds; state fractured, 0 B differ",
                        lines[-3]), lines
    assert lines[-1].split()[:4] == ["db1-clone", "db1", "db1-clone", "fractured"]
    # Likewise for a sync.
    r = daemon.cli("pair", "sync", "db1-clone", "--full", "--wait")
    assert re.fullmatch(r"db1-clone: synced 4\.0 MiB in \ds; state synchronized, 0 B differ",
                        r.stdout.splitlines()[-3]), r.stdout
    # Nothing running: it says so and succeeds at once.
    r = daemon.cli("pair", "wait", "db1-clone")
    assert r.stdout.splitlines()[0] == "db1-clone: no job running; state synchronized"


def test_exit_status_paused_and_waiting_for_an_offline_volume(daemon, tmp_path):
    slow_pair(daemon, rate="256K")        # 16 s if left alone
    follow = subprocess.Popen([*LR, "--socket", daemon.sock, "pair", "restore", "db1-clone",
                               "--wait"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: pair(daemon)["progress"]["job"] == "restore", "restore started")
    daemon.cli("pair", "pause", "db1-clone")
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == EXIT_STATUS[Outcome.PAUSED] == 3, (out, err)
    assert err.strip() == ("liverestore: db1-clone: the restore is paused; continue it with "
                           "'liverestore pair resume db1-clone'")
    # `pair wait` on the paused job says the same, with the same status.
    r = daemon.cli("pair", "wait", "db1-clone", ok=False)
    assert r.returncode == 3 and "paused" in r.stderr
    # The clone's image disappears: the job waits for a relink (6), not "done".
    daemon.cli("pair", "resume", "db1-clone")
    os.unlink(json.loads(daemon.cli("volume", "show", "db1-clone", "--json").stdout)["path"])
    wait_for(lambda: pair(daemon).get("offline"), "clone offline")
    r = daemon.cli("pair", "wait", "db1-clone", ok=False)
    assert r.returncode == EXIT_STATUS[Outcome.WAITING] == 6, r.stderr
    assert "volume relink" in r.stderr
    # The codes are in --help.
    h = daemon.cli("pair", "restore", "--help").stdout
    assert all(w in " ".join(h.split()) for w in ("0 the job finished", "3 it was paused",
                                                   "4 it failed", "5 it was aborted"))


def test_failed_and_aborted_jobs_are_their_own_outcomes():
    """A copy error (EIO) cannot be caused from the CLI: the classifier the
    CLI, shell and Ansible share is checked on the daemon's reply."""
    base = {"id": "c", "offline": None,
            "progress": {"job": "restore", "error": None, "paused": False}}
    running = json.loads(json.dumps(base))
    assert outcome(running) is None
    failed = json.loads(json.dumps(base))
    failed["progress"]["error"] = "EIO on clone"
    assert outcome(failed) is Outcome.FAILED and EXIT_STATUS[Outcome.FAILED] == 4
    aborted = json.loads(json.dumps(base))
    aborted["progress"].update(job=None, aborted=True)
    # a restore followed was aborted ('pair abort'); an abort followed just ends
    assert outcome(aborted, "restore") is Outcome.ABORTED and EXIT_STATUS[Outcome.ABORTED] == 5
    assert outcome(aborted, "abort") is Outcome.FINISHED
    aborted["progress"]["job"] = "abort"
    assert outcome(aborted, "restore") is Outcome.ABORTED and outcome(aborted, "abort") is None
    assert len(set(EXIT_STATUS.values())) == len(EXIT_STATUS)


def test_ctrl_c_stops_following_and_says_how_to_follow_again(daemon):
    slow_pair(daemon, rate="256K")
    p = on_pty(daemon, "pair", "restore", "db1-clone", "--wait")
    p.expect("ETA")
    p.sendintr()
    p.expect(pexpect.EOF)
    p.close()
    out = " ".join(ANSI.sub("\n", p.before).split())
    assert p.exitstatus == 130, out
    assert "the restore of db1-clone goes on in the daemon" in out, out
    assert "liverestore pair wait db1-clone" in out, out
    assert "Traceback" not in out
    assert pair(daemon)["progress"]["job"] == "restore"          # it did go on
