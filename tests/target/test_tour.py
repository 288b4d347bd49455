"""`liverestore demo --tour` end to end, as a user runs it: a subprocess that
must finish on its own, narrate each step, show the bar moving, read through
copy-on-demand during the restore and verify source and clone."""
from __future__ import annotations

import re
import subprocess

from target.tour import file_block, pattern
from tests.support import LR, ROOT


def test_the_pattern_is_a_file_system_whose_blocks_all_differ():
    blocks = [file_block(n) for n in range(64)]
    assert blocks[0].startswith(b"LRFS") and len(set(blocks)) == 64
    assert all(len(b) == 4096 for b in blocks)
    assert pattern(8192, 8192) == blocks[2] + blocks[3]


def test_tour_runs_the_whole_story_unattended(tmp_path):
    r = subprocess.run([*LR, "demo", "--tour", "--size", "8M", "--tour-state-dir",
                        str(tmp_path / "state")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "Traceback" not in out + r.stderr
    for n in range(1, 7):
        assert f"[{n}/6]" in out
    assert "the file system is gone" in out
    m = re.search(r"that file reads correct .* restore at (\d+)/(\d+) extents; (\d+) extents "
                  r"copied for it", out)
    assert m, out
    done, total, copied = map(int, m.groups())
    assert done < total and copied == 0         # read ahead of the copier, from the clone
    m = re.search(r"so (\d+) extents? copied on demand first", out)
    assert m and int(m.group(1)) >= 1, out      # a partial write copies its extent first
    pcts = [int(p) for p in re.findall(r"\]\s+(\d+)%", out)]
    assert pcts[-1] == 100 and len(set(pcts)) >= 2          # the bar moved
    assert "db1: all 2048 blocks match" in out and "db1-clone: untouched" in out
    assert "Initiator tools on this machine:" in out
    for tool in ("iscsi-ls", "qemu-io", "iscsiadm"):
        assert re.search(rf"^  {tool}\s+(/\S+|missing: apt-get install \S+)", out, re.M)


def test_tour_refuses_an_odd_size_in_one_line(tmp_path):
    r = subprocess.run([*LR, "demo", "--tour", "--size", "5000K", "--tour-state-dir",
                        str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("liverestore demo --tour: FAILED: --size")
