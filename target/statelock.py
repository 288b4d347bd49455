"""The state directory's lock: one daemon per state directory.

Two daemons on one state directory would both persist maps and configuration
into the same database and serve the same images: the second one's writes
silently undo the first one's. `serve` takes an exclusive flock on
STATE_DIR/liverestore.lock before anything else (no port bound, no socket,
no database opened) and holds it for its whole life; the kernel drops it
when the process dies, so a crash never leaves a stale lock behind.
The holder writes its pid into the file so a refused daemon can name it.
"""
from __future__ import annotations

import fcntl
import os

LOCK_NAME = "liverestore.lock"


class StateDirBusy(Exception):
    """Another live process holds the state directory."""


class StateLock:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LOCK_NAME)
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise StateDirBusy (naming the holder) / OSError."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise StateDirBusy(f"state directory {os.path.dirname(self.path)} is in use by "
                               f"another liverestore daemon{who}") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)      # closing the last descriptor drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
