"""The record of which RBD lock owner a daemon's run was: one small file
per volume, written durably after the lock is taken, read at the next
start to break the lock a crashed run left behind."""
from __future__ import annotations

import os


def read_owner(path: str, limit: int = 256) -> str | None:
    try:
        with open(path) as f:
            text = f.read(limit).strip()
    except OSError:
        return None
    return text or None


def write_owner(path: str, owner: str) -> None:
    """Atomically and durably (a crash right after must find it)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, owner.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def forget_owner(path: str) -> None:
    """The volume is gone: nothing of it to break at the next start."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
