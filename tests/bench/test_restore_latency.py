"""The restore latency bench still runs end to end (a tiny LU, short
windows): daemon, initiators, restores, its JSON line, its clean-up. The
numbers of so small a run mean nothing and are not checked."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.bench import restore_latency

RATIOS = ("p50_ratio", "p99_ratio", "qd32_iops_ratio", "restore_rate_busy_vs_idle", "restore_vs_copy")


@pytest.mark.bench
@pytest.mark.skipif(any(shutil.which(t) is None for t in restore_latency.TOOLS),
                    reason="needs qemu-io and qemu-img (bash .ci/install --test)")
def test_restore_latency_smoke(tmp_path, capsys) -> None:
    rc = restore_latency.main(["--size", "32", "--qd1-reads", "50", "--qd32-secs", "0.2",
                               "--idle-windows", "1", "--cycles", "1", "--idle-restores", "1",
                               "--tmp", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    last = json.loads(out.strip().splitlines()[-1])
    assert set(RATIOS) <= set(last)
    # the idle side is always measured; the busy side may have had no window
    assert last["idle_p50_ms"] > 0 and last["idle_qd32_iops"] > 0 and last["restore_vs_copy"] > 0
    assert last["idle_qd1_reads"] == 100        # an idle phase before and after the restore
    assert not list(tmp_path.iterdir()), "scratch directory left behind"
