"""The background copier's knobs (a pair's throttle).

One table says, for each knob, its default, its range and what it does. The
engine validates against it; the CLI's options, the shell's `set throttle`
parameters and the saved configuration's schema are built from it, so a
range or a meaning is stated once (the Ansible module's documentation has to
be static YAML; tests/ansible checks it against this table).

This module imports only hostyield's constants (no engine), so the client
side (target/cli.py) can read the table without loading the server stack.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .hostyield import CALIBRATE_HOLD_S, CALIBRATE_MIN_JOB, MAX_CALIBRATE_MS


@dataclass(frozen=True)
class Knob:
    name: str
    lo: int
    hi: int | None          # None: no upper bound
    meaning: str            # what it does, without its range
    note: str = ""          # what a special value means: "0: unlimited"
    unit: str = ""          # for messages: "bytes/s", "copy round trips"
    size: bool = False      # given as a size ("200M"), which the daemon parses

    def range_text(self, to: str = "-") -> str:
        """The allowed values as an admin reads them: 1-4096, >= 0."""
        return f">= {self.lo}" if self.hi is None else f"{self.lo}{to}{self.hi}"

    @property
    def help(self) -> str:
        """The meaning, the range (unless unbounded) and the special value:
        "copy I/Os in flight at once (1-64)"."""
        said = [self.range_text() if self.hi is not None else "", self.note]
        return f"{self.meaning} ({'; '.join(t for t in said if t)})"

    def check(self, value: int) -> None:
        if value < self.lo or (self.hi is not None and value > self.hi):
            unit = f" {self.unit}" if self.unit else ""
            raise ValueError(f"{self.name} must be {self.range_text('..')}{unit}, not {value}")


KNOBS: tuple[Knob, ...] = (
    Knob("rate", 0, None, "background copy bytes/s, e.g. 200M", "0: unlimited", "bytes/s",
         size=True),
    Knob("batch_extents", 1, 4096, "adjacent extents merged into one copy I/O"),
    Knob("depth", 1, 64, "copy I/Os in flight at once"),
    Knob("host_window", 0, 10000, "hosts count as busy while a command was seen within this "
         "many copy round trips", "0: never yield", "copy round trips"),
    Knob("min_progress_pct", 1, 100, "while hosts are busy, copy at this % of the idle rate"),
    Knob("calibrate_ms", 0, MAX_CALIBRATE_MS,
         f"a job of {CALIBRATE_MIN_JOB >> 20} MiB or more first holds host I/O this long to "
         "measure the idle rate", "0: no hold", "ms"),
)
KNOB = {k.name: k for k in KNOBS}

# Knobs of earlier versions, replaced by host_window and min_progress_pct:
# a saved configuration may still carry them; they are accepted and ignored.
RETIRED_THROTTLE_KNOBS = ("host_yield_ms", "host_pause_us")


@dataclass
class Throttle:
    """Background copier knobs (their ranges: KNOBS).

    rate: bytes/s, 0 for unlimited. batch_extents: adjacent extents merged
    into one copy I/O and copied between map commits (dm-clone's
    hydration_batch_size). depth: copy I/Os in flight at once (dm-clone's
    hydration_threshold). While a host command was seen within the last
    host_window copy round trips the LU is busy: the copier copies only
    while behind min_progress_pct percent of its idle rate, by background
    I/O (see restore_core.hostyield); host_window 0 turns yielding off.
    calibrate_ms: each job of CALIBRATE_MIN_JOB or more starts by holding
    the LU's host I/O this long to measure the idle rate the floor is a
    share of (0: no hold; the floor's base is then measured between host
    bursts, and reads low on a busy machine).
    """

    rate: int = 0
    batch_extents: int = 16
    depth: int = 2
    host_window: int = 8
    min_progress_pct: int = 10
    calibrate_ms: int = round(CALIBRATE_HOLD_S * 1000)

    def validate(self) -> None:
        for f in fields(self):
            KNOB[f.name].check(getattr(self, f.name))
