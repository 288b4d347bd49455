"""`serve --metrics`: a real daemon, a real initiator, real scrapes. The
counters must equal the I/O the test performed, a scrape during a restore
must show its progress and copy-on-demand, and promtool must accept the
exposition."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from target.cli import _metrics_address
from target.scsi.api import GOOD, Nexus, ScsiCommand, ScsiResponse
from target.scsi.commands import decode
from target.scsi.lustats import LATENCY_BUCKETS, LuStats
from tests.support import IQN, Daemon, free_port
from tests.target.iscsi.initiator import Initiator, LoginError

MiB = 1 << 20


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """(name, sorted labels) -> value for every sample of the exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def logged_in(port: int) -> Initiator:
    """A session whose power-on unit attention is taken (by TEST UNIT READY,
    an "other" command), so reads and writes count exactly."""
    ini = Initiator("127.0.0.1", port)
    await ini.login(IQN)
    for _ in range(3):
        if (await ini.scsi(0, bytes(6))).status == GOOD:
            return ini
    raise AssertionError("TEST UNIT READY never GOOD")


def test_lu_stats_count_kinds_bytes_and_latency():
    st = LuStats()
    nexus = Nexus("i", "t")

    def record(cdb: bytes, data_out: bytes | None, resp: ScsiResponse, seconds: float,
               expected_in: int = 0) -> None:
        st.record(decode(cdb, 512), ScsiCommand(cdb, 0, nexus, data_out, expected_in), resp, seconds)

    read10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])            # 8 blocks: 4096 bytes
    write16 = bytes([0x8A]) + bytes(12) + bytes([2, 0, 0])      # 2 blocks: 1024 bytes
    record(read10, None, ScsiResponse(GOOD, data_in_placed=True), 30e-6, expected_in=4096)
    record(write16, b"x" * 1024, ScsiResponse(GOOD), 2.0)
    record(write16, b"x" * 1024, ScsiResponse(0x02), 1e-3)      # failed: counted, no bytes
    record(bytes([0x12]) + bytes(5), None, ScsiResponse(GOOD, b"", b"x" * 36), 1.0)
    assert st.commands == [1, 2, 1] and st.bytes[:2] == [4096, 1024]
    assert st.buckets[0][LATENCY_BUCKETS.index(50e-6)] == 1
    assert sum(st.buckets[1]) == 2 and st.seconds[1] == pytest.approx(2.001)


def test_metrics_address_is_loopback_unless_given():
    assert _metrics_address("9100") == ("127.0.0.1", 9100)
    assert _metrics_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    with pytest.raises(SystemExit):
        _metrics_address("nope")


@pytest.fixture
def mdaemon(tmp_path):
    port = free_port()
    d = Daemon(tmp_path, extra=("--metrics", str(port))).start()
    d.metrics_port = port
    yield d
    if d.proc.poll() is None:
        d.stop()


def _setup(d: Daemon, size: str = "8M") -> None:
    d.cli("volume", "create", "db1", "--size", size)
    d.cli("volume", "create", "db1-clone", "--size", size)
    d.cli("pair", "create", "db1", "db1-clone", "--wait")
    d.cli("export", "create", IQN, "--lun", "0=db1")


def test_counters_match_the_io_performed_and_promtool_accepts(mdaemon):
    d = mdaemon
    _setup(d)
    before = scrape(d.metrics_port)

    async def io() -> None:
        ini = await logged_in(d.port)
        for i in range(10):
            await ini.write(0, i * 128, bytes([i]) * 65536)       # 10 x 64 KiB
        for i in range(7):
            await ini.read(0, i * 64, 64)                          # 7 x 32 KiB
        await ini.logout()
        await ini.close()
        bad = Initiator("127.0.0.1", d.port)
        with pytest.raises(LoginError):
            await bad.login("iqn.2026-11.io.liverestore.test:nosuch")
        await bad.close()
    asyncio.run(io())
    text = scrape(d.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(text, name, **labels) - value(before, name, **labels)
    assert delta("liverestore_lu_commands_total", volume="db1", kind="write") == 10
    assert delta("liverestore_lu_commands_total", volume="db1", kind="read") == 7
    assert delta("liverestore_lu_bytes_total", volume="db1", kind="write") == 10 * 65536
    assert delta("liverestore_lu_bytes_total", volume="db1", kind="read") == 7 * 32768
    assert delta("liverestore_lu_command_duration_seconds_count", volume="db1", kind="write") == 10
    assert value(text, "liverestore_lu_command_duration_seconds_bucket", volume="db1",
                 kind="read", le="+Inf") == value(text, "liverestore_lu_commands_total",
                                                  volume="db1", kind="read")
    assert value(text, "liverestore_iscsi_logins_total", target=IQN, result="ok") == 1
    assert value(text, "liverestore_iscsi_logins_total", target="(unknown target)",
                 result="failed") == 1
    assert value(text, "liverestore_iscsi_sessions", target=IQN) == 0      # logged out
    assert value(text, "liverestore_pair_info", pair="db1-clone", source="db1",
                 clone="db1-clone", state="synchronized") == 1
    assert value(text, "liverestore_memory_limit_bytes") == 512 * MiB
    assert 0 < value(text, "process_resident_memory_bytes") < 512 * MiB
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) not installed: counters checked, "
                    "exposition not linted")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_scrape_during_a_restore_shows_progress_and_copy_on_demand(mdaemon):
    d = mdaemon
    _setup(d)
    d.cli("pair", "fracture", "db1-clone")

    async def damage_the_source() -> None:
        ini = await logged_in(d.port)
        for off in range(0, 8 * MiB, 256 * 1024):
            await ini.write(0, off // 512, b"\xee" * (256 * 1024))
        await ini.logout()
        await ini.close()
    asyncio.run(damage_the_source())
    d.cli("pair", "throttle", "db1-clone", "--rate", "1M")
    d.cli("pair", "restore", "db1-clone")
    time.sleep(1.0)
    text = scrape(d.metrics_port)

    async def write_ahead_of_the_copier() -> None:
        # 4 KiB into the last MiB, not restored yet: a write of part of an
        # extent needs that extent copied first (a read would be served from
        # the clone, without a copy)
        ini = await logged_in(d.port)
        await ini.write(0, (7 * MiB) // 512, b"\x11" * 4096)
        s = await asyncio.get_running_loop().run_in_executor(None, scrape, d.metrics_port)
        assert value(s, "liverestore_iscsi_sessions", target=IQN) == 1
        await ini.logout()
        await ini.close()
    asyncio.run(write_ahead_of_the_copier())
    after = scrape(d.metrics_port)
    d.cli("pair", "throttle", "db1-clone", "--rate", "0")
    assert value(text, "liverestore_pair_job", pair="db1-clone", job="restore",
                 status="running") == 1
    total = value(text, "liverestore_pair_job_extents", pair="db1-clone")
    done = value(text, "liverestore_pair_job_extents_done", pair="db1-clone")
    assert total == 128 and 0 < done < total
    assert value(text, "liverestore_pair_job_copied_bytes", pair="db1-clone") > 0
    assert value(text, "liverestore_pair_job_rate_bytes_per_second", pair="db1-clone") > 0
    assert value(text, "liverestore_pair_job_eta_seconds", pair="db1-clone") > 0
    assert value(after, "liverestore_pair_cod_extents_total", pair="db1-clone") >= 1
    assert value(after, "liverestore_pair_cod_wait_seconds_total", pair="db1-clone") > 0


def test_only_get_metrics_is_answered(mdaemon):
    port = mdaemon.metrics_port
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert e.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405



LANE_READS = 16


def lane_read_deltas(d: Daemon, port: int, volume: str) -> Callable[..., float]:
    """LANE_READS 4 KiB reads of ``volume`` (unpaired, exported as LUN 0 of
    a daemon started with the native lane on, scraped at ``port``) once the
    lane has published it; a sample's change across them, read after the
    session's close has folded the lane's counts."""
    before = scrape(port)

    async def io() -> None:
        ini = await logged_in(d.port)
        assert (await ini.write(0, 0, b"\x5a" * 65536)).status == GOOD
        await asyncio.sleep(0.3)                 # the lane publishes the LU
        got = await asyncio.gather(*(ini.read(0, i * 8, 8) for i in range(LANE_READS)))
        assert got == [b"\x5a" * 4096] * LANE_READS
        await ini.logout()
        await ini.close()
    asyncio.run(io())
    for _ in range(100):
        if "the lane answered" in open(d.log).read():
            break
        time.sleep(0.05)
    text = scrape(port)
    answered = [int(line.split("the lane answered ")[1].split()[0])
                for line in open(d.log) if "the lane answered" in line]
    assert answered and answered[0] > 0, "the lane answered none: the test is moot"
    return lambda name, **labels: value(text, name, **labels) - value(before, name, **labels)


def assert_counted_once(delta: Callable[..., float], volume: str) -> None:
    """lane_read_deltas' reads are each a read of ``volume``'s counters,
    bytes and latency histogram, once."""
    assert delta("liverestore_lu_commands_total", volume=volume, kind="read") == LANE_READS
    assert delta("liverestore_lu_bytes_total", volume=volume, kind="read") == LANE_READS * 4096
    assert delta("liverestore_lu_command_duration_seconds_count", volume=volume,
                 kind="read") == LANE_READS


def test_native_lane_reads_count_like_any_other(tmp_path, monkeypatch):
    """Reads the native iSCSI lane answers (target/iscsi/lane.py: an
    unpaired volume, plain READs) are in the LU's counters, bytes and
    latency histogram, as reads through Python are."""
    monkeypatch.setenv("LIVERESTORE_ISCSI_LANE", "1")
    port = free_port()
    d = Daemon(tmp_path, extra=("--metrics", str(port))).start()
    try:
        d.cli("volume", "create", "db1", "--size", "8M")
        d.cli("export", "create", IQN, "--lun", "0=db1")
        delta = lane_read_deltas(d, port, "db1")
    finally:
        d.stop()
    assert_counted_once(delta, "db1")
