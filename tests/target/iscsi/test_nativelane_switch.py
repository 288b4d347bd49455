"""The native READ lane is on by default; LIVERESTORE_ISCSI_LANE=0 in the
daemon's environment turns it off (lane.py reads it at import)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from target.iscsi import lane as lane_mod
from tests.support import ROOT

if lane_mod.Lane is None:
    pytest.skip("the native lane is not built", allow_module_level=True)


@pytest.mark.parametrize("value, on", [(None, True), ("0", False), ("1", True)])
def test_on_by_default_and_0_turns_it_off(value, on):
    env = {k: v for k, v in os.environ.items() if k != "LIVERESTORE_ISCSI_LANE"}
    if value is not None:
        env["LIVERESTORE_ISCSI_LANE"] = value
    r = subprocess.run([sys.executable, "-c", "from target.iscsi import lane; print(lane.ENABLED)"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(on)
