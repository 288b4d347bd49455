"""Reads of an RBD-backed LU that the native iSCSI lane answers (librbd
completions, target/iscsi/lane.py) count in the LU's metrics as any read:
commands, bytes and a latency from submission to completion."""
from __future__ import annotations

from tests.support import IQN, Daemon, free_port
from tests.target.test_metrics import LANE_READS, assert_counted_once, lane_read_deltas


def test_rbd_lane_reads_in_the_metrics(ceph, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVERESTORE_ISCSI_LANE", "1")
    port = free_port()
    d = Daemon(tmp_path, extra=("--metrics", str(port))).start()
    try:
        img = ceph.spec().image_name
        d.cli("volume", "create", "r", "--rbd", img, "--ceph-conf", ceph.conf, "--size", "8M")
        d.cli("export", "create", IQN, "--lun", "0=r")
        delta = lane_read_deltas(d, port, "r")
    finally:
        d.stop()
    assert_counted_once(delta, "r")
    # submission to completion through an OSD: more than the first bucket's 25 us
    assert delta("liverestore_lu_command_duration_seconds_sum", volume="r",
                 kind="read") > LANE_READS * 25e-6
