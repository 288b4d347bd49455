"""Memory budgets of the embedded iSCSI target against hostile clients,
through a real `liverestore serve` process: 32 sessions that each announce
64 MiB writes whose data never comes, flood immediate commands past the
CmdSN window and issue reads whose answers they never read, all at once,
must leave the daemon's RSS under the default bound (512 MiB) while a
well-behaved initiator on another LUN keeps writing and verifying."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import subprocess
import time

from target.iscsi import pdu as P
from target.iscsi.budget import DEFAULT_MEMORY_LIMIT, STALL_SECONDS, MemoryBudget
from target.iscsi.cmdsn import sn_add
from target.iscsi.datapath import IMMEDIATE_LIMIT

from tests.support import LR, ROOT, Daemon, free_port
from .initiator import Initiator

IQN_BAD = "iqn.2026-11.io.liverestore.test:hostile"
IQN_GOOD = "iqn.2026-11.io.liverestore.test:good"
HOSTILE_SESSIONS = 32
BIG_WRITE = 64 << 20            # announced, never sent
BIG_READ = 32 << 20             # the SCSI layer's largest transfer
BIG_COMMANDS_PER_SECOND = 150   # paced so the old code's growth is caught before it hurts the machine
GOOD_IO = 64 << 10
GOOD_LUN_BYTES = 16 << 20


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cmd(i: Initiator, cdb: bytes, *, edtl: int, write: bool, immediate: bool) -> None:
    """Send one SCSI command without waiting for (or ever reading) its answer."""
    flags = P.FLAG_FINAL | 1 | (P.FLAG_WRITE if write else P.FLAG_READ)
    bhs = P.build_bhs(P.OP_SCSI_CMD, flags, immediate=immediate, lun=0, itt=i.new_itt(),
                      fields={20: edtl, 24: i.cmdsn, 28: i.exp_statsn}, raw={32: cdb.ljust(16, b"\0")})
    i.send(bhs)
    if not immediate:
        i.cmdsn = sn_add(i.cmdsn, 1)


def _rw16(op: int, lba: int, nbytes: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, lba, nbytes // 512, 0, 0)


class Pacer:
    """Shared rate limit for the commands that cost the old code real memory."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        self.next = max(self.next + self.interval, now)
        if self.next > now:
            await asyncio.sleep(self.next - now)


async def hostile(k: int, port: int, pacer: Pacer, stop: asyncio.Event) -> None:
    i = Initiator("127.0.0.1", port, name=f"iqn.2026-11.io.liverestore.test:hostile-{k}")
    # one loopback source address each: per-source connection limits are not what is tested
    i.reader, i.writer = await asyncio.open_connection("127.0.0.1", port,
                                                      local_addr=(f"127.0.1.{k + 1}", 0))
    await i.login(IQN_BAD, immediate_data=True, initial_r2t=True, start_reader=False)
    # from here on it never reads a byte
    for n in range(8):
        for _ in range(2):       # immediate 64 MiB writes: outside the CmdSN window
            await pacer.wait()
            _cmd(i, _rw16(0x8A, 0, BIG_WRITE), edtl=BIG_WRITE, write=True, immediate=True)
        await pacer.wait()      # a windowed one
        _cmd(i, _rw16(0x8A, 0, BIG_WRITE), edtl=BIG_WRITE, write=True, immediate=False)
        await pacer.wait()      # a read whose answer it never takes
        _cmd(i, _rw16(0x88, (n * BIG_READ) % (64 << 20), BIG_READ), edtl=BIG_READ, write=False,
             immediate=False)
        for _ in range(25):     # a flood of small immediate reads
            _cmd(i, _rw16(0x88, 0, 64 << 10), edtl=64 << 10, write=False, immediate=True)
        await asyncio.sleep(0)
    await stop.wait()
    i.writer.transport.abort()


async def well_behaved(port: int, stop: asyncio.Event, stats: dict) -> None:
    i = Initiator("127.0.0.1", port, name="iqn.2026-11.io.liverestore.test:good")
    await i.login(IQN_GOOD, immediate_data=True, initial_r2t=False)
    for _ in range(5):                       # the power-on unit attention
        if (await i.scsi(0, bytes(6))).status == 0:
            break
    rng = random.Random(7)
    try:
        while not stop.is_set():
            lba = rng.randrange(0, (GOOD_LUN_BYTES - GOOD_IO) // 512)
            data = rng.randbytes(GOOD_IO)
            t0 = time.monotonic()
            await i.write(0, lba, data)
            assert await i.read(0, lba, GOOD_IO // 512) == data, f"data differs at LBA {lba}"
            stats["ops"] += 1
            stats["worst"] = max(stats["worst"], time.monotonic() - t0)
    except Exception as e:    # noqa: BLE001 - reported by the test
        stats["error"] = f"{type(e).__name__}: {e}"
    finally:
        await i.close()


async def watch_rss(pid: int, stop: asyncio.Event, stats: dict, bound: int) -> None:
    while not stop.is_set():
        try:
            rss = vm_rss(pid)
        except (FileNotFoundError, ProcessLookupError):
            return
        stats["peak"] = max(stats["peak"], rss)
        if rss > bound:
            # the old code: stop it before it takes the machine's memory
            os.kill(pid, signal.SIGKILL)
            stop.set()
            return
        await asyncio.sleep(0.05)


async def scenario(port: int, pid: int, hostile_seconds: float) -> dict:
    stats = {"ops": 0, "worst": 0.0, "error": None, "peak": 0}
    stop = asyncio.Event()
    good_stop = asyncio.Event()
    watcher = asyncio.create_task(watch_rss(pid, stop, stats, DEFAULT_MEMORY_LIMIT))
    good = asyncio.create_task(well_behaved(port, good_stop, stats))
    await asyncio.sleep(0.5)
    pacer = Pacer(BIG_COMMANDS_PER_SECOND)
    bad = [asyncio.create_task(hostile(k, port, pacer, stop)) for k in range(HOSTILE_SESSIONS)]
    try:
        await asyncio.wait_for(stop.wait(), hostile_seconds)
    except asyncio.TimeoutError:
        pass
    good_stop.set()
    stop.set()
    await asyncio.wait([good, watcher, *bad], timeout=20)
    for t in bad:
        if t.done() and not t.cancelled() and t.exception() is not None:
            stats.setdefault("hostile_errors", []).append(repr(t.exception()))
    return stats


def test_hostile_sessions_leave_rss_bounded_and_good_initiator_unharmed(tmp_path, measured):
    d = Daemon(tmp_path).start()
    try:
        d.cli("volume", "create", "victim", "--size", "64M")
        d.cli("volume", "create", "good", "--size", str(GOOD_LUN_BYTES))
        d.cli("export", "create", IQN_BAD, "--lun", "0=victim")
        d.cli("export", "create", IQN_GOOD, "--lun", "0=good")
        before = vm_rss(d.proc.pid)
        stats = asyncio.run(scenario(d.port, d.proc.pid, hostile_seconds=10))
        alive = d.proc.poll() is None
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
    log = open(d.log).read()
    measured(f"iSCSI hostile sessions: daemon RSS {before >> 20} MiB before, peak "
             f"{stats['peak'] >> 20} MiB (bound {DEFAULT_MEMORY_LIMIT >> 20} MiB); well-behaved "
             f"initiator {stats['ops']} verified write+read pairs, slowest {stats['worst']:.2f}s")
    assert stats["peak"] <= DEFAULT_MEMORY_LIMIT, \
        f"daemon RSS reached {stats['peak'] >> 20} MiB (> {DEFAULT_MEMORY_LIMIT >> 20} MiB)"
    assert alive
    assert stats["error"] is None, stats["error"]
    assert stats["ops"] >= 20, stats
    assert "Traceback" not in log, log[-3000:]


def test_budget_refuses_what_does_not_fit_and_serves_small_holders_first():
    b = MemoryBudget(256 << 20)          # 64 MiB for command data, 64 MiB per session
    big, small = b.session("big"), b.session("small")
    assert big.try_take(b.session_limit)
    assert not big.try_take(1) and big.over_session_limit(1)         # TASK SET FULL
    granted = []
    assert not big.take_or_wait(4096, lambda: granted.append("big"))
    assert small.try_take(4096)        # within its fair share although the global budget is full
    assert not small.take_or_wait(b.limit - 4096, lambda: granted.append("small"))
    big.give(b.session_limit)
    assert granted == ["big"]          # the small request did not fit; the big one did
    big.close()
    assert granted == ["big", "small"] and b.used == small.used == b.limit
    small.close()
    assert b.used == 0 and not b.sessions


def test_serve_refuses_a_memory_limit_too_small(tmp_path):
    r = subprocess.run([*LR, "--socket", str(tmp_path / "s"), "serve", "--init", "--state-dir",
                        str(tmp_path / "st"), "--portal", f"127.0.0.1:{free_port()}",
                        "--memory-limit", "1M"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "memory limit" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "st")


def test_a_stalled_holder_is_cut_off_when_others_wait():
    now = [100.0]
    b = MemoryBudget(256 << 20, clock=lambda: now[0])
    cut = []
    hog = b.session("hog", evict=lambda: cut.append("hog"))
    busy = b.session("busy", evict=lambda: cut.append("busy"))
    assert hog.try_take(b.session_limit - 4096)
    granted = []
    assert not busy.take_or_wait(40 << 20, lambda: granted.append(1))
    assert cut == []                          # the hog has not been idle long
    now[0] += STALL_SECONDS + 1
    b.relieve()
    assert cut == ["hog"] and granted == [1] and b.used == busy.used == 40 << 20
    assert b.stats()["evicted"] == 1


def test_a_holder_that_makes_progress_is_not_cut_off():
    now = [100.0]
    b = MemoryBudget(256 << 20, clock=lambda: now[0])
    cut = []
    busy = b.session("busy", evict=lambda: cut.append("busy"))
    other = b.session("other", evict=lambda: cut.append("other"))
    assert busy.try_take(b.session_limit - 4096)
    assert not other.take_or_wait(40 << 20, lambda: None)
    for _ in range(5):
        now[0] += STALL_SECONDS / 2
        busy.progress()                       # data keeps arriving for its writes
        b.relieve()
    assert cut == []


# -- in-process server: immediate commands, backpressure, stuck output ----------------

FAKE_IQN = "iqn.2025-01.org.test:budget"


async def _serving(**kw):
    from target.iscsi import IscsiServer, IscsiTargetConfig

    from .fake_scsi import FakeScsiTarget, MemLun
    srv = IscsiServer([IscsiTargetConfig(FAKE_IQN, FakeScsiTarget({0: MemLun(8 << 20)}))],
                      [("127.0.0.1", 0)], **kw)
    await srv.start()
    return srv


def test_immediate_commands_beyond_the_limit_get_task_set_full():
    async def main():
        srv = await _serving()
        try:
            i = Initiator(*srv.addresses[0])
            await i.login(FAKE_IQN, immediate_data=False, initial_r2t=True)
            for _ in range(3):
                if (await i.scsi(0, bytes(6))).status == 0:
                    break
            n = IMMEDIATE_LIMIT + 24
            data = bytes(range(256)) * 256          # 64 KiB each, sent only when solicited
            # all at once, outside the CmdSN window: the target keeps at most
            # IMMEDIATE_LIMIT in flight and answers the others TASK SET FULL
            results = await asyncio.wait_for(asyncio.gather(*(
                i.scsi(0, _rw16(0x8A, k * 128, len(data)), data_out=data, immediate=True)
                for k in range(n))), 30)
            statuses = [r.status for r in results]
            assert statuses.count(0x00) >= IMMEDIATE_LIMIT
            assert statuses.count(0x28) >= n - 2 * IMMEDIATE_LIMIT    # TASK SET FULL
            assert set(statuses) <= {0x00, 0x28}
            assert (await i.scsi(0, bytes(6))).status == 0          # the session carries on
            await i.close()
        finally:
            await srv.stop(timeout=2)
    asyncio.run(main())


async def _flood_pings_unread(srv) -> tuple[int, int, Initiator]:
    """Log in, then send 16 MiB of NOP-Out pings whose echoes are never read."""
    i = Initiator(*srv.addresses[0])
    await i.login(FAKE_IQN, start_reader=False)
    conn = next(iter(srv.connections))
    ping = bytes(4096)
    sent = 0
    for _ in range(4000):
        bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, lun=0,
                          itt=i.new_itt(), fields={20: P.ALL_ONES, 24: i.cmdsn})
        i.send(bhs, ping)
        sent += 1
        if sent % 200 == 0:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    return conn.pdus_in, sent, i


def test_a_peer_that_does_not_read_is_not_read():
    async def main():
        srv = await _serving()
        try:
            handled, sent, i = await _flood_pings_unread(srv)
            # reading stopped once its unsent answers passed the high-water mark
            assert handled < sent // 2, (handled, sent)
            i.writer.transport.abort()
        finally:
            await srv.stop(timeout=2)
    asyncio.run(main())


def test_a_peer_whose_output_is_stuck_is_dropped():
    async def main():
        srv = await _serving(output_timeout=1.0)
        try:
            _, _, i = await _flood_pings_unread(srv)
            for _ in range(100):
                if not srv.connections:
                    break
                await asyncio.sleep(0.1)
            assert not srv.connections, "a peer that reads nothing was not dropped"
            i.writer.transport.abort()
        finally:
            await srv.stop(timeout=2)
    asyncio.run(main())
