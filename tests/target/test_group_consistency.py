"""Cross-LU crash consistency of consistency groups, through a real daemon
and real iSCSI.

A writer plays a database: it writes record N to LU "data" (block N), waits
for the acknowledgement, then writes "N committed" to LU "log" (block N),
and so on. A clone pair is consistent when the log clone never says "N
committed" without the data clone holding record N.

* Group fracture at random moments while the writer runs, 50 times: every
  pair of clones is consistent.
* Group restore at random moments while the writer runs: the sources after
  it are consistent, except for at most the one chain the writer had in
  flight at the restore instant (record N acknowledged before it and so
  rolled back, "N committed" written after it) -- any restore undoes
  acknowledged writes; a restore at one instant can break only that chain.
* The same with the pairs fractured (restored) one by one, a pause between
  the two: the check finds the inconsistency, so it is not vacuous.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from dataclasses import dataclass, field
from typing import AsyncIterator

from target.control import Client
from tests.support import IQN, Daemon

from .iscsi.initiator import Initiator, InitiatorError

BLOCK = 512
SIZE = 8 << 20
NBLOCKS = SIZE // BLOCK
DATA, LOG = 0, 1                  # LUNs
ROUNDS = 50
RESTORE_EVERY = 5                 # a group restore after every 5th fracture
ONE_BY_ONE_PAUSE = 0.05           # seconds between the two single fractures / restores


def record(n: int) -> bytes:
    return f"record {n}".encode().ljust(BLOCK, b".")


def committed(n: int) -> bytes:
    return f"{n} committed".encode().ljust(BLOCK, b".")


@dataclass
class Writer:
    """Dependent writes data -> log, one chain at a time, with their times."""
    ini: Initiator
    n: int = 0
    # chain n -> (record sent, commit sent), loop time: the only times a host
    # knows for sure (an acknowledgement may reach it after other replies)
    times: dict[int, tuple[float, float]] = field(default_factory=dict)
    stop: bool = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop:
            n = self.n + 1
            assert n < NBLOCKS, "the writer ran out of blocks: make SIZE larger"
            sent = loop.time()
            await write(self.ini, DATA, n, record(n))
            self.times[n] = (sent, loop.time())
            await write(self.ini, LOG, n, committed(n))
            self.n = n


UNIT_ATTENTION = 0x6
UA_RETRIES = 64


async def command(ini: Initiator, lun: int, cdb: bytes, **kw) -> bytes:
    """A command as a host sends it: repeated after a unit attention (the
    first command of a session gets one, as after any reset; a restore
    start or end queues one per LU to every session)."""
    for _ in range(UA_RETRIES):
        r = await ini.scsi(lun, cdb, **kw)
        if r.status == 0:
            return r.data
        if len(r.sense) < 3 or r.sense[2] & 0xF != UNIT_ATTENTION:
            break
    raise InitiatorError(f"command 0x{cdb[0]:02x} failed: status 0x{r.status:02x} "
                         f"sense {r.sense.hex()}")


async def write(ini: Initiator, lun: int, lba: int, data: bytes) -> None:
    await command(ini, lun, struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // BLOCK, 0, 0),
                  data_out=data)


async def read(ini: Initiator, lun: int, lba: int, blocks: int) -> bytes:
    return await command(ini, lun, struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0),
                         read_len=blocks * BLOCK)


def broken_chains(data: bytes, log: bytes, upto: int) -> list[int]:
    """Chains whose commit is there without their record."""
    return [n for n in range(1, upto + 1)
            if log[n * BLOCK:(n + 1) * BLOCK] == committed(n)
            and data[n * BLOCK:(n + 1) * BLOCK] != record(n)]


class Rig:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.client = Client(daemon.sock)
        self.paths: dict[str, str] = {}

    async def ctl(self, op: str, **args):
        """A control call, off the loop (the writer keeps running)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.client.call(op, **args))

    async def setup(self, group: bool) -> None:
        for lu in ("data", "log"):
            for name in (lu, lu + "-clone"):
                v = await self.ctl("volume.create", name=name, size=str(SIZE))
                self.paths[name] = v["path"]
            await self.ctl("pair.create", source=lu, clone=lu + "-clone")
            await self.ctl("pair.wait", pair=lu + "-clone", timeout=60)
        await self.ctl("export.create", iqn=IQN, luns={str(DATA): "data", str(LOG): "log"})
        if group:
            await self.ctl("group.create", name="db", pairs=["data-clone", "log-clone"])

    def image(self, name: str, upto: int) -> bytes:
        with open(self.paths[name], "rb") as f:
            return os.pread(f.fileno(), (upto + 1) * BLOCK, 0)

    async def read_sources(self, ini: Initiator, upto: int) -> tuple[bytes, bytes]:
        """Both sources while the writer goes on: the log first, so every
        commit read has its record written before the data is read."""
        out = {}
        for lun in (LOG, DATA):
            buf = b""
            for lba in range(0, upto + 1, 256):
                buf += await read(ini, lun, lba, min(256, upto + 1 - lba))
            out[lun] = buf
        return out[DATA], out[LOG]


async def connect(d: Daemon) -> Initiator:
    ini = Initiator("127.0.0.1", d.port)
    await ini.login(IQN)
    return ini


@contextlib.asynccontextmanager
async def writing(daemon: Daemon, *, group: bool) -> AsyncIterator[tuple[Rig, Writer, Initiator]]:
    """The two pairs (in group db or not), the writer running in one session,
    and a second session to read the sources with."""
    rig = Rig(daemon)
    await rig.setup(group=group)
    ini, reader = await connect(daemon), await connect(daemon)
    writer = Writer(ini)
    task = asyncio.ensure_future(writer.run())
    try:
        yield rig, writer, reader
    finally:
        writer.stop = True
        await task
        await ini.close()
        await reader.close()


def test_group_fracture_and_restore_keep_dependent_writes_consistent(daemon):
    async def go():
        rnd = random.Random(13)
        mid_stream = restores = 0
        # chains a restore broke on the sources (see the module docstring):
        # later syncs copy them to the clones as they are
        rolled_back: set[int] = set()
        async with writing(daemon, group=True) as (rig, writer, reader):
            for rnd_no in range(ROUNDS):
                await rig.ctl("group.sync", name="db")
                await rig.ctl("group.wait", name="db", timeout=60)
                await asyncio.sleep(rnd.uniform(0.0, 0.03))
                at = writer.n
                await rig.ctl("group.fracture", name="db")
                upto = writer.n + 1
                data, log = rig.image("data-clone", upto), rig.image("log-clone", upto)
                broken = set(broken_chains(data, log, upto)) - rolled_back
                assert not broken, f"round {rnd_no}: fracture broke chains {broken}"
                in_clone = [n for n in range(1, upto + 1)
                            if log[n * BLOCK:(n + 1) * BLOCK] == committed(n)]
                # the writer was running at the instant: the clones hold what it
                # wrote while the call was on its way
                mid_stream += bool(in_clone) and max(in_clone) >= at
                if rnd_no % RESTORE_EVERY == RESTORE_EVERY - 1:
                    await asyncio.sleep(rnd.uniform(0.0, 0.03))
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    await rig.ctl("group.restore", name="db")
                    end = loop.time()
                    await rig.ctl("group.wait", name="db", timeout=60)
                    upto = writer.n + 1
                    data, log = await rig.read_sources(reader, upto)
                    broken = set(broken_chains(data, log, upto)) - rolled_back
                    window = [n for n, (record_sent, commit_sent) in writer.times.items()
                              if record_sent < end and commit_sent > start]
                    assert len(broken) <= 1 and broken <= set(window), \
                        f"round {rnd_no}: restore broke chains {broken} (in flight: {window})"
                    rolled_back |= broken
                    restores += 1
        # the fractures fell inside the stream, not between its bursts
        assert mid_stream >= ROUNDS * 0.8, mid_stream
        assert restores == ROUNDS // RESTORE_EVERY
    asyncio.run(go())


def test_one_by_one_fractures_and_restores_are_caught_inconsistent(daemon):
    """The check above is not vacuous: fracturing the data pair, then the log
    pair a moment later, leaves log commits whose records the data clone
    never saw; restoring the log pair first, then the data pair, rolls back
    records whose commits survive."""
    async def go():
        async with writing(daemon, group=False) as (rig, writer, reader):
            while writer.n < 10:
                await asyncio.sleep(0.01)
            await rig.ctl("pair.fracture", pair="data-clone")
            await asyncio.sleep(ONE_BY_ONE_PAUSE)
            await rig.ctl("pair.fracture", pair="log-clone")
            upto = writer.n + 1
            broken = broken_chains(rig.image("data-clone", upto), rig.image("log-clone", upto),
                                   upto)
            assert len(broken) > 1, "one-by-one fractures went unnoticed"

            await asyncio.sleep(0.02)
            await rig.ctl("pair.restore", pair="log-clone")
            await asyncio.sleep(ONE_BY_ONE_PAUSE)
            await rig.ctl("pair.restore", pair="data-clone")
            for pair in ("log-clone", "data-clone"):
                await rig.ctl("pair.wait", pair=pair, timeout=60)
            upto = writer.n + 1
            data, log = await rig.read_sources(reader, upto)
            assert len(broken_chains(data, log, upto)) > 1, "one-by-one restores went unnoticed"
    asyncio.run(go())
