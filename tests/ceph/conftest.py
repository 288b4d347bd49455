"""A real single-node Ceph cluster (mon + mgr + one memstore OSD on
127.0.0.1, auth none) for the RBD tier: started once per session by
ceph-single-node.sh (about 5-8 s, about 400 MB RSS), stopped at the end.
Every test in this directory is marked ``ceph`` (select or skip the tier
with -m); without the Ceph packages the tier fails, it is not skipped:
``bash .ci/install --test`` installs them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
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
#: a command may take the op timeout plus scheduling on a loaded machine
COMMAND_BOUND_S = TEST_OSD_OP_TIMEOUT_S + 3


@dataclass(frozen=True)
class Cluster:
    dir: str
    conf: str
    pool: str = "rbd"

    def spec(self, image: str | None = None) -> RbdSpec:
        """A fresh image name (unless given) in the test pool."""
        return RbdSpec(self.pool, image or f"t-{uuid.uuid4().hex[:12]}", self.conf)

    def kill(self, daemon: str) -> list[str]:
        """SIGKILL one of the cluster's daemons ("osd", "mon", "mgr");
        returns its command line (to restart it)."""
        pid = int(open(os.path.join(self.dir, "pids", daemon)).read())
        cmd = open(f"/proc/{pid}/cmdline").read().rstrip("\0").split("\0")
        assert f"{self.dir}/ceph.conf" in cmd, cmd      # ours, not a reused PID
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not os.path.exists(f"/proc/{pid}") or " Z " in open(f"/proc/{pid}/stat").read():
                break
            time.sleep(0.05)
        return cmd

    def restart(self, daemon: str, cmd: list[str]) -> None:
        """Run a killed daemon again (recorded, so the script's stop kills it)."""
        log = open(os.path.join(self.dir, "log", f"{daemon}.out"), "a")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
        with open(os.path.join(self.dir, "pids", daemon), "w") as f:
            f.write(str(p.pid))


def pytest_collection_modifyitems(items) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.ceph)


def _start(store: str) -> Iterator[Cluster]:
    if shutil.which("ceph-mon") is None:
        pytest.fail("the ceph tier needs ceph-mon/ceph-osd/ceph-mgr: bash .ci/install --test")
    base = tempfile.mkdtemp(prefix="lr-ceph-")
    d = os.path.join(base, "c")
    lo = 20000 + (os.getpid() % 200) * 100 + (50 if store != "memstore" else 0)
    env = {**os.environ, "CEPH_SN_MON_PORT": str(free_port()), "CEPH_SN_MON_PORT2": str(free_port()),
           "CEPH_SN_PORT_MIN": str(lo), "CEPH_SN_PORT_MAX": str(lo + 49), "CEPH_SN_STORE": store,
           "CEPH_SN_STORE_BYTES": str(1 << 30)}
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


@pytest.fixture(scope="session")
def ceph() -> Iterator[Cluster]:
    """The shared cluster: memstore (data in RAM, lost if the OSD dies)."""
    yield from _start("memstore")


@pytest.fixture(scope="module")
def ceph_bluestore() -> Iterator[Cluster]:
    """A cluster of the module's own whose OSD keeps its data across kill -9
    (BlueStore on a sparse file), for killing and restarting its daemons."""
    yield from _start("bluestore")
