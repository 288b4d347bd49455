"""Who is on the other end of the control socket, and what they may open.

A member of the control group (``serve --group``) is not root, but the
daemon usually is: without a check, such a peer could make the daemon open
(and then export over iSCSI) a file the peer itself cannot read, e.g. a
root-only 0600 file. Every path a peer hands the daemon is therefore opened
read-write once *as the peer* first -- in a forked child that takes the
peer's uid, gid and supplementary groups, so the kernel decides, ACLs and
all -- and the daemon then uses only the very inode the peer could open.
(A fork, not an exec: the daemon's interpreter need not be executable by
the peer, and the child only makes a few system calls before _exit.)
"""
from __future__ import annotations

import os
import select
import signal
import socket
import stat
import struct
from dataclasses import dataclass

PROBE_TIMEOUT_S = 10


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @classmethod
    def of_socket(cls, sock: socket.socket) -> "Peer":
        """The credentials of the process at the other end of a Unix socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid, frozenset(_groups_of(pid)))

    @classmethod
    def local(cls) -> "Peer":
        """This process: for callers inside the daemon (the demo set-up)."""
        return cls(os.getpid(), os.getuid(), os.getgid(), frozenset(os.getgroups()))


class PeerDenied(Exception):
    """The peer could not open the path itself; the message says why."""


@dataclass(frozen=True)
class Probe:
    """What the peer could do with a path: open an existing inode
    (``inode`` set) or create it new (``inode`` None)."""
    inode: tuple[int, int] | None


def probe_as(peer: Peer, path: str) -> Probe:
    """Open ``path`` read-write with the peer's credentials; PeerDenied if it cannot."""
    if os.geteuid() == 0 or peer.uid == os.geteuid():
        out = _run_probe(peer, path)
    else:
        # A non-root daemon cannot take another user's credentials: judge by
        # the mode bits (ACLs are not consulted; the daemon's own permissions
        # bound what it can open anyway).
        out = _mode_probe(peer, path)
    kind, _, rest = out.partition(":")
    if kind == "new":
        return Probe(None)
    if kind == "inode":
        dev, ino = rest.split(":")
        return Probe((int(dev), int(ino)))
    raise PeerDenied(f"{path}: the requesting user (uid {peer.uid}) cannot open it read-write: "
                     f"{rest or out}")


def _probe_here(path: str) -> str:
    """Open ``path`` read-write with this process's credentials (never
    creating it): "inode:DEV:INO", "new" if it does not exist but could be
    created (write and search permission on its directory), or "denied:WHY"."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        d = os.path.dirname(path) or "/"
        return "new" if os.access(d, os.W_OK | os.X_OK) else "denied:permission denied"
    except OSError as e:
        return "denied:" + (e.strerror or str(e))
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return f"inode:{st.st_dev}:{st.st_ino}"


def _run_probe(peer: Peer, path: str) -> str:
    if os.geteuid() != 0:
        return _probe_here(path)          # the peer is this very user
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                          # child: become the peer, probe, report
        code = 1
        try:
            os.close(rfd)
            os.setgroups(sorted(peer.groups))
            os.setgid(peer.gid)
            os.setuid(peer.uid)
            os.write(wfd, _probe_here(path).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([rfd], [], [], PROBE_TIMEOUT_S)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                out = b"denied:the access check timed out"
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    return out.decode(errors="replace") or "denied:cannot check the requesting user's access"


def _mode_probe(peer: Peer, path: str) -> str:
    def allows(st: os.stat_result, want: int) -> bool:
        if st.st_uid == peer.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == peer.gid or st.st_gid in peer.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want
    parent = os.path.dirname(path) or "/"
    d = parent
    while True:
        try:
            if not allows(os.stat(d), 1):
                return "denied:permission denied"
        except OSError as e:
            return "denied:" + (e.strerror or str(e))
        if d == "/":
            break
        d = os.path.dirname(d)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "new" if allows(os.stat(parent), 3) else "denied:permission denied"
    except OSError as e:
        return "denied:" + (e.strerror or str(e))
    if not allows(st, 6) or not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return "denied:permission denied"
    return f"inode:{st.st_dev}:{st.st_ino}"


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()
