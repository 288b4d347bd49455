"""What the CLI and the shell share: both are clients of the control socket
and follow jobs, save configurations and send paths the same way.

In its own module so that the shell (target.shell.tree) need not import the
CLI, which imports the shell.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from .control import Client
from .follow import Followed, follow, to_stderr


def client_path(path: str | None) -> str | None:
    """A path the user typed, made absolute against OUR working directory:
    the daemon runs elsewhere and refuses relative paths."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def write_private(path: str, text: str) -> None:
    """Write a file only its owner can read (a saved configuration has the
    CHAP secrets), replacing it atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def wait_job(client: Client, first: dict[str, Any], json_out: bool) -> Followed:
    """Follow a pair's job to its end: a live bar on a terminal, lines
    otherwise (none with --json). ``first`` is the pair as the request that
    started the job (or `pair.show`) returned it."""
    tty = sys.stdout.isatty() and not json_out
    return follow(client, first, live=tty, lines=not tty and not json_out,
                  on_interrupt=to_stderr)
