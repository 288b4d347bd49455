"""Events and audit (target.events, target.eventhook, the control socket's
`events` op): bounded memory whatever a follower does, secrets never shown,
and the real daemon's stream and hook carrying a restore's start and finish."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time

import pytest

from target.control import Client, ControlServer
from target.eventhook import EventHook
from target.events import QUEUE_SIZE, RING_SIZE, EventBus, audit_args
from target.peer import Peer
from tests.support import IQN, LR, ROOT, Daemon, secret_file
from tests.target.iscsi.initiator import Initiator, LoginError


def test_ring_and_followers_are_bounded():
    bus = EventBus()
    idle = bus.follow()                 # never reads
    for i in range(RING_SIZE * 3):
        bus.publish("test", i=i)
    assert len(bus.ring) == RING_SIZE and bus.ring[-1]["i"] == RING_SIZE * 3 - 1
    assert idle.overflowed and idle not in bus.followers
    assert idle.queue.qsize() == QUEUE_SIZE      # what it held when cut off; no more


def test_audit_args_hide_secrets_and_documents():
    shown = audit_args({"iqn": IQN, "chap_secret": "supersecret123", "mutual_secret": None,
                        "config": {"targets": {"x": {"chap": ["u", "supersecret123"]}}},
                        "luns": {"0": "v"}, "name": "x" * 5000})
    text = json.dumps(shown)
    assert "supersecret123" not in text
    assert shown["chap_secret"] == "(not shown)" and shown["mutual_secret"] is None
    assert shown["iqn"] == IQN and len(text) < 2000


class _Service:
    async def call(self, op, args, peer=None):
        return {"op": op}


def test_a_follower_that_never_reads_is_cut_off(tmp_path):
    """Through the real control server: a client that asks to follow and then
    never reads costs a bounded queue and one socket buffer, not memory that
    grows with every event."""
    async def run() -> None:
        bus = EventBus()
        path = str(tmp_path / "c.sock")
        srv = ControlServer(_Service(), path, events=bus)
        await srv.start()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(path)
        s.sendall(b'{"op": "events", "args": {"follow": true}}\n')
        for _ in range(100):
            if bus.followers:
                break
            await asyncio.sleep(0.01)
        assert len(bus.followers) == 1
        for i in range(20 * QUEUE_SIZE):
            bus.publish("test", i=i, pad="x" * 500)
            if i % 64 == 0:
                await asyncio.sleep(0)          # let the stream write what it can
        await asyncio.sleep(0.1)
        assert not bus.followers                # cut off
        buffered = sum(w.transport.get_write_buffer_size() for w in srv._streams)
        assert buffered < 1 << 20
        s.close()
        await srv.stop()
    asyncio.run(run())


def test_events_follow_streams_and_stops_on_hangup(tmp_path):
    async def run() -> None:
        bus = EventBus()
        bus.publish("old", n=1)
        path = str(tmp_path / "c.sock")
        srv = ControlServer(_Service(), path, events=bus)
        await srv.start()
        loop = asyncio.get_running_loop()

        def client() -> list:
            out = []
            with Client(path) as c:
                for ev in c.events(follow=True):
                    out.append(ev["kind"])
                    if ev["kind"] == "new":
                        break
            return out
        got = loop.run_in_executor(None, client)
        for _ in range(100):
            if bus.followers:
                break
            await asyncio.sleep(0.01)
        bus.publish("new")
        assert await got == ["old", "new"]
        for _ in range(100):                    # the hang-up ends the stream at once
            if not bus.followers:
                break
            await asyncio.sleep(0.01)
        assert not bus.followers
        await srv.stop()
    asyncio.run(run())


def test_control_operations_are_audited_with_the_caller(tmp_path):
    async def run() -> None:
        bus = EventBus()
        srv = ControlServer(_Service(), str(tmp_path / "c.sock"), events=bus)
        peer = Peer(4242, 1000, 1000, frozenset())
        await srv._handle(b'{"op": "pair.restore", "args": {"pair": "p"}}\n', peer, None, None)
        await srv._handle(b'{"op": "status"}\n', peer, None, None)     # a read: no event
        (ev,) = bus.recent()
        assert ev["kind"] == "control" and ev["op"] == "pair.restore" and ev["ok"] is True
        assert (ev["uid"], ev["pid"], ev["args"]) == (1000, 4242, {"pair": "p"})
    asyncio.run(run())


def test_login_failures_are_rate_limited_events():
    bus = EventBus()
    for _ in range(500):
        bus.login_failed("iqn.x:t", "iqn.y:i", "127.0.0.1:1", "authentication failed")
    (ev,) = bus.recent()
    assert ev["kind"] == "iscsi.login-failed" and ev["target"] == "iqn.x:t"


def test_hook_gets_the_event_and_a_slow_or_failing_one_is_contained(tmp_path, caplog):
    out = tmp_path / "got"

    async def run() -> None:
        ok = EventHook(f"cat >> {out}; echo >> {out}")
        ok.start()
        ok({"kind": "pair.restore-finished", "pair": "p"})
        slow = EventHook("sleep 30", timeout=0.3)
        slow.start()
        t0 = time.monotonic()
        slow({"kind": "x"})
        bad = EventHook("exit 3", max_queued=2)
        bad.start()
        for _ in range(10):
            bad({"kind": "y"})          # beyond the queue: dropped, not buffered
        for _ in range(200):
            if ok.ran and slow.ran and bad.ran >= 2:
                break
            await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 5 and slow.failed == 1     # killed at its timeout
        assert bad.failed >= 2 and bad.dropped >= 1
        for h in (ok, slow, bad):
            await h.stop()
    with caplog.at_level(logging.WARNING, "liverestore.events"):
        asyncio.run(run())
    assert json.loads(out.read_text())["kind"] == "pair.restore-finished"
    fails = [r for r in caplog.records if "failed on y" in r.getMessage()]
    assert len(fails) == 1                      # rate-limited: one line for the burst


def test_daemon_events_follow_and_hook_see_a_restore(tmp_path):
    """The acceptance check: `events --follow` receives a restore's start and
    finish, the --on-event hook runs with them, control operations carry
    the caller's uid and pid, and a failed login is an event."""
    hooked = tmp_path / "hook.jsonl"
    d = Daemon(tmp_path, extra=("--on-event", f"cat >> {hooked}")).start()
    follow = subprocess.Popen([*LR, "--socket", d.sock, "events", "--follow", "--json"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        d.cli("volume", "create", "db1", "--size", "4M")
        d.cli("volume", "create", "db1-clone", "--size", "4M")
        d.cli("pair", "create", "db1", "db1-clone", "--wait")
        d.cli("pair", "fracture", "db1-clone")
        d.cli("export", "create", IQN, "--lun", "0=db1", "--chap-user", "u",
              "--chap-secret-file", secret_file(d, "supersecret123"))
        d.cli("pair", "restore", "db1-clone", "--wait")

        async def bad_login() -> None:
            ini = Initiator("127.0.0.1", d.port)
            with pytest.raises(LoginError):
                await ini.login(IQN)            # no CHAP: refused
            await ini.close()
        asyncio.run(bad_login())
        seen: list[dict] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                e["kind"] == "iscsi.login-failed" for e in seen):
            seen.append(json.loads(follow.stdout.readline()))
        for _ in range(100):                # the hook runs beside I/O: give it a moment
            if hooked.exists() and "restore-finished" in hooked.read_text():
                break
            time.sleep(0.05)
    finally:
        follow.terminate()
        follow.wait(10)
        d.stop()
    kinds = [e["kind"] for e in seen]
    assert "pair.restore-started" in kinds and "pair.restore-finished" in kinds
    assert kinds.index("pair.restore-started") < kinds.index("pair.restore-finished")
    fin = next(e for e in seen if e["kind"] == "pair.restore-finished")
    assert fin["pair"] == "db1-clone" and fin["state"] == "fractured"
    restore = next(e for e in seen if e["kind"] == "control" and e["op"] == "pair.restore")
    assert restore["uid"] == os.getuid() and restore["ok"] is True and restore["pid"] > 0
    assert "supersecret123" not in json.dumps(seen)
    hook_kinds = [json.loads(line)["kind"] for line in hooked.read_text().splitlines()]
    assert "pair.restore-finished" in hook_kinds
    assert "supersecret123" not in open(d.log).read()


def test_events_cli_without_daemon_is_one_line(tmp_path):
    r = subprocess.run([*LR, "--socket", str(tmp_path / "none"), "events"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("liverestore: no liverestore daemon")
