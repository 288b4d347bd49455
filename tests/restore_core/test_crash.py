"""kill -9 crash test: a restore under random host writes, SIGKILLed at
random moments and restarted until it completes.

After every kill: the clone is bit-identical to its image before the
restore; every acknowledged write is in the source (bytes a later,
unacknowledged write may have touched hold one of the two values); every
other byte of every extent no longer to restore equals the clone. At the
end: the pair is fractured and its delta map covers every extent where
source and clone differ, and only extents the host wrote.

The keep-undo variant aborts the restore at a random moment (or once it
has finished): from then on every extent put back -- every extent but those
still to put back -- holds the source's data before the restore, or the
host's if it was written since the restore began (an acknowledged write);
an extent only cut writes touched may hold either.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

from persistence.db import Database
from persistence.sqlite_store import SqliteMetadataStore
from restore_core.committer import load_map
from restore_core.extentmap import extent_count

from .crash_worker import ES, PAIR, SIZE, paths, write_data

NEXT = extent_count(SIZE, ES)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.restore_core.crash_worker", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def clone_file_unchanged(p: dict[str, str], clone: bytes) -> None:
    with open(p["cln"], "rb") as f:
        assert f.read() == clone, "the clone changed during a protected restore"


class Checker:
    def __init__(self, d: str,
                 clone_check: Callable[[dict[str, str], bytes], None] = clone_file_unchanged
                 ) -> None:
        self.clone_check = clone_check
        self.p = paths(d)
        with open(self.p["orig"], "rb") as f:
            self.clone = f.read()
        self.expect = bytearray(self.clone)
        self.allowed: dict[int, set[int]] = {}
        self.written = [False] * NEXT
        self.log_pos = 0
        self.pending: dict[int, tuple[int, int]] = {}
        self.round: float | None = None     # job start time of the restore in effect
        self.rounds = 0
        self.acked = [False] * NEXT         # extents an acknowledged write touched
        self.undo = os.path.exists(self.p["pre"]) and os.path.exists(self.p["undo"])
        self.aborted = False
        if self.undo:
            with open(self.p["pre"], "rb") as f:
                self.pre = f.read()

    def new_round(self, started_at: float) -> None:
        """A new restore began: everything goes back to the clone's data,
        except what the host writes from now on."""
        if self.round == started_at:
            return
        if self.round is not None:
            self.rounds += 1
        self.round = started_at
        self.expect = bytearray(self.clone)
        self.allowed.clear()
        self.written = [False] * NEXT
        self.acked = [False] * NEXT

    def abort(self) -> None:
        """The keep-undo restore is aborted (no write was in flight)."""
        if self.aborted:
            return
        self.aborted = True
        for e in range(NEXT):
            if self.acked[e]:
                continue
            for i in range(e * ES, (e + 1) * ES):
                if self.written[e]:
                    self.allowed.setdefault(i, {self.expect[i]}).add(self.pre[i])
                self.expect[i] = self.pre[i]

    def read_log(self) -> None:
        """Apply the writes acknowledged since the last look, in ack order;
        writes intended but never acknowledged (cut by the kill) are in doubt."""
        with open(self.p["log"]) as f:
            f.seek(self.log_pos)
            data = f.read()
        complete = data[:data.rfind("\n") + 1]
        self.log_pos += len(complete.encode())
        for line in complete.splitlines():
            parts = line.split()
            if parts[0] == "R":
                self.new_round(float(parts[1]))
            elif parts[0] == "X":
                self.abort()
            elif parts[0] == "I":
                seq, off, n = int(parts[1]), int(parts[2]), int(parts[3])
                self.pending[seq] = (off, n)
                for e in range(off // ES, (off + n - 1) // ES + 1):
                    self.written[e] = True
            else:
                seq = int(parts[1])
                off, n = self.pending.pop(seq)
                self.expect[off:off + n] = write_data(seq, n)
                for i in range(off, off + n):
                    self.allowed.pop(i, None)
                for e in range(off // ES, (off + n - 1) // ES + 1):
                    self.acked[e] = True

    def after_kill(self) -> None:
        self.read_log()
        for seq, (off, n) in self.pending.items():
            new = write_data(seq, n)
            for j in range(n):
                self.allowed.setdefault(off + j, {self.expect[off + j]}).add(new[j])
        self.pending.clear()

    def maps(self):
        db = Database(self.p["db"])
        try:
            snap = SqliteMetadataStore(db).load()
        finally:
            db.close()
        rec = snap.pairs[PAIR]
        m = {k: load_map(NEXT, snap.maps.get(f"{PAIR}/{k}", {}))
             for k in ("delta", "done", "marks", "saved")}
        return rec, m

    def check(self, final: bool) -> None:
        self.clone_check(self.p, self.clone)
        with open(self.p["src"], "rb") as f:
            src = f.read()
        rec, m = self.maps()
        if self.undo and (rec["state"] == "aborting" or rec["undo"] is None):
            self.abort()      # killed after the abort was durable, before its log line
        elif rec["job"] is not None:
            # killed after a new restore was durable but before its log line
            self.new_round(float(rec["job"]["started_at"]))
        todo = (m["saved"] if self.aborted else m["delta"]).bits & ~m["done"].bits \
            & ~m["marks"].bits
        for e in range(NEXT):
            if todo[e] and not final:
                continue       # not restored yet: will be copied
            a, b = e * ES, (e + 1) * ES
            if src[a:b] == bytes(self.expect[a:b]):
                continue
            for i in range(a, b):
                ok = self.allowed.get(i)
                if ok is None:
                    assert src[i] == self.expect[i], \
                        f"byte {i} (extent {e}) lost: an acknowledged write, the clone's " \
                        "or the pre-restore data"
                else:
                    assert src[i] in ok, f"byte {i}: no write ever put {src[i]} there"
        if final:
            assert rec["state"] == "fractured" and rec["job"] is None
            if self.undo:
                assert self.aborted and rec["undo"] is None
                assert not os.listdir(self.p["undo"]), "the undo image outlived the abort"
            for e in range(NEXT):
                a, b = e * ES, (e + 1) * ES
                if src[a:b] != self.clone[a:b]:
                    assert m["delta"].test(e), f"extent {e} differs but its delta bit is clear"
                if m["delta"].test(e) and not self.undo:
                    assert self.written[e], f"extent {e} in the delta map but never written"


def crash_cycles(tmp_path, cycles: int, seed: int, rate: int = 256 << 10,
                 clone_check: Callable[[dict[str, str], bytes], None] = clone_file_unchanged,
                 undo: bool = False) -> int:
    """With ``undo``: a keep-undo restore, aborted in the second half of
    the cycles (or, if it finished before, in the last run)."""
    d = str(tmp_path)
    s = worker("setup", d, str(seed), "1", *(["undo"] if undo else []))
    out, err = s.communicate(timeout=300)
    assert s.returncode == 0, err
    chk = Checker(d, clone_check)
    chk.new_round(float(chk.maps()[0]["job"]["started_at"]))
    rnd = random.Random(seed)
    for cycle in range(cycles):
        mode = ["abort" if cycle >= cycles // 2 else "finish"] if undo else []
        w = worker("run", d, str(seed + cycle), str(rate), *mode)
        assert w.stdout is not None
        line = w.stdout.readline()        # engine started, writer about to run
        assert line.strip() == "running", w.stderr.read() if w.stderr else ""
        time.sleep(rnd.uniform(0.0, 0.6))
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=60)
        chk.after_kill()
        chk.check(final=False)
    w = worker("run", d, str(seed + 10**6), "0", "finish" if undo else "last")
    out, err = w.communicate(timeout=600)
    assert w.returncode == 0 and "DONE" in out, err
    chk.read_log()
    assert not chk.pending
    chk.check(final=True)
    return chk.rounds


def test_kill9_during_restore_short(tmp_path):
    crash_cycles(tmp_path, cycles=6, seed=11, rate=4 << 20)


def test_kill9_keep_undo_restore_and_abort_short(tmp_path):
    crash_cycles(tmp_path, cycles=8, seed=5, rate=1 << 20, undo=True)


@pytest.mark.crash
@pytest.mark.slow
def test_kill9_keep_undo_restore_and_abort_100_cycles(tmp_path):
    for i in range(int(os.environ.get("LIVERESTORE_UNDO_CRASH_RUNS", "4"))):
        d = tmp_path / str(i)
        d.mkdir()
        crash_cycles(d, cycles=25, seed=31 + i, rate=512 << 10, undo=True)


@pytest.mark.crash
@pytest.mark.slow
def test_kill9_during_restore_100_cycles(tmp_path):
    rounds = crash_cycles(tmp_path, cycles=int(os.environ.get("LIVERESTORE_CRASH_CYCLES", "100")),
                          seed=23)
    assert rounds >= 2, "kills never spanned a restore's end and the next one's start"
