"""What the CLI prints for a person (no --json): a line that says what was
done, detailed `show` views, plurals, and silence on a closed pipe."""
from __future__ import annotations

import json
import os
import re
import subprocess

from tests.support import IQN, LR, ROOT


def test_every_command_prints_human_text_without_json(daemon, tmp_path):
    d = daemon
    d.cli("volume", "create", "db1", "--size", "1536K", "--extent-size", "512K")
    d.cli("volume", "create", "db1-clone", "--size", "1536K")
    d.cli("pair", "create", "db1", "db1-clone", "--no-sync")
    out = d.cli("pair", "throttle", "db1-clone", "--rate", "100M", "--depth", "4").stdout
    assert out.strip() == ("throttle of db1-clone: rate 100.0 MiB/s, 16 extents per copy, "
                           "depth 4, host window 8 copy round trips, min progress 10% of idle, "
                           "calibration hold 50 ms"), out
    show = d.cli("pair", "show", "db1-clone").stdout
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in show.splitlines()
                  if re.match(r"\S", line))
    assert fields["size"] == "1.5 MiB (1572864 bytes)", show
    assert fields["extent size"] == "512.0 KiB (524288 bytes), 3 extents", show
    assert fields["state"] == "fractured" and fields["job"] == "none", show
    assert fields["delta"] == "1.5 MiB (1572864 bytes) in 3 extents", show
    assert fields["throttle"].startswith("rate 100.0 MiB/s, 16 extents per copy, depth 4")
    vshow = d.cli("volume", "show", "db1").stdout
    assert re.search(r"^size\s+1\.5 MiB \(1572864 bytes\)$", vshow, re.M), vshow
    assert re.search(r"^role\s+source$", vshow, re.M) and "db1-clone" in vshow, vshow
    assert d.cli("export", "portal", "127.0.0.1:3999").stdout.strip() == (
        "portals set to 127.0.0.1:3999; takes effect at the next reload (systemctl reload "
        "liverestore) or restart")
    saved = tmp_path / "saved.json"
    d.cli("saveconfig", str(saved))
    assert d.cli("pair", "delete", "db1-clone").stdout.strip() == "deleted db1-clone"
    r = d.cli("volume", "delete", "db1-clone").stdout.strip()
    assert re.fullmatch(r"deleted db1-clone; its image /\S+/db1-clone\.img was left in place", r)
    os.unlink(os.path.join(d.dir, "volumes", "db1-clone.img"))
    assert d.cli("restoreconfig", str(saved)).stdout.strip() == (
        "created 1 volume (db1-clone), 1 pair (db1-clone)")
    assert d.cli("restoreconfig", str(saved)).stdout.strip() == (
        "nothing to create: everything in it is already there")
    assert json.loads(d.cli("restoreconfig", str(saved), "--json").stdout) == {
        "created": {"volumes": [], "pairs": [], "groups": [], "targets": []}}
    # Plurals: one of each in the shell's tree.
    d.cli("export", "create", IQN, "--lun", "0=db1")
    tree = d.cli("shell", "ls").stdout
    assert "[1 target]" in tree and "[1 LUN]" in tree and "[1 pair, 0 busy]" in tree, tree
    assert "1 volumes" not in tree and "1 targets" not in tree


def test_a_closed_pipe_is_no_error(daemon):
    """`liverestore volume list | head -0`: the reader is gone; no message."""
    daemon.cli("volume", "create", "db1", "--size", "1M")
    r_end, w_end = os.pipe()
    os.close(r_end)
    try:
        r = subprocess.run([*LR, "--socket", daemon.sock, "volume", "list"], cwd=ROOT,
                           stdout=w_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w_end)
    assert r.stderr == "" and r.returncode == 141, r.stderr


def test_pair_show_has_the_fracture_time_and_the_last_job(daemon):
    d = daemon
    d.cli("volume", "create", "db1", "--size", "1M")
    d.cli("volume", "create", "db1-clone", "--size", "1M")
    d.cli("pair", "create", "db1", "db1-clone", "--wait")
    show = d.cli("pair", "show", "db1-clone").stdout
    assert re.search(r"^fractured\s+- \(the clone follows the source\)$", show, re.M), show
    assert re.search(r"^last job\s+sync started .+, finished .+ after \d+s$", show, re.M), show
    d.cli("pair", "fracture", "db1-clone")
    d.cli("pair", "restore", "db1-clone", "--wait")
    show = d.cli("pair", "show", "db1-clone").stdout
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+"
    assert re.search(rf"^fractured\s+{stamp}$", show, re.M), show
    assert re.search(rf"^last job\s+restore \(protected\) started {stamp}, finished {stamp} "
                     r"after \d+s$", show, re.M), show
    assert re.search(rf"^restored from\s+the clone as of {stamp} \(its current point in time\)$",
                     show, re.M), show
