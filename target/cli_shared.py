"""What the CLI and the shell share: both are clients of the control socket
and follow jobs, save configurations and send paths the same way.

In its own module so that the shell (target.shell.tree) need not import the
CLI, which imports the shell.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from .control import Client, ControlError
from .fmt import eta, human


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


def wait_job(client: Client, pair: str, json_out: bool) -> dict[str, Any]:
    """Follow a pair's job to its end: a live bar on a terminal, lines otherwise."""
    tty = sys.stdout.isatty() and not json_out
    last_line = 0.0
    progress = None
    task = None
    if tty:
        # rich (0.1 s to import) only when a live bar is drawn
        from rich.progress import (BarColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} extents"),
                            TransferSpeedColumn(), TimeRemainingColumn())
        progress.start()
    try:
        while True:
            p = client.call("pair.show", pair=pair)
            pr = p["progress"]
            if pr["job"] is None or pr["paused"] or pr["error"] or p.get("offline"):
                break
            if progress is not None:
                if task is None:
                    task = progress.add_task(f"{p['id']} {pr['job']}", total=pr["extents_total"])
                progress.update(task, completed=pr["extents_done"])
            elif not json_out and time.monotonic() - last_line > 2:
                print(f"{p['id']}: {pr['job']} {pr['extents_done']}/{pr['extents_total']} extents, "
                      f"{human(pr['rate'])}/s, eta {eta(pr['eta'])}", flush=True)
                last_line = time.monotonic()
            time.sleep(0.25)
    finally:
        if progress is not None:
            progress.stop()
    if pr["error"]:
        raise ControlError(f"{p['id']}: {pr['job']} stopped: {pr['error']} "
                           "(fix the cause, then 'liverestore pair resume')")
    if p.get("offline") and pr["job"]:
        raise ControlError(f"{p['id']}: {pr['job']} waits: {p['offline']} (it resumes after "
                           "'liverestore volume relink')")
    if not tty and not json_out:
        print(f"{p['id']}: {'paused' if pr['paused'] else 'done'}, state {p['state']}, "
              f"{pr['delta_extents']} extents differ", flush=True)
    return p
