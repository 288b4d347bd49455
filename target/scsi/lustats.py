"""Per-LU command counters for the metrics endpoint (target.metrics).

Counted where every command of both front ends passes, ScsiDevice.execute
and try_execute, at a cost of a few list increments per command: the
metrics collector reads these at scrape time and turns them into
Prometheus counters and latency histograms. Bytes are the data moved over
the wire by commands that completed with GOOD (Data-In of a read, Data-Out
of a write).
"""
from __future__ import annotations

from bisect import bisect_left

from . import constants as c
from .api import GOOD, ScsiCommand, ScsiResponse

READ, WRITE, OTHER = 0, 1, 2
KINDS = ("read", "write", "other")
#: Upper bounds (seconds) of the latency histogram's buckets: the fast
#: path's tens of microseconds up to a command held behind a slow copy.
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                   50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)

_READS = (0x08, c.READ_10, 0xA8, c.READ_16)
# WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16), WRITE SAME(10/16), COMPARE AND WRITE
_WRITES = (0x0A, c.WRITE_10, 0xAA, c.WRITE_16, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x89)
#: opcode -> kind, one index per command instead of set look-ups
KIND_OF = bytes(READ if op in _READS else WRITE if op in _WRITES else OTHER for op in range(256))


class LuStats:
    __slots__ = ("commands", "bytes", "seconds", "buckets")

    def __init__(self) -> None:
        self.commands = [0, 0, 0]
        self.bytes = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        # per kind: commands per latency bucket (not cumulative), +Inf last
        self.buckets = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in KINDS]

    def record(self, cmd: ScsiCommand, resp: ScsiResponse, seconds: float) -> None:
        k = KIND_OF[cmd.cdb[0]] if cmd.cdb else OTHER
        self.commands[k] += 1
        self.seconds[k] += seconds
        self.buckets[k][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if resp.status == GOOD:
            if k == READ:
                # the fast path fills the transport's buffers: no data_in then
                self.bytes[k] += len(resp.data_in) or cmd.expected_in
            elif k == WRITE and cmd.data_out is not None:
                self.bytes[k] += len(cmd.data_out)
