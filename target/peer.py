"""Who is on the other end of the control socket, and what they may open.

A member of the control group (``serve --group``) is not root, but the
daemon usually is: without a check, such a peer could make the daemon open
(and then export over iSCSI) a file the peer itself cannot read, e.g. a
root-only 0600 file. Every path a peer hands the daemon is therefore opened
read-write once *as the peer* first -- in a child process running with the
peer's uid, gid and supplementary groups, so the kernel decides, ACLs and
all -- and the daemon then uses only the very inode the peer could open.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass

# The child opens the path read-write (never creating it) and reports the
# inode it got; for a path that does not exist yet, whether the peer could
# create it (write and search permission on its directory).
_PROBE = r"""
import os, sys
p = sys.argv[1]
try:
    fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
except FileNotFoundError:
    d = os.path.dirname(p) or "/"
    print("new" if os.access(d, os.W_OK | os.X_OK) else "denied:permission denied")
except OSError as e:
    print("denied:" + (e.strerror or str(e)))
else:
    st = os.fstat(fd)
    print("inode:%d:%d" % (st.st_dev, st.st_ino))
"""
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


def _run_probe(peer: Peer, path: str) -> str:
    kw: dict = {}
    if os.geteuid() == 0:
        kw = dict(user=peer.uid, group=peer.gid, extra_groups=sorted(peer.groups))
    try:
        r = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, path], capture_output=True,
                           text=True, timeout=PROBE_TIMEOUT_S, cwd="/", env={}, **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return f"denied:cannot check the requesting user's access: {e}"
    return r.stdout.strip() or "denied:cannot check the requesting user's access"


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
