"""kill -9 of a restore with the clone on RBD: tests/restore_core's crash
test and its invariants, the clone read back after every kill by an
independent client (qemu-img over librbd) and compared with its
fracture-time image. Each restart breaks the lock its killed run left
(the recorded owner), as the daemon does."""
from __future__ import annotations

import os
import subprocess

from tests.restore_core.crash_worker import CLONE_RBD_ENV
from tests.restore_core.test_crash import crash_cycles

CYCLES = int(os.environ.get("LIVERESTORE_RBD_CRASH_CYCLES", "20"))


def test_kill9_during_restore_with_the_clone_on_rbd(ceph, tmp_path, monkeypatch):
    location = ceph.spec().location
    monkeypatch.setenv(CLONE_RBD_ENV, location)
    compared = []

    def clone_unchanged(p: dict[str, str], clone: bytes) -> None:
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", p["orig"], location],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"the clone changed during a protected restore: {r.stdout}"
        compared.append(1)

    crash_cycles(tmp_path, cycles=CYCLES, seed=31, rate=4 << 20, clone_check=clone_unchanged)
    assert len(compared) == CYCLES + 1
