"""Following a pair's sync or restore to its end (`--wait`, `pair wait`, the
shell's `wait`): how a job ended, the exit status that stands for it, and
the live progress in bytes.

The CLI, the shell and (by the same words, in its own Python) the Ansible
pair module agree on the outcomes below.
"""
from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .control import Client
from .fmt import duration, eta, human

POLL_S = 0.25
PLAIN_LINE_S = 2.0        # a progress line this often when stdout is no terminal


class Outcome(enum.Enum):
    FINISHED = "finished"
    PAUSED = "paused"
    FAILED = "failed"
    ABORTED = "aborted"
    WAITING = "waiting"     # a volume of the pair is offline; the job resumes after relink


#: Exit status of `pair create|sync|restore|abort --wait` and `pair wait` per
#: outcome. ABORTED: the restore followed was aborted ('pair abort'; the
#: abort itself is followed to its end like any job).
EXIT_STATUS: dict[Outcome, int] = {Outcome.FINISHED: 0, Outcome.PAUSED: 3, Outcome.FAILED: 4,
                                   Outcome.ABORTED: 5, Outcome.WAITING: 6}

EXIT_HELP = ("exit status with --wait: 0 the job finished, 3 it was paused, 4 it failed, "
             "5 it was aborted, 6 it waits for an offline volume (1 any other error); "
             "Ctrl-C stops following, the job goes on")

# What a finished job did, for the last line ("restored 1.0 GiB in 12s").
_DONE_VERB = {"restore": "restored", "sync": "synced", "abort": "put back"}


def outcome(pair: dict[str, Any], following: str | None = None) -> Outcome | None:
    """How the pair's job stands: None while it runs. ``following``: the
    kind of job being followed; a restore followed ends ABORTED once an
    abort of it began (``progress.aborted``, set until the pair's next job)."""
    pr = pair["progress"]
    if pr.get("aborted") and following == "restore":
        return Outcome.ABORTED
    if pr["job"] is None:
        return Outcome.FINISHED
    if pr["error"]:
        return Outcome.FAILED
    if pr["paused"]:
        return Outcome.PAUSED
    if pair.get("offline"):
        return Outcome.WAITING
    return None


def job_bytes(pair: dict[str, Any]) -> tuple[int, int]:
    """(bytes done, bytes in all) of the running job: its extents at the
    pair's extent size, the last extent cut at the LU's end."""
    pr, es, size = pair["progress"], pair["extent_size"], pair["size"]
    return min(pr["extents_done"] * es, size), min(pr["extents_total"] * es, size)


@dataclass
class Followed:
    """The end of following: the pair as last seen, how its job ended, and
    the one line that says so."""
    pair: dict[str, Any]
    outcome: Outcome
    message: str

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.outcome]


def _message(p: dict[str, Any], kind: str | None, total: int, elapsed: float,
             how: Outcome) -> str:
    pr = p["progress"]
    what = kind or "job"
    if how is Outcome.FINISHED:
        if kind is None:
            return f"{p['id']}: no job running; state {p['state']}"
        return (f"{p['id']}: {_DONE_VERB.get(kind, kind + ' done:')} {human(total)} in "
                f"{duration(elapsed)}; state {p['state']}, "
                f"{human(pr['delta_extents'] * p['extent_size'])} differ")
    if how is Outcome.PAUSED:
        return (f"{p['id']}: the {what} is paused; continue it with "
                f"'liverestore pair resume {p['id']}'")
    if how is Outcome.FAILED:
        return (f"{p['id']}: the {what} stopped: {pr['error']} (fix the cause, then "
                f"'liverestore pair resume {p['id']}')")
    if how is Outcome.WAITING:
        return (f"{p['id']}: the {what} waits: {p['offline']} (it resumes after "
                "'liverestore volume relink')")
    return (f"{p['id']}: the restore was aborted ('pair abort'); its abort "
            f"{'puts back' if pr['job'] == 'abort' else 'put back'} the source's data; "
            f"state {p['state']}")


class _Bar:
    """rich's live bar in bytes, with the daemon's own rate and ETA: the
    daemon measures the copy, the client only sees samples of it."""

    def __init__(self) -> None:
        # rich (0.1 s to import) only when a live bar is drawn
        from rich.progress import BarColumn, Progress, TextColumn
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[done]} / {task.fields[total_h]}"),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"))
        self.progress.start()
        self.task: Any = None

    def update(self, p: dict[str, Any]) -> None:
        pr = p["progress"]
        done, total = job_bytes(p)
        fields = {"done": human(done), "total_h": human(total), "rate": human(pr["rate"]) + "/s",
                  "eta": eta(pr["eta"])}
        if self.task is None:
            self.task = self.progress.add_task(f"{p['id']} {pr['job']}", total=total or 1,
                                               **fields)
        self.progress.update(self.task, completed=done, total=total or 1, **fields)

    def complete(self) -> None:
        """The job finished: the bar ends full, ETA 0."""
        if self.task is not None:
            t = self.progress.tasks[0]
            self.progress.update(self.task, completed=t.total,
                                 done=t.fields["total_h"], eta=eta(0))

    def stop(self) -> None:
        self.progress.stop()


def follow(client: Client, first: dict[str, Any], *, live: bool, lines: bool,
           on_interrupt: Callable[[str], None] | None = None) -> Followed:
    """Follow ``first``'s job (the pair as the starting request returned it)
    until it ends: a live bar when ``live``, a line every few seconds when
    ``lines``, nothing otherwise.

    Ctrl-C stops following only: ``on_interrupt`` gets the line that says
    the job goes on and how to follow it again, then KeyboardInterrupt
    propagates."""
    started = time.monotonic()
    kind = first["progress"]["job"]
    p = first
    last_total = job_bytes(p)[1]
    bar = _Bar() if live else None
    last_line = 0.0
    try:
        while True:
            how = outcome(p, kind)
            if how is not None:
                break
            last_total = job_bytes(p)[1]
            if bar is not None:
                bar.update(p)
            elif lines and time.monotonic() - last_line > PLAIN_LINE_S:
                pr = p["progress"]
                done, total = job_bytes(p)
                pct = 100 * done // total if total else 100
                print(f"{p['id']}: {pr['job']} {pct}% {human(done)} of {human(total)}, "
                      f"{human(pr['rate'])}/s, eta {eta(pr['eta'])}", flush=True)
                last_line = time.monotonic()
            time.sleep(POLL_S)
            p = client.call("pair.show", pair=p["id"])
        if bar is not None and how is Outcome.FINISHED:
            bar.complete()
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
            bar = None
        if on_interrupt is not None and kind is not None:
            on_interrupt(f"stopped following; the {kind} of {p['id']} goes on in the daemon: "
                         f"follow it again with 'liverestore pair wait {p['id']}' "
                         "(or see 'liverestore status')")
        raise
    finally:
        if bar is not None:
            bar.stop()
    return Followed(p, how, _message(p, kind, last_total, time.monotonic() - started, how))


def to_stderr(line: str) -> None:
    print(f"\nliverestore: {line}", file=sys.stderr, flush=True)
