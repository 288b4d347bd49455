"""`liverestore demo --tour`: the whole story, unattended and narrated.

It starts its own daemon in-process (a fresh state directory, the embedded
iSCSI target on a free loopback port) and plays the host itself: every
read and write below is a SCSI READ(16)/WRITE(16) sent to the LU through
the same SCSI layer the iSCSI target hands its commands to, so no client
tool is needed. The story:

  1. a host writes a small file system (superblock, inode table, files)
  2. the clone is synchronized, then fractured: a point in time
  3. the source is damaged (superblock and files overwritten)
  4. a protected restore starts, throttled so it can be watched
  5. while the bar moves, the host reads the far end of the volume, which
     the copier has not reached: those extents are read from the clone, with
     no copy; then it rewrites one block there, and copy-on-demand brings
     that extent over first
  6. the restore finishes; the source is the point in time again, byte for
     byte, and the clone was never written

At the end it says which initiator tools this machine has, to try the demo
target with a real host (`liverestore demo`).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Callable

from .errors import ServiceError
from .fmt import human
from .scsi.api import GOOD, Nexus, ScsiCommand
from .scsi.device import ScsiDevice
from .service import Service

TOUR_IQN = "iqn.2026-11.io.liverestore:tour"
NEXUS = Nexus(f"{TOUR_IQN}.host,i,0x000000000001", f"{TOUR_IQN},t,0x1", f"{TOUR_IQN}.host")
BLOCK = 512
FS_BLOCK = 4096
MAGIC = b"LRFS"
RESTORE_SECONDS = 4.0       # the throttle makes the restore last about this long
CHUNK = 1 << 20             # bytes per SCSI command while writing and checking
MIN_SIZE = 4 << 20
DEFAULT_SIZE = "64M"

#: Initiator tools to try the demo target with: command -> Debian package.
CLIENT_TOOLS = {"iscsi-ls": "libiscsi-bin", "qemu-io": "qemu-utils qemu-block-extra",
                "iscsiadm": "open-iscsi"}


class TourFailed(Exception):
    """A step of the story did not hold; the message says which."""


def file_block(n: int) -> bytes:
    """File-system block ``n`` of the pattern: block 0 the superblock, 1-7
    the inode table, the rest file data (each block names its file and
    place, plus a digest, so any misplaced or stale block shows)."""
    if n == 0:
        head = MAGIC + struct.pack(">II", 1, FS_BLOCK)
    elif n < 8:
        head = b"INODES" + struct.pack(">I", n)
    else:
        head = f"file{(n - 8) // 16:05d} block{(n - 8) % 16:02d} ".encode()
    body = (head + hashlib.sha256(head).digest()) * (FS_BLOCK // (len(head) + 32) + 1)
    return body[:FS_BLOCK]


def pattern(offset: int, length: int) -> bytes:
    first = offset // FS_BLOCK
    return b"".join(file_block(n) for n in range(first, first + length // FS_BLOCK))


class Host:
    """The host's side of one LU: SCSI commands, as the transport sends them."""

    def __init__(self, device: ScsiDevice) -> None:
        self.device = device

    async def _run(self, cdb: bytes, data_out: bytes | None = None, expected_in: int = 0) -> bytes:
        for _ in range(4):          # a unit attention (power on, capacity) is reported once
            resp = await self.device.execute(ScsiCommand(cdb, 0, NEXUS, data_out, expected_in))
            if resp.status == GOOD:
                return bytes(resp.data_in)
            if not (len(resp.sense) > 2 and resp.sense[2] & 0x0F == 0x06):
                raise TourFailed(f"SCSI command {cdb[0]:#04x} failed: sense {resp.sense.hex()}")
        raise TourFailed("unit attentions without end")

    async def read(self, offset: int, length: int) -> bytes:
        cdb = struct.pack(">BBQIBB", 0x88, 0, offset // BLOCK, length // BLOCK, 0, 0)
        return await self._run(cdb, expected_in=length)

    async def write(self, offset: int, data: bytes) -> None:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, offset // BLOCK, len(data) // BLOCK, 0, 0)
        await self._run(cdb, data_out=data)

    async def matches(self, offset: int, length: int) -> bool:
        for at in range(offset, offset + length, CHUNK):
            n = min(CHUNK, offset + length - at)
            if await self.read(at, n) != pattern(at, n):
                return False
        return True


class Tour:
    def __init__(self, size: str, say: Callable[[str], None], tty: bool) -> None:
        self.size_text = size
        self.size = 0
        self.say = say
        self.tty = tty
        self._started = 0.0        # when the restore started (the bar's rate)
        self._done = 0
        self._total = 1
        self._bar_open = False     # the bar's line is drawn and not yet ended

    async def run(self, state_dir: str) -> None:
        service = Service(state_dir, init=True, portals=[("127.0.0.1", 0)], backend="embedded")
        await service.start()
        try:
            await self._story(service)
        finally:
            await service.stop()

    def step(self, n: int, text: str) -> None:
        self.say(f"\n[{n}/6] {text}")

    async def _story(self, svc: Service) -> None:
        self.size = size = (await svc.volume_create("db1", size=self.size_text))["size"]
        if size % CHUNK or size < MIN_SIZE:
            raise TourFailed(f"--size must be a whole number of MiB, at least "
                             f"{MIN_SIZE >> 20}M, not {self.size_text}")
        await svc.volume_create("db1-clone", size=size)
        await svc.export_create(TOUR_IQN, {"0": "db1"})
        host, port = svc.portals()[0]
        self.say(f"A demo target is up: {TOUR_IQN} on {host}:{port}, LUN 0 = volume db1 "
                 f"({human(size)}). This tour plays the host itself.")
        src = Host(svc.devices["db1"])

        self.step(1, "The host writes a small file system: superblock, inode table, "
                     f"{(size // FS_BLOCK - 8) // 16} files.")
        for at in range(0, size, CHUNK):
            await src.write(at, pattern(at, min(CHUNK, size - at)))

        self.step(2, "Clone db1 to db1-clone (a full sync), then fracture: the clone keeps "
                     "this point in time.")
        await svc.pair_create("db1", "db1-clone")
        await svc.pair_wait("db1-clone", 600)
        await svc.pair_fracture("db1-clone")
        self.say("   db1-clone is fractured; from now on writes to db1 are tracked as delta.")

        self.step(3, "Disaster: something overwrites the superblock and the first half "
                     "of the files.")
        damaged = size // 2
        for at in range(0, damaged, CHUNK):
            await src.write(at, b"\xde\xad" * (CHUNK // 2))
        sb = await src.read(0, FS_BLOCK)
        self.say(f"   the host reads its superblock: {sb[:4]!r} (was {MAGIC!r}) - the file "
                 "system is gone. Delta: "
                 f"{svc.pair_show('db1-clone')['progress']['delta_extents']} extents.")

        self.step(4, "Protected restore from the clone, while the host stays online. "
                     f"Throttled to {human(damaged / RESTORE_SECONDS)}/s so you can watch.")
        await svc.pair_throttle("db1-clone", rate=int(damaged / RESTORE_SECONDS))
        await svc.pair_restore("db1-clone", protected=True)
        self._started = time.monotonic()

        self.step(5, "While the bar moves, the host reads the last damaged file - far ahead "
                     "of the copier: extents not yet restored are read straight from the clone.")
        bar = asyncio.get_running_loop().create_task(self._bar(svc))
        try:
            await asyncio.sleep(0.5)
            tail = damaged - 16 * FS_BLOCK
            pair = svc.eng.pairs["db1-clone"]
            before = pair.cod_extents
            t0 = time.monotonic()
            ok = await src.matches(tail, 16 * FS_BLOCK)
            took = time.monotonic() - t0
            pr = svc.pair_show("db1-clone")["progress"]
            self._line(f"   that file reads {'correct' if ok else 'WRONG'} in "
                       f"{took * 1000:.1f} ms, with the restore at "
                       f"{pr['extents_done']}/{pr['extents_total']} extents; "
                       f"{pair.cod_extents - before} extents copied for it.")
            if not ok:
                raise TourFailed("the host read wrong data during the restore")
            # the same content: the point in time stays what step 6 checks
            before = pair.cod_extents
            await src.write(tail, pattern(tail, FS_BLOCK))
            copied = pair.cod_extents - before
            self._line(f"   the host rewrites that file's first block: part of an extent not "
                       f"yet restored, so {copied} extent{'' if copied == 1 else 's'} "
                       "copied on demand first.")
            sb = await src.read(0, FS_BLOCK)
            self._line(f"   and its superblock is {sb[:4]!r} again: the host can mount now, "
                       "not after the restore.")
            await svc.pair_wait("db1-clone", 600)
        finally:
            bar.cancel()
            await asyncio.gather(bar, return_exceptions=True)
        self._progress(svc)
        self._line("")

        self.step(6, "Verify: every block of db1 is the point in time again, and the clone "
                     "was never written.")
        p = svc.pair_show("db1-clone")
        if p["state"] != "fractured" or p["progress"]["error"]:
            raise TourFailed(f"the restore ended {p['state']}: {p['progress']['error']}")
        if not await src.matches(0, size):
            raise TourFailed("db1 differs from the point in time after the restore")
        self.say(f"   db1: all {size // FS_BLOCK} blocks match the point in time.")
        if not await Host(svc.devices["db1-clone"]).matches(0, size):
            raise TourFailed("the clone changed")
        self.say("   db1-clone: untouched, still the point in time (the next restore can "
                 "use it again).")
        self.say("\nThe restore is done. The host never went offline.")

    async def _bar(self, svc: Service) -> None:
        while True:
            self._progress(svc)
            await asyncio.sleep(0.2 if self.tty else 1.0)

    def _progress(self, svc: Service) -> None:
        p = svc.pair_show("db1-clone")
        pr = p["progress"]
        if pr["job"] is not None:
            self._total = pr["extents_total"] or 1
            self._done = pr["extents_done"]
        else:
            self._done = self._total          # finished: the job's numbers are gone
        filled = 30 * self._done // self._total
        # the average since the restore started: what the throttle allows
        rate = self._done * p["extent_size"] / max(time.monotonic() - self._started, 1e-3)
        line = (f"   [{'#' * filled}{'.' * (30 - filled)}] {100 * self._done // self._total:3d}%  "
                f"{human(rate)}/s")
        if self.tty:
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
            self._bar_open = True
        else:
            self.say(line)

    def _line(self, text: str) -> None:
        """A line between two draws of the bar (on a terminal, below it)."""
        self.say(("\n" if self._bar_open else "") + text)
        self._bar_open = False


def client_tools() -> list[str]:
    """Lines saying which initiator tools are here, and what installs the rest."""
    lines = []
    for tool, pkg in CLIENT_TOOLS.items():
        where = shutil.which(tool)
        lines.append(f"  {tool:9} {where}" if where else
                     f"  {tool:9} missing: apt-get install {pkg}")
    return lines


def run_tour(size: str | None, state_dir: str | None) -> int:
    def say(text: str) -> None:
        print(text, flush=True)
    tour = Tour(size or DEFAULT_SIZE, say, sys.stdout.isatty())
    say("liverestore tour: restore a volume from its clone while a host keeps using it.")
    try:
        if state_dir:
            asyncio.run(tour.run(state_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="liverestore-tour-") as tmp:
                asyncio.run(tour.run(os.path.join(tmp, "state")))
    except (TourFailed, ServiceError) as e:
        print(f"\nliverestore demo --tour: FAILED: {e}", file=sys.stderr)
        return 1
    say("\nTry it with a real host: 'liverestore demo' serves the same story over iSCSI.")
    say("Initiator tools on this machine:")
    for line in client_tools():
        say(line)
    return 0
