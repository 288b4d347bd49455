"""Issue 13's undo acceptance test through a real initiator (qemu-io and
qemu-img over iscsi:// to the daemon's embedded target): restore from a
clone with --keep-undo, hosts write during the restore, abort; the source
is then its pre-restore data except the extents hosts wrote, byte for byte."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support import IQN, Daemon, qemu_io

M = 1 << 20
ES = 64 << 10
SIZE = 16 * M


def fill(img: bytearray, off: int, n: int, byte: int) -> None:
    img[off:off + n] = bytes([byte]) * n


@pytest.mark.skipif(not (shutil.which("qemu-io") and shutil.which("qemu-img")),
                    reason="qemu-io, qemu-img (qemu-utils, qemu-block-extra) not installed")
def test_abort_puts_back_pre_restore_data_except_host_writes(daemon, tmp_path):
    d = daemon
    d.cli("volume", "create", "db1", "--size", "16M")
    d.cli("volume", "create", "db1-clone", "--size", "16M")
    d.cli("pair", "create", "db1", "db1-clone", "--wait", "--extent-size", "64K")
    d.cli("export", "create", IQN, "--lun", "0=db1", "--lun", "1=db1-clone")
    clone = bytearray(SIZE)
    fill(clone, 0, SIZE, 0x11)
    qemu_io(d, f"write -P 0x11 0 {SIZE}")
    d.cli("pair", "sync", "db1-clone", "--wait")
    d.cli("pair", "fracture", "db1-clone")

    # the source moves on after the fracture: this is what a restore destroys
    pre = bytearray(clone)
    fill(pre, 0, 8 * M, 0x22)
    fill(pre, 12 * M, 2 * M, 0x23)
    qemu_io(d, f"write -P 0x22 0 {8 * M}", f"write -P 0x23 {12 * M} {2 * M}")

    d.cli("pair", "throttle", "db1-clone", "--rate", "1M")     # still running when we abort
    p = json.loads(d.cli("pair", "restore", "db1-clone", "--keep-undo", "--json").stdout)
    assert p["state"] == "restoring" and p["progress"]["undo"]
    # hosts during the restore: reads see the clone; one whole extent and a
    # few bytes of another are written
    want = bytearray(pre)
    fill(want, 1 * M, ES, 0x44)
    part = 13 * M                         # its extent: restored first (clone data), then written
    fill(want, part, ES, 0x11)
    fill(want, part + 4096, 8192, 0x45)
    qemu_io(d, f"read -P 0x11 0 {M}", f"write -P 0x44 {M} {ES}", f"write -P 0x45 {part + 4096} 8192",
        f"read -P 0x44 {M} {ES}")
    assert json.loads(d.cli("pair", "show", "db1-clone", "--json").stdout)["state"] == "restoring"

    p = json.loads(d.cli("pair", "abort", "db1-clone", "--json").stdout)
    assert p["state"] == "aborting"
    # during the abort: reads of extents still to put back come from the undo image
    qemu_io(d, f"read -P 0x22 {4 * M} {M}", f"read -P 0x23 {12 * M} {M}")
    d.cli("pair", "throttle", "db1-clone", "--rate", "0")
    d.cli("pair", "wait", "db1-clone")
    p = json.loads(d.cli("pair", "show", "db1-clone", "--json").stdout)
    assert p["state"] == "fractured" and p["undo_image"] is None

    qemu_io(d, f"read -P 0x22 0 {M}", f"read -P 0x44 {M} {ES}", f"read -P 0x11 {8 * M} {4 * M}",
        f"read -P 0x45 {part + 4096} 8192", f"read -P 0x23 {part + ES} {M - ES}")
    out = tmp_path / "source.raw"
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"{d.url}/0", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = out.read_bytes()
    assert len(got) == SIZE
    bad = [e for e in range(SIZE // ES) if got[e * ES:(e + 1) * ES] != want[e * ES:(e + 1) * ES]]
    assert not bad, f"extents {bad[:8]} are neither pre-restore data nor the hosts' writes"
    qemu_io(d, f"read -P 0x11 0 {SIZE}", lun=1)           # the clone never changed
