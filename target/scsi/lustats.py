"""Per-LU command counters for the metrics endpoint (target.metrics).

Counted where every command of both front ends passes, ScsiDevice.submit
(on its direct path and when its work finishes), at a cost of a few list increments per command: the
metrics collector reads these at scrape time and turns them into
Prometheus counters and latency histograms. Bytes are the data moved over
the wire by commands that completed with GOOD (Data-In of a read, Data-Out
of a write).
"""
from __future__ import annotations

from bisect import bisect_left

from . import sbc
from .api import GOOD, ScsiCommand, ScsiResponse
from .commands import COMMANDS, Cdb, CommandSpec

READ, WRITE, OTHER = 0, 1, 2
KINDS = ("read", "write", "other")
#: Upper bounds (seconds) of the latency histogram's buckets: the fast
#: path's tens of microseconds up to a command held behind a slow copy.
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                   50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)



def kind_of(spec: CommandSpec) -> int:
    """READ for the medium reads, WRITE for the commands that write blocks
    at an LBA (WRITE, WRITE AND VERIFY, WRITE SAME, COMPARE AND WRITE),
    OTHER for the rest: read off the command table, which is the one place
    that knows what a command is."""
    if spec.handler is sbc.read:
        return READ
    return WRITE if spec.writes and spec.lba is not None else OTHER


# Each table entry's kind, by id() (the entries live as long as the
# module): one dict look-up per command; unknown opcodes are OTHER.
_KIND_BY_SPEC = {id(s): kind_of(s) for s in COMMANDS}


class LuStats:
    __slots__ = ("commands", "bytes", "seconds", "buckets")

    def __init__(self) -> None:
        self.commands = [0, 0, 0]
        self.bytes = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        # per kind: commands per latency bucket (not cumulative), +Inf last
        self.buckets = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in KINDS]

    def add(self, kind: int, commands: int, nbytes: int, seconds: float, buckets: list[int]) -> None:
        """Counts of ``kind`` kept elsewhere (the native TCMU ring loop's, per
        bucket of LATENCY_BUCKETS as here) folded in."""
        self.commands[kind] += commands
        self.bytes[kind] += nbytes
        self.seconds[kind] += seconds
        row = self.buckets[kind]
        for i, n in enumerate(buckets):
            row[i] += n

    def record(self, d: Cdb, cmd: ScsiCommand, resp: ScsiResponse, seconds: float) -> None:
        k = _KIND_BY_SPEC.get(id(d.spec), OTHER)
        self.commands[k] += 1
        self.seconds[k] += seconds
        self.buckets[k][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if resp.status == GOOD:
            if k == READ:
                # a direct read fills the transport's buffers: no data_in then
                self.bytes[k] += cmd.expected_in if resp.data_in_placed else len(resp.data_in)
            elif k == WRITE:
                self.bytes[k] += d.data_out or 0
