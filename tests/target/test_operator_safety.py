"""Operator mistakes and unprivileged clients must not lose data (issue 10,
items 1, 2, 3, 5 and the volume-create part of 7), against real daemons."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile

import pytest

from target.control import Client, ControlError
from tests.support import LR, ROOT, Daemon

MiB = 1 << 20


def pattern(n: int, byte: int = 0x5A) -> bytes:
    return bytes([byte]) * n


def port_bound(port: int) -> bool:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# -- 1. one daemon per state directory, one user per image ----------------------------------
def test_second_daemon_on_the_same_state_dir_is_refused_before_any_side_effect(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a").start()
    try:
        second = Daemon(tmp_path / "b", state_dir=first.dir)
        with pytest.raises(AssertionError) as info:
            second.start()
        out = str(info.value)
        assert f"is in use by another liverestore daemon (pid {first.proc.pid})" in out
        assert "Traceback" not in out
        assert second.proc.returncode == 1
        assert not os.path.exists(second.sock)          # no socket made
        assert not port_bound(second.port)              # no port bound
        first.cli("status")                             # the first one is unharmed
    finally:
        first.stop()
    # The lock dies with its holder: the state directory can be served again.
    again = Daemon(tmp_path / "b", state_dir=first.dir, init=False).start()
    again.stop()


def test_no_two_daemons_or_volumes_share_an_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img = str(tmp_path / "shared.img")
    a = Daemon(tmp_path / "a").start()
    b = Daemon(tmp_path / "b").start()
    try:
        a.cli("volume", "create", "v", "--path", img, "--size", "1M")
        r = b.cli("volume", "create", "v", "--path", img, ok=False)
        assert r.returncode == 1 and "is in use" in r.stderr, r.stderr
        assert b.cli("volume", "list", "--json").stdout.strip() == "[]"
    finally:
        a.stop()
        b.stop()


# -- 2. adopting an existing image never changes it -------------------------------------
def test_adopting_an_existing_file_never_changes_its_size_or_contents(daemon, tmp_path):
    img = tmp_path / "existing.img"
    data = os.urandom(4 * MiB)
    img.write_bytes(data)
    for size in ("1M", "8M"):
        r = daemon.cli("volume", "create", "v", "--path", str(img), "--size", size, ok=False)
        assert r.returncode == 1 and "adopted as it is" in r.stderr, r.stderr
        assert img.read_bytes() == data
    v = json.loads(daemon.cli("volume", "create", "v", "--path", str(img), "--json").stdout)
    assert v["size"] == 4 * MiB and img.read_bytes() == data
    # growing is explicit, and never shrinks
    r = daemon.cli("volume", "resize", "v", "2M", ok=False)
    assert "only grows" in r.stderr and img.stat().st_size == 4 * MiB
    v = json.loads(daemon.cli("volume", "resize", "v", "6M", "--json").stdout)
    assert v["size"] == 6 * MiB and img.stat().st_size == 6 * MiB
    assert img.read_bytes()[:4 * MiB] == data


def test_links_to_a_volume_image_or_the_database_are_refused(daemon, tmp_path):
    daemon.cli("volume", "create", "live", "--size", "2M")
    live = json.loads(daemon.cli("volume", "show", "live", "--json").stdout)["path"]
    os.symlink(live, tmp_path / "sym.img")
    os.link(live, tmp_path / "hard.img")
    db = os.path.join(daemon.dir, "liverestore.db")
    os.link(db, tmp_path / "db-link")
    for path, why in ((tmp_path / "sym.img", "is the image of volume live"),
                      (tmp_path / "hard.img", "is the image of volume live"),
                      (db, "state directory"), (daemon.dir, "state directory"),
                      (tmp_path / "db-link", "state directory")):
        r = daemon.cli("volume", "create", "x", "--path", str(path), "--size", "1M", ok=False)
        assert r.returncode == 1 and why in r.stderr, (path, r.stderr)
    assert os.stat(live).st_size == 2 * MiB


def test_relative_paths_are_the_clients(daemon, tmp_path):
    r = subprocess.run([*LR, "--socket", daemon.sock, "volume", "create", "rel",
                        "--path", "rel.img", "--size", "1M"],
                       cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rel.img").stat().st_size == MiB
    assert not os.path.exists(os.path.join(ROOT, "rel.img"))
    with pytest.raises(ControlError, match="relative"):
        Client(daemon.sock).call("volume.create", name="rel2", path="rel2.img", size="1M")


def test_recreating_a_volume_over_its_left_over_image_says_so(daemon):
    daemon.cli("volume", "create", "v", "--size", "1M")
    path = json.loads(daemon.cli("volume", "delete", "v", "--json").stdout)["path"]
    r = daemon.cli("volume", "create", "v", "--size", "2M", ok=False)
    assert "is still there" in r.stderr and f"--path {path}" in r.stderr
    assert os.stat(path).st_size == MiB
    daemon.cli("volume", "create", "v", "--path", path)        # explicit adoption works


# -- 7 (part). a failed create leaves nothing behind -------------------------------------
def test_failed_create_leaks_no_descriptor_and_leaves_no_file(daemon, tmp_path):
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        try:
            f.truncate(64 << 40)
            pytest.skip("this file system takes 64 TiB files")
        except OSError:
            pass
    fds = lambda: len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))    # noqa: E731

    def fail() -> None:
        r = daemon.cli("volume", "create", "big", "--path", str(tmp_path / "big.img"),
                       "--size", "64T", ok=False)
        assert r.returncode == 1 and "File too large" in r.stderr, r.stderr
        assert not (tmp_path / "big.img").exists()
    fail()
    before = fds()
    for _ in range(3):
        fail()
    assert fds() <= before


# -- 3. a group member cannot make the daemon open what it could not ------------------------
def as_nobody(sock: str, calls: list[tuple[str, dict]]) -> list[str]:
    """Run control calls as uid/gid 65534; "ok" or the error of each."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = []
            for op, args in calls:
                try:
                    Client(sock).call(op, **args)
                    out.append("ok")
                except ControlError as e:
                    out.append(str(e))
            os.write(wfd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_group_member_cannot_export_what_it_cannot_open(tmp_path):
    top = tempfile.mkdtemp(prefix="lr-peer-", dir="/tmp")    # reachable by nobody
    try:
        os.chmod(top, 0o755)
        vols = os.path.join(top, "vols")
        os.mkdir(vols)
        os.chmod(vols, 0o777)
        secret = os.path.join(vols, "secret.img")
        with open(secret, "wb") as f:
            f.write(pattern(MiB))
        os.chmod(secret, 0o600)                              # root's own
        mine = os.path.join(vols, "mine.img")
        with open(mine, "wb") as f:
            f.write(pattern(MiB))
        os.chown(mine, 65534, 65534)
        os.chmod(mine, 0o600)
        outside = os.path.join(top, "outside.img")
        with open(outside, "wb") as f:
            f.write(pattern(MiB))
        os.chmod(outside, 0o666)
        d = Daemon(tmp_path, sock=os.path.join(top, "control.sock"),
                   extra=("--group", "nogroup", "--volume-dir", vols)).start()
        try:
            got = as_nobody(d.sock, [
                ("volume.create", {"name": "s", "path": secret}),
                ("volume.create", {"name": "o", "path": outside}),
                ("volume.create", {"name": "p", "path": mine, "peer": {"uid": 0}}),
                ("volume.create", {"name": "m", "path": mine}),
                ("volume.create", {"name": "n", "path": os.path.join(vols, "new.img"),
                                   "size": "1M"}),
            ])
            assert "cannot open it read-write" in got[0], got
            assert "outside the volume directories" in got[1], got
            assert "unknown argument 'peer'" in got[2], got     # a client cannot pose as another peer
            assert got[3:] == ["ok", "ok"], got
            names = sorted(v["name"] for v in Client(d.sock).call("volume.list"))
            assert names == ["m", "n"]
            # root itself is not restricted
            d.cli("volume", "create", "s", "--path", secret)
        finally:
            d.stop()
    finally:
        subprocess.run(["rm", "-rf", top])


# -- 5. one bad volume does not stop everything ---------------------------------------------
def test_missing_and_wrong_size_images_start_offline_and_can_be_relinked(tmp_path):
    d = Daemon(tmp_path).start()
    for v in ("good", "gone", "short"):
        d.cli("volume", "create", v, "--size", "2M")
    paths = {v["name"]: v["path"] for v in json.loads(d.cli("volume", "list", "--json").stdout)}
    d.stop()
    moved = str(tmp_path / "moved.img")
    os.rename(paths["gone"], moved)
    os.truncate(paths["short"], MiB)
    d.init = False
    d.start()                                     # the daemon starts all the same
    try:
        vols = {v["name"]: v for v in json.loads(d.cli("volume", "list", "--json").stdout)}
        assert vols["good"]["access"] == "read-write" and vols["good"]["offline"] is None
        assert vols["gone"]["access"] == "not-ready"
        assert "No such file" in vols["gone"]["offline"]
        assert "expected 2097152" in vols["short"]["offline"]
        assert "OFFLINE" in d.cli("status").stdout
        log = open(d.log).read()
        assert log.count("volume gone is offline") == 1 and "Traceback" not in log
        # relink: same size only, then online; delete works on an offline volume
        r = d.cli("volume", "relink", "gone", "--path", paths["short"], ok=False)
        assert "is the image of volume short" in r.stderr
        v = json.loads(d.cli("volume", "relink", "gone", "--path", moved, "--json").stdout)
        assert v["access"] == "read-write" and v["path"] == moved and v["offline"] is None
        d.cli("volume", "delete", "short")
    finally:
        d.stop()
    assert d.proc.returncode == 0


def test_restore_waits_for_an_offline_clone_and_resumes_after_relink(tmp_path):
    d = Daemon(tmp_path).start()
    d.cli("volume", "create", "src", "--size", "8M")
    d.cli("volume", "create", "cln", "--size", "8M")
    cln = json.loads(d.cli("volume", "show", "cln", "--json").stdout)["path"]
    with open(cln, "r+b") as f:
        f.write(pattern(8 * MiB, 0xC1))                 # the clone's data to restore
    d.cli("pair", "create", "src", "cln", "--no-sync")  # fractured, every extent differs
    d.cli("pair", "throttle", "cln", "--rate", "64K")   # slow: still running at the kill
    d.cli("pair", "restore", "cln")
    d.stop(signal.SIGKILL)
    moved = str(tmp_path / "clone-moved.img")
    os.rename(cln, moved)
    d.init = False
    d.start()
    try:
        p = json.loads(d.cli("pair", "show", "cln", "--json").stdout)
        assert p["state"] == "restoring"
        src = json.loads(d.cli("volume", "show", "src", "--json").stdout)
        assert src["access"] == "not-ready" and "offline" in src["access_reason"]
        r = d.cli("pair", "resume", "cln", ok=False)
        assert "volume cln is offline" in r.stderr
        r = d.cli("pair", "wait", "cln", ok=False)          # says why, does not hang
        assert "resumes after 'liverestore volume relink'" in r.stderr, r.stderr
        d.cli("pair", "throttle", "cln", "--rate", "0")
        d.cli("volume", "relink", "cln", "--path", moved)
        p = json.loads(d.cli("pair", "wait", "cln", "--json").stdout)
        assert p["state"] == "fractured" and p["progress"]["error"] is None
        src_path = json.loads(d.cli("volume", "show", "src", "--json").stdout)["path"]
        with open(src_path, "rb") as f:
            assert f.read() == pattern(8 * MiB, 0xC1)
    finally:
        d.stop()
