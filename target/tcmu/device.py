"""One TCMU device (one uio node = one LU) served on an asyncio loop.

The uio fd is the doorbell both ways: the kernel's "interrupt" makes a
4-byte read return (we wire the fd into the loop with ``add_reader``: no
thread per command, no polling), and a 4-byte write tells the kernel that
``cmd_tail`` moved. Every CMD entry is submitted to the SCSI layer at
once, with the ring's data area as its buffers (no copy): a command the
SCSI layer answers at once is completed at once; only one that has to wait
becomes an asyncio task (target.eager). Completions are written through
:class:`Ring`.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import os
from typing import Any

from target.scsi.api import CHECK_CONDITION, GOOD, Nexus, ScsiCommand, ScsiResponse, submitter
from target.scsi.commands import returns_data_in

from .. import eager
from . import abi
from .ring import Request, Ring, RingError

log = logging.getLogger(__name__)

TCMU_NEXUS = Nexus(initiator="tcmu", target_port="tcmu", initiator_name="tcmu")

# HARDWARE ERROR / INTERNAL TARGET FAILURE, fixed format
_INTERNAL_FAILURE = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0x00, 0, 0, 0, 0])


def _gather(mv: memoryview, iovs: list[tuple[int, int]]) -> memoryview | bytes | None:
    """A command's Data-Out: a view of its one buffer, or its pieces joined."""
    if len(iovs) == 1:
        b, n = iovs[0]
        return mv[b:b + n]
    return b"".join(mv[b:b + n] for b, n in iovs) if iovs else None


def _notify_bytes() -> bytes:
    return (0).to_bytes(4, "little")


class TcmuDevice:
    """Serves the ring of one uio device with ``target`` (a ScsiTarget).

    ``fd`` and ``buf`` may be given directly (tests pass a socket and an
    anonymous mmap); otherwise ``open()`` opens ``uio_dev`` and maps
    ``map_size`` bytes of map 0. ``reset_ring``: a callable run after the
    mapping is set up and before the first fetch, to make the kernel fail
    (BUSY) whatever a previous handler left on the ring; the ring is then
    empty (head = tail = 0) and the host retries those commands.
    """

    def __init__(self, name: str, target: Any, *, uio_dev: str | None = None,
                 map_size: int = 0, fd: int | None = None, buf: Any = None,
                 lun: int = 0, nexus: Nexus = TCMU_NEXUS,
                 reset_ring: Any = None, ooo: bool | None = None) -> None:
        self.name = name
        self.target = target
        self.uio_dev = uio_dev
        self.map_size = map_size
        self.fd = fd
        self.buf = buf
        self.lun = lun
        self.nexus = nexus
        self._reset_ring = reset_ring
        self._ooo = ooo
        self._own_fd = fd is None
        self.ring: Ring | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._notify_pending = False
        self._batch = False                     # inside _process: it kicks once at the end
        self._closed = False
        self.gone = False
        self.stats = {"commands": 0, "completed": 0, "fast": 0, "notifies": 0, "wakeups": 0,
                      "errors": 0}

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> None:
        """Map the ring and start serving on the running loop."""
        self._loop = asyncio.get_running_loop()
        if self.fd is None:
            self.fd = os.open(self.uio_dev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            os.set_blocking(self.fd, False)
        if self.buf is None:
            self.buf = mmap.mmap(self.fd, self.map_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        if self._reset_ring is not None:
            head, tail = (abi.U32.unpack_from(self.buf, abi.MB_CMD_HEAD)[0],
                          abi.U32.unpack_from(self.buf, abi.MB_CMD_TAIL)[0])
            if head != tail:
                log.warning("%s: ring holds uncompleted entries of an earlier handler "
                            "(cmd_tail %d, cmd_head %d): resetting", self.name, tail, head)
            self._reset_ring()
        self._submit = submitter(self.target)
        self._serve()

    def _serve(self) -> None:
        """Run the ring: fetch on every doorbell, starting with whatever is
        already on it (no interrupt may come for that)."""
        self.ring = Ring(self.buf, ooo=self._ooo)
        self._mv = self.ring.mv
        self._loop.add_reader(self.fd, self._on_doorbell)
        self._process()

    async def close(self, drain: float = 0.0) -> None:
        """Stop serving. No new entries are fetched; commands already running
        get up to ``drain`` seconds to finish and be completed (a graceful
        stop); the rest are cancelled and left on the ring uncompleted (the
        next opener resets the ring, the kernel answers them BUSY)."""
        if self._closed:
            return
        self._stop_fetching()
        self.gone = True                       # no more fetching
        if drain > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=drain)
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._flush_notify()
        self._mv = None
        if self.ring is not None:
            self.stats["out_of_order"] = self.ring.out_of_order
            self._release_ring()
            self.ring = None
        if self._own_fd:
            if isinstance(self.buf, mmap.mmap):
                try:
                    self.buf.close()
                except BufferError:
                    log.warning("%s: ring still referenced; left to the GC", self.name)
            if self.fd is not None:
                os.close(self.fd)
        self.fd = None

    def _stop_fetching(self) -> None:
        if self._loop is not None and self.fd is not None and not self.gone:
            self._loop.remove_reader(self.fd)

    def _release_ring(self) -> None:
        self.ring.mv.release()

    # -- kernel -> us --------------------------------------------------------------
    def _on_doorbell(self) -> None:
        self.stats["wakeups"] += 1
        try:
            got = os.read(self.fd, 4)
            err = None if got else "end of file"
        except (BlockingIOError, InterruptedError):
            err = None
        except OSError as e:
            err = str(e)
        if err is not None:
            # the uio device was unregistered under us (backstore deleted):
            # stop watching the fd, or the loop would spin on it
            log.warning("%s: uio device gone (%s); no longer serving", self.name, err)
            self._loop.remove_reader(self.fd)
            self.gone = True
            return
        self._process()

    def _process(self) -> None:
        if self._closed or self.gone or self.ring is None:
            return
        try:
            reqs = self.ring.fetch()
        except RingError:
            log.exception("%s: ring corrupt; device stops serving", self.name)
            self.stats["errors"] += 1
            self._loop.remove_reader(self.fd)
            return
        for tmr in self.ring.tmr:
            log.info("%s: TMR %d for cmd ids %s", self.name, tmr.tmr_type, tmr.cmd_ids)
        self.ring.tmr.clear()
        self._run_batch(reqs)

    def _run_batch(self, reqs: list[Request]) -> None:
        self.stats["commands"] += len(reqs)
        # One kick for the whole batch, right after it: the commands done at
        # once and the PAD/TMR entries passed (a later loop iteration would
        # cost another epoll_wait per wake-up)
        self._batch = True
        try:
            self._notify()
            for req in reqs:
                self._start(req)
        finally:
            self._batch = False
        self._flush_notify()

    # -- one command ---------------------------------------------------------------
    def _start(self, req: Request) -> None:
        """Submit one entry; complete it now if the SCSI layer answered at
        once, else hand the rest to a task."""
        cdb = req.cdb
        mv = self._mv
        # the ring does not say the direction: the SCSI layer knows it; the
        # buffer is Data-In for Data-In commands and bidi ones, else Data-Out
        data_in_cmd = returns_data_in(cdb)
        iovs = req.iovs
        into = data_out = None
        in_total = 0
        if req.bidi_iovs:                      # Data-Out in iovs, Data-In returned
            data_out = _gather(mv, iovs)
            in_total = sum(n for _, n in req.bidi_iovs)
        elif data_in_cmd:                      # filled in place when it can be
            if len(iovs) == 1:
                b, in_total = iovs[0]
                into = [mv[b:b + in_total]]
            else:
                into = [mv[b:b + n] for b, n in iovs]
                in_total = sum(n for _, n in iovs)
        elif iovs:
            data_out = _gather(mv, iovs)
        cmd = ScsiCommand(cdb, self.lun, self.nexus, data_out, in_total, req.cmd_id, 0, into)
        try:
            rsp = self._submit(cmd)
        except Exception:
            rsp = self._failed(req)
        if rsp.__class__ is ScsiResponse:
            self.stats["fast"] += 1
            self._complete(req, rsp, data_in_cmd, in_total)
            return
        t = eager.start(self._finish(req, rsp, data_in_cmd, in_total), self._loop)
        if t is not None:                      # it waits (I/O in a thread, a lock...)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _failed(self, req: Request) -> ScsiResponse:
        log.exception("%s: cmd %d (cdb %s) failed in the SCSI layer", self.name,
                      req.cmd_id, req.cdb.hex())
        self.stats["errors"] += 1
        return ScsiResponse(CHECK_CONDITION, _INTERNAL_FAILURE)

    async def _finish(self, req: Request, pending: Any, data_in_cmd: bool, in_total: int) -> None:
        try:
            rsp: ScsiResponse = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            rsp = self._failed(req)
        self._complete(req, rsp, data_in_cmd, in_total)

    def _complete(self, req: Request, resp: ScsiResponse, data_in_cmd: bool, in_total: int) -> None:
        if self._closed or self.ring is None:
            return
        read_len = None
        if in_total and not resp.data_in_placed:
            read_len = self._place_data_in(req, resp, data_in_cmd, in_total)
        self.ring.complete(req, resp.status, resp.sense or b"", read_len=read_len)
        self.stats["completed"] += 1
        if not self._notify_pending:
            self._notify()

    def _place_data_in(self, req: Request, resp: ScsiResponse, data_in_cmd: bool,
                       in_total: int) -> int | None:
        """Copy a response's Data-In into the command's buffers; a short one
        is reported (read_len) or its rest zeroed. Returns the read_len."""
        mv = self._mv
        in_iovs = req.in_iovs
        data = resp.data_in
        if data is not None and len(data):
            src = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
            n = min(len(src), in_total)
            pos = 0
            for b, ln in in_iovs:
                k = min(ln, n - pos)
                if k <= 0:
                    break
                mv[b:b + k] = src[pos:pos + k]
                pos += k
        elif data_in_cmd:
            n = 0
        else:
            return None
        if n < in_total and resp.status == GOOD:
            if self.ring.read_len:
                return n
            self._zero_in(in_iovs, n)
        return None

    def _zero_in(self, iovs: list[tuple[int, int]], start: int) -> None:
        """Never hand the host stale bytes of an earlier command."""
        pos = 0
        for b, ln in iovs:
            lo = max(start - pos, 0)
            if lo < ln:
                self._mv[b + lo:b + ln] = bytes(ln - lo)
            pos += ln

    # -- us -> kernel ---------------------------------------------------------------
    def _notify(self) -> None:
        """Ring the kernel once per batch of fetched commands, or once per
        loop iteration for commands that finished after waiting, however
        many completed."""
        if not self._notify_pending:
            self._notify_pending = True
            if not self._batch:
                self._loop.call_soon(self._flush_notify)

    def _flush_notify(self) -> None:
        if not self._notify_pending:
            return
        self._notify_pending = False
        if self.fd is None:
            return
        try:
            os.write(self.fd, _notify_bytes())
            self.stats["notifies"] += 1
        except OSError as e:
            log.error("%s: notifying the kernel failed: %s", self.name, e)
