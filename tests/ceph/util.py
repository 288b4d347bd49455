"""An independent librbd client for the ceph tier: what the daemon wrote,
as another client of the cluster sees it."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Any, Iterator

import rados
import rbd

from restore_core.stores.spec import RbdSpec
from tests.bench.cpuacct import thread_stats


@contextmanager
def other_client(spec: RbdSpec) -> Iterator[Any]:
    """An ioctx of the pool on a connection of its own."""
    c = rados.Rados(conffile=spec.conf, rados_id=spec.client_id)
    c.conf_set("rbd_cache", "false")
    c.connect(timeout=10)
    io = c.open_ioctx(spec.pool)
    try:
        yield io
    finally:
        io.close()
        c.shutdown()


def read_image(spec: RbdSpec, offset: int, length: int) -> bytes:
    with other_client(spec) as io, rbd.Image(io, spec.image, read_only=True) as img:
        return img.read(offset, length)


def take_over(spec: RbdSpec) -> tuple[Any, Any]:
    """Break the image's exclusive lock (blocklisting its owner, as a
    failover gateway would) and take it; returns (image, closer)."""
    c = rados.Rados(conffile=spec.conf, rados_id=spec.client_id)
    c.conf_set("rbd_cache", "false")
    c.connect(timeout=10)
    io = c.open_ioctx(spec.pool)
    img = rbd.Image(io, spec.image)
    for owner in img.lock_get_owners():
        img.lock_break(owner["mode"], owner["owner"])
    img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)

    def close() -> None:
        img.close()
        io.close()
        c.shutdown()
    return img, close


def create_image(spec: RbdSpec, size: int, features: int | None = None) -> None:
    with other_client(spec) as io:
        if features is None:
            rbd.RBD().create(io, spec.image, size, old_format=False)
        else:
            rbd.RBD().create(io, spec.image, size, old_format=False, features=features)


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped. The
    stop is asynchronous (each thread stops on its way back to user space):
    an OSD signalled a moment before a request can still answer it, and a
    test holding requests in flight would then see them complete (seen: 4
    of about 100 runs of the lane budget test)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = [fields[0].decode() for _, _, fields in thread_stats(pid)]
        if states and all(st in "TtXZ" for st in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop in {timeout} s: {states}")
        time.sleep(0.001)
