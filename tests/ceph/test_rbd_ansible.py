"""The Ansible volume module's rbd option against a daemon and a real cluster."""
from __future__ import annotations

from tests.ansible.test_collection import adhoc, env  # noqa: F401 - env is a fixture


def test_volume_module_rbd_create_idempotent_and_checked(env, daemon, ceph):  # noqa: F811
    sock = {"socket": daemon.sock}
    img = ceph.spec("db1-clone.v2").image_name          # dots: a name, not a path
    args = {**sock, "name": "c", "rbd": img, "ceph_conf": ceph.conf, "size": "4M"}
    rc, out = adhoc(env, "volume", args)
    assert rc == 0 and out["changed"], out
    assert out["volume"]["kind"] == "rbd"
    assert out["volume"]["path"] == f"rbd:{img}:conf={ceph.conf}:id=admin"
    rc, out = adhoc(env, "volume", args)
    assert rc == 0 and not out["changed"], out
    rc, out = adhoc(env, "volume", {**args, "rbd": "rbd/other"})
    assert rc != 0 and "is at rbd:" in out["msg"] and "not rbd:rbd/other" in out["msg"]
    rc, out = adhoc(env, "volume", {**args, "name": "d", "path": "/tmp/x"})
    assert rc != 0 and "mutually exclusive" in out["msg"]
    rc, out = adhoc(env, "volume", {**sock, "name": "e", "ceph_id": "admin", "size": "1M"})
    assert rc != 0 and "rbd" in out["msg"]
    rc, out = adhoc(env, "volume", {**args, "name": "f", "rbd": "rbd/x;y"})
    assert rc != 0 and "bad RBD image name" in out["msg"]
