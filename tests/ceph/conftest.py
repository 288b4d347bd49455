"""A real single-node Ceph cluster (mon + mgr + one memstore OSD on
127.0.0.1, auth none) for the RBD tier: started once per session by
ceph-single-node.sh (about 5-8 s, about 400 MB RSS), stopped at the end.
Every test in this directory is marked ``ceph`` (select or skip the tier
with -m); without the Ceph packages the tier fails, it is not skipped:
``bash .ci/install --test`` installs them."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

from restore_core.stores.spec import RbdSpec
from tests.support import free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "ceph-single-node.sh")
#: OSD ops time out after this many seconds in tests (the product's default
#: is 25 s): a stopped OSD must give errors quickly here.
TEST_OSD_OP_TIMEOUT_S = 5


@dataclass(frozen=True)
class Cluster:
    dir: str
    conf: str
    pool: str = "rbd"

    def spec(self, image: str | None = None) -> RbdSpec:
        """A fresh image name (unless given) in the test pool."""
        return RbdSpec(self.pool, image or f"t-{uuid.uuid4().hex[:12]}", self.conf)


def pytest_collection_modifyitems(items) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.ceph)


@pytest.fixture(scope="session")
def ceph() -> Iterator[Cluster]:
    if shutil.which("ceph-mon") is None:
        pytest.fail("the ceph tier needs ceph-mon/ceph-osd/ceph-mgr: bash .ci/install --test")
    base = tempfile.mkdtemp(prefix="lr-ceph-")
    d = os.path.join(base, "c")
    lo = 20000 + (os.getpid() % 200) * 100      # osd/mgr ports: first free in the range
    env = {**os.environ, "CEPH_SN_MON_PORT": str(free_port()), "CEPH_SN_MON_PORT2": str(free_port()),
           "CEPH_SN_PORT_MIN": str(lo), "CEPH_SN_PORT_MAX": str(lo + 99)}
    try:
        out = subprocess.run([SCRIPT, "start", d], env=env, capture_output=True, text=True,
                             timeout=180)
        if out.returncode != 0:
            pytest.fail(f"ceph-single-node.sh start failed:\n{out.stderr[-2000:]}")
        conf = out.stdout.strip().splitlines()[-1]
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("[client]\n", f"[client]\nrados_osd_op_timeout = "
                                 f"{TEST_OSD_OP_TIMEOUT_S}\nrados_mon_op_timeout = "
                                 f"{TEST_OSD_OP_TIMEOUT_S}\n", 1))
        yield Cluster(d, conf)
    finally:
        subprocess.run([SCRIPT, "stop", d], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
