"""target.peer: a control-socket peer may only hand the daemon paths it
could open read-write itself (issue 10 item 3)."""
from __future__ import annotations

import os
import tempfile

import pytest

from target import peer as peer_mod
from target.peer import Peer, PeerDenied, probe_as

NOBODY = Peer(pid=0, uid=65534, gid=65534, groups=frozenset())


@pytest.fixture
def files():
    top = tempfile.mkdtemp(prefix="lr-peer-", dir="/tmp")
    os.chmod(top, 0o755)
    paths = {}
    for name, mode, owner in (("root-only", 0o600, 0), ("everyone", 0o666, 0),
                              ("nobodys", 0o600, 65534), ("group-rw", 0o660, 0)):
        p = os.path.join(top, name)
        with open(p, "wb") as f:
            f.write(b"x" * 512)
        os.chown(p, owner, 4242 if name == "group-rw" else owner)
        os.chmod(p, mode)
        paths[name] = p
    shut = os.path.join(top, "closed")
    os.mkdir(shut, 0o700)
    paths["new-in-closed"] = os.path.join(shut, "new.img")
    paths["new-in-top"] = os.path.join(top, "new.img")
    yield paths
    os.system(f"rm -rf {top}")


def expectations(files):
    member = Peer(0, 65534, 65534, frozenset({4242}))
    return [(NOBODY, files["root-only"], None), (NOBODY, files["everyone"], "inode"),
            (NOBODY, files["nobodys"], "inode"), (NOBODY, files["group-rw"], None),
            (member, files["group-rw"], "inode"), (NOBODY, files["new-in-closed"], None),
            (NOBODY, files["new-in-top"], None)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_kernel_decides_as_the_peer(files):
    for who, path, want in expectations(files):
        if want is None:
            with pytest.raises(PeerDenied, match="cannot open it read-write"):
                probe_as(who, path)
        else:
            st = os.stat(path)
            assert probe_as(who, path).inode == (st.st_dev, st.st_ino), path
    os.chmod(os.path.dirname(files["new-in-top"]), 0o777)
    assert probe_as(NOBODY, files["new-in-top"]).inode is None      # may create it


def test_mode_bits_fallback_agrees(files):
    for who, path, want in expectations(files):
        out = peer_mod._mode_probe(who, path)
        assert out.startswith("denied:" if want is None else "inode:"), (path, out)
