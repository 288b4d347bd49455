"""One iSCSI TCP connection: PDU framing on an ``asyncio.BufferedProtocol``
(the kernel writes straight into a preallocated receive buffer and PDUs are
cut out of it as memoryviews; big Data-Out payloads land directly in the
command's buffer), digests, corked gather-writes (one ``writev`` per event
loop iteration, payloads never joined), write flow control, the login phase
and the NOP-In keepalive that drops dead peers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from ..logsafe import RateLimitedLog
from . import pdu as P
from .buffers import DIRECT_MIN
from .login import LoginMachine, LoginStep
from .session import ProtocolViolation, Session

if TYPE_CHECKING:  # pragma: no cover
    from .server import IscsiServer

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)     # for what a peer can trigger once per connection

LOGIN_MAX_DATA = 8192        # RFC 7143: login PDUs carry at most 8192 bytes of data
MIN_BUFFER = 64 * 1024
FLUSH_BYTES = 1 << 20        # corked output beyond this is flushed at once by drain()
IOV_MAX = 1024
WRITEV = hasattr(os, "writev") and os.environ.get("LIVERESTORE_ISCSI_NO_WRITEV") != "1"
MAX_WRITE_BACKLOG = 1 << 30    # unsent bytes beyond this: the peer is not reading, drop it
# Unsent output beyond this: stop reading the peer's requests until it has
# read its answers, so a client that never reads cannot make us produce more.
INPUT_PAUSE_BYTES = 256 * 1024
# Reads a wake-up may add while a bulk transfer is under way (_pull): about
# 1 MiB of 256 KiB Data-Out PDUs, so one busy peer cannot starve the loop.
PULL_READS = 8
BHS_LEN, DIGEST_LEN = P.BHS_LEN, P.DIGEST_LEN     # (read per PDU)


class _Direct:
    __slots__ = ("dest", "have", "dlen", "bhs", "tail", "lane_itt")

    def __init__(self, dest: memoryview, have: int, dlen: int, bhs: bytes, tail: int,
                 lane_itt: int | None = None) -> None:
        self.dest = dest
        self.have = have
        self.dlen = dlen
        self.bhs = bhs
        self.tail = tail
        # the immediate data of a write the native lane took (its command
        # already consumed): the lane is told when it is in
        self.lane_itt = lane_itt


class IscsiConnection(asyncio.BufferedProtocol):
    def __init__(self, server: "IscsiServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.local: tuple = ()
        self.buf = bytearray(MIN_BUFFER)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.max_recv = LOGIN_MAX_DATA
        self.header_digest = False
        self.data_digest = False
        self.statsn = 0
        self.login: LoginMachine | None = None
        self.session: Session | None = None
        self.closing = False
        self.closed_event = asyncio.Event()
        self.write_paused = False      # the transport asked us to stop writing
        self._reading_paused = False
        self._out_stuck_since: float | None = None   # output backlog that has not shrunk since
        self._out_backlog = 0
        self._drain_waiters: list[asyncio.Future] = []
        self._wbuf: list = []
        self._fd = -1                # socket fd for gather writes (plain selector transports only)
        self._direct: _Direct | None = None
        self._wbytes = 0
        self._flush_scheduled = False     # output corked: a flush is due
        self._receiving = False           # in _parse_guarded, which flushes at its end
        self._pulls = 0                   # reads _pull may still do in this wake-up
        self._bulk = False                # this wake-up placed a big payload (_pull)
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.t_start = loop.time()
        self.last_rx = self.t_start
        self.nop_ttt: int | None = None
        self.nop_sent = 0.0
        self._nop_counter = 0
        self._keepalive: asyncio.Task | None = None
        self.pdus_in = 0
        self.pdus_out = 0
        self.direct_pdus = 0         # Data-Out payloads received in place
        self.pulled_reads = 0        # reads _pull did without a turn of the loop

    # -- asyncio protocol ----------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if (WRITEV and isinstance(transport, asyncio.Transport)
                    and type(transport).__name__ == "_SelectorSocketTransport"):
                self._fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname") or ()
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.login = LoginMachine(self.server, self.peer)
        if not self.server._connection_made(self):
            self.closing = True
            transport.abort()
            return
        self._keepalive = self.loop.create_task(self._keepalive_loop())
        log.debug("connection from %s", self.peer)

    def get_buffer(self, sizehint: int):
        d = self._direct
        if d is not None and d.have < d.dlen:
            return d.dest[d.have:]           # the kernel writes straight into the command buffer
        if self.end >= len(self.buf):
            self._compact()
        # at most MIN_BUFFER per read, even into a grown buffer: a big payload
        # behind the headers read is received in place (_start_direct), not
        # here and copied
        return self.mv[self.end:self.end + MIN_BUFFER]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = self.loop.time()
        self.nop_ttt = None
        self._pulls = PULL_READS if self._fd >= 0 else 0
        self._bulk = False
        d = self._direct
        if d is not None and d.have < d.dlen:
            d.have += nbytes
            if d.have < d.dlen:
                return
        else:
            self.end += nbytes
        self._parse_guarded()

    def _parse_guarded(self) -> None:
        """Parse what is buffered; a protocol violation or a bug ends this
        connection only, never the server. The answers of the commands it
        completes go out at the end, with one write: not on the next turn
        of the event loop, which would take one more turn per batch."""
        self._receiving = True
        try:
            self._parse()
        except ProtocolViolation as e:
            self.protocol_error(str(e))
        except Exception:
            log.exception("connection %s: internal error while handling a PDU", self.peer)
            self.abort("internal error")
        finally:
            self._receiving = False
        if self._flush_scheduled:
            self.flush()

    def eof_received(self):
        log.debug("connection %s: EOF", self.peer)
        return False

    def connection_lost(self, exc) -> None:
        self.closing = True
        if exc is not None:
            ratelog.info("lost", "connection %s lost: %s", self.peer, exc)
        if self._keepalive is not None:
            self._keepalive.cancel()
        for f in self._drain_waiters:
            if not f.done():
                f.set_result(None)
        self._drain_waiters.clear()
        if self.session is not None:
            self.session.close()
        self.server._connection_lost(self)
        self.closed_event.set()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._out_stuck_since is None:
            self._out_stuck_since = self.loop.time()
            self._out_backlog = self.transport.get_write_buffer_size() if self.transport else 0

    def resume_writing(self) -> None:
        self.write_paused = False
        self._out_stuck_since = None
        for f in self._drain_waiters:
            if not f.done():
                f.set_result(None)
        self._drain_waiters.clear()
        if self._reading_paused and not self.closing:
            self._reading_paused = False
            self.transport.resume_reading()
            self.loop.call_soon(self._resume_parse)

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_parse(self) -> None:
        """Handle what arrived before reading was paused."""
        if self.closing or self._reading_paused or self.end == self.start:
            return
        self._parse_guarded()

    def behind(self) -> bool:
        """Is the peer behind in reading our output (so drain() would
        wait)? A big corked backlog is handed to the transport first."""
        if self._wbytes >= FLUSH_BYTES:
            self.flush()          # let the transport see the backlog (pause_writing)
        return self.write_paused and not self.closing

    async def drain(self) -> None:
        if self.behind():
            f = self.loop.create_future()
            self._drain_waiters.append(f)
            await f

    # -- framing -------------------------------------------------------------------
    def _compact(self) -> None:
        avail = self.end - self.start
        if self.start:
            if avail:
                tail = bytes(self.mv[self.start:self.end])
                self.buf[:avail] = tail
            self.start = 0
            self.end = avail

    def _ensure_capacity(self, total: int) -> None:
        if total > len(self.buf):
            size = max(total, len(self.buf) * 2)
            nb = bytearray(size)
            avail = self.end - self.start
            nb[:avail] = self.mv[self.start:self.end]
            self.buf = nb
            self.mv = memoryview(nb)
            self.start, self.end = 0, avail
        elif self.start + total > len(self.buf):
            self._compact()

    def _parse(self) -> None:
        buf = self.buf
        mv = self.mv
        # what login settles, read once per call (refreshed after a login PDU)
        hd, dd, max_recv = self.header_digest, self.data_digest, self.max_recv
        hd_len = DIGEST_LEN if hd else 0
        Pdu = P.Pdu
        session = self.session
        while not self.closing and not self._reading_paused:
            if self._direct is not None:
                if not self._finish_direct():
                    break
                continue
            s = self.start
            avail = self.end - s
            lane = session.lane if session is not None else None
            if (lane is not None and avail >= BHS_LEN and buf[s] == P.OP_SCSI_CMD
                    and lane.native.published and not session.logging_out):
                if self.write_paused:
                    # the peer is behind reading what the lane sent: a READ
                    # left to Python now would only wait for drain() in _run,
                    # up to the window's depth of them, and a peer that
                    # ignores MaxCmdSN then loses commands; take nothing
                    # from it until it has read (resume_writing)
                    self._pause_reading()
                    break
                if self._lane_scan(session, lane.native, s):
                    continue
            if avail < BHS_LEN:
                # just the header: a big payload behind it is then read
                # straight into its buffer, none of it through this one
                if self._bulk and self._pull_header(BHS_LEN - avail):
                    continue
                break
            ahs_len = buf[s + 4] * 4
            dlen = (buf[s + 5] << 16) | (buf[s + 6] << 8) | buf[s + 7]
            hlen = BHS_LEN + ahs_len + hd_len
            if dlen > max_recv:
                self.protocol_error(f"data segment of {dlen} bytes > MaxRecvDataSegmentLength "
                                    f"{max_recv}", bytes(mv[s:s + BHS_LEN]))
                return
            dtotal = dlen + ((-dlen) & 3) + (DIGEST_LEN if dd and dlen else 0)
            total = hlen + dtotal
            if avail < total:
                if (dlen >= DIRECT_MIN and avail >= hlen and avail - hlen < dlen and not ahs_len
                        and self.session is not None
                        and self._start_direct(s, hlen, dlen, avail)):
                    continue
                self._ensure_capacity(total)
                if self._bulk and self._pull_header():
                    buf, mv = self.buf, self.mv        # (_ensure_capacity may have grown it)
                    continue
                break
            if hd:
                hend = s + BHS_LEN + ahs_len
                if P.digest_bytes(mv[s:hend]) != buf[hend:hend + DIGEST_LEN]:
                    ratelog.warning("digest", "connection %s: header digest error, dropping connection",
                                    self.peer)
                    self.abort("header digest error")
                    return
            bhs = bytes(mv[s:s + BHS_LEN])
            ahs = bytes(mv[s + BHS_LEN:s + BHS_LEN + ahs_len]) if ahs_len else b""
            d0 = s + hlen
            data = mv[d0:d0 + dlen] if dlen else b""
            if dd and dlen:
                pend = d0 + dlen + ((-dlen) & 3)
                if P.digest_bytes(mv[d0:pend]) != buf[pend:pend + DIGEST_LEN]:
                    self.start = s + total
                    ratelog.warning("digest", "connection %s: data digest error", self.peer)
                    if self.session is not None:
                        self.session.reject(bhs, P.REJECT_DATA_DIGEST)
                    # ERL 0 cannot recover the lost data: end the connection
                    self.close("data digest error")
                    return
            self.start = s + total
            self.pdus_in += 1
            try:
                if session is not None:
                    session.handle(Pdu(bhs, ahs, data))
                else:
                    self._login_pdu(Pdu(bhs, ahs, data))
                    session = self.session
                    hd, dd, max_recv = self.header_digest, self.data_digest, self.max_recv
                    hd_len = DIGEST_LEN if hd else 0
            except ProtocolViolation as e:
                self.protocol_error(str(e), bhs)     # Reject with the offending header, then close
                return
        if self.start == self.end:
            self.start = self.end = 0
            if len(self.buf) > MIN_BUFFER:
                # grown for one big PDU (a NOP or text payload, Data-Out of
                # no command): idle connections keep a small buffer
                self.buf = bytearray(MIN_BUFFER)
                self.mv = memoryview(self.buf)

    def _lane_scan(self, session: Session, native, s: int) -> bool:
        """Let the native lane answer the plain READs (and start the plain
        RBD writes) at the head of the buffer (target/iscsi/lane.py); True
        if it took any."""
        w = session.window
        start, nbytes, n, started, bytes_in, r2ts, placing = native.scan(
            self.buf, s, self.end, session.tasks, self._wbuf, self.statsn, w.exp_cmdsn,
            w.max_cmdsn, w.depth - w.inflight, bool(w.pending_count()), session.single_data_in,
            max(0, FLUSH_BYTES - self._wbytes))
        if not n and not started:
            return False
        self.start = start
        self.statsn = native.statsn
        w.exp_cmdsn = native.exp_cmdsn
        w.inflight += started           # RBD reads and writes: answered by SessionLane._complete
        self.pdus_in += started + n
        session.commands += started + n
        session.bytes_in += bytes_in
        session.bytes_out += nbytes - (n + r2ts) * BHS_LEN
        self.queued(n + r2ts, nbytes)
        if placing is not None:
            # the rest of the last command's immediate data goes straight
            # into the lane's request (all that was buffered was its)
            itt, dest = placing
            self._direct = _Direct(dest, 0, len(dest), b"", 0, itt)
            self.start = self.end = 0
        return True

    def queued(self, pdus: int, nbytes: int) -> None:
        """``pdus`` PDUs of ``nbytes`` appended to the corked output by the
        native lane: counted, and flushed at the end of this receive (or on
        the loop's next turn)."""
        self._wbytes += nbytes
        self.pdus_out += pdus
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if not self._receiving:
                self.loop.call_soon(self.flush)

    # -- direct placement of large payloads -----------------------------------------
    # Once the header of a big Data-Out or write command is in, the rest of
    # its payload is read by the kernel straight into the write's buffer
    # (get_buffer hands out that slice), so it is copied in user space at
    # most for the part that came with the header. The PDU is validated as
    # usual when complete; on any doubt the normal path runs.
    def _start_direct(self, s: int, hlen: int, dlen: int, avail: int) -> bool:
        mv = self.mv
        if self.header_digest:
            hend = s + P.BHS_LEN
            if P.digest_bytes(mv[s:hend]) != self.buf[hend:hend + P.DIGEST_LEN]:
                return False               # the normal path reports it once the PDU is in
        bhs = bytes(mv[s:s + P.BHS_LEN])
        dest = self.session.payload_destination(bhs, dlen)
        if dest is None:
            return False
        have = avail - hlen
        d0 = s + hlen
        if have:
            dest[:have] = mv[d0:d0 + have]
        tail = ((-dlen) & 3) + (P.DIGEST_LEN if self.data_digest else 0)
        self._direct = _Direct(dest, have, dlen, bhs, tail)
        self.start = self.end = 0
        return True

    def _finish_direct(self) -> bool:
        d = self._direct
        if d.have < d.dlen and not self._pull(d.dest[d.have:], d):
            return False
        if self.end - self.start < d.tail and not (self._bulk and self._pull_header()):
            return False
        s = self.start
        self.start = s + d.tail
        self._direct = None
        if d.lane_itt is not None:
            self.direct_pdus += 1
            self._bulk = True
            self.session.lane.placed(d.lane_itt)
            return True
        if self.data_digest:
            pad = (-d.dlen) & 3
            want = P.digest_bytes(d.dest, self.mv[s:s + pad])
            if want != self.buf[s + pad:s + pad + P.DIGEST_LEN]:
                ratelog.warning("digest", "connection %s: data digest error", self.peer)
                self.session.reject(d.bhs, P.REJECT_DATA_DIGEST)
                self.close("data digest error")
                return False
        self.pdus_in += 1
        self.direct_pdus += 1
        self._bulk = True
        pdu = P.Pdu(d.bhs, b"", d.dest)
        try:
            self.session.handle(pdu, placed=True)
        except ProtocolViolation as e:
            self.protocol_error(str(e), d.bhs)
            return False
        return True

    # A bulk writer is usually ahead of us: when a wake-up's read leaves a
    # big payload incomplete, the rest is mostly in the socket already.
    # Reading on at once instead of going back to the loop saves a poll and
    # the selector's Python per read (two loop turns per 256 KiB Data-Out
    # before: the header's read, then the payload's); after a placed
    # payload the next header is read on too. A read that finds nothing
    # ends the pulling for this wake-up; errors and EOF are left for the
    # transport's next read to see and report (they persist on the socket).
    def _pull(self, dest: memoryview, d: _Direct | None) -> bool:
        """Read into ``dest`` (the rest of ``d``'s payload, or free space of
        the receive buffer); True if anything came."""
        if self._pulls <= 0 or self.closing or self._reading_paused:
            return False
        self._pulls -= 1
        try:
            n = os.readv(self._fd, (dest,))
        except OSError:                 # BlockingIOError: nothing there yet
            n = 0
        if n <= 0:
            self._pulls = 0
            return False
        self.pulled_reads += 1
        if d is None:
            self.end += n
            return True
        d.have += n
        return d.have >= d.dlen or self._pull(d.dest[d.have:], d)

    def _pull_header(self, n: int = MIN_BUFFER) -> bool:
        """Read on, up to ``n`` bytes, into the receive buffer after a
        placed payload."""
        if self.end + n > len(self.buf):
            self._compact()
        return self._pull(self.mv[self.end:self.end + n], None)

    def _login_pdu(self, pdu: P.Pdu) -> None:
        """A PDU before the session exists: the login phase's."""
        if self.login is None:
            return                     # a throttled login failure is being held back
        step = self.login.process(pdu)
        if step.outcome == "fail":
            self.server.login_rejected(self.login, step.reason)
        if step.outcome == "fail" and step.delay > 0:
            # answer the failed guess later, reading nothing meanwhile; the
            # event loop and every other connection carry on
            self.login = None
            self.transport.pause_reading()
            self.loop.call_later(step.delay, self._fail_login, step)
            return
        self.send(step.bhs, step.data)
        if step.outcome == "fail":
            self.close("login failed")
        elif step.outcome == "success":
            result = self.login.result
            self.login = None
            self.statsn = result.statsn
            try:
                self.session = self.server._create_session(self, result)
            except Exception:
                log.exception("cannot start session")
                self.abort("session setup failed")
                return
            prm = result.params
            self.header_digest = prm.header_digest
            self.data_digest = prm.data_digest
            self.max_recv = prm.target_mrdsl
            # the receive buffer stays small (idle sessions cost ~64 KiB) and
            # grows only when a PDU needs it; bulk Data-Out bypasses it anyway

    def _fail_login(self, step: LoginStep) -> None:
        if not self.closing:
            self.send(step.bhs, step.data)
            self.close("login failed")

    # -- sending -------------------------------------------------------------------
    def next_statsn(self) -> int:
        s = self.statsn
        self.statsn = (s + 1) & P.ALL_ONES
        return s

    # Outgoing PDUs are corked: queued and written with one writelines (one
    # send syscall) at the end of the current event-loop iteration, so the
    # responses of commands that complete together share a system call.
    def send(self, bhs: bytearray, data=b"") -> None:
        if self.closing or self.transport is None:
            return
        bufs = P.encode(bhs, data, header_digest=self.header_digest, data_digest=self.data_digest)
        self.write_buffers(bufs, P.wire_len(bufs))

    def write_buffers(self, buffers: list, nbytes: int) -> None:
        """Queue one PDU's buffers (encoded, digests included); ``nbytes``
        is exactly their length in bytes (P.wire_len): flush() takes a
        writev that wrote that many as having written all of them."""
        if self.closing or self.transport is None:
            return
        self.pdus_out += 1
        self._wbuf += buffers
        self._wbytes += nbytes
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if not self._receiving:          # (else _parse_guarded flushes at its end)
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._wbuf:
            buf, self._wbuf = self._wbuf, []
            nbytes, self._wbytes = self._wbytes, 0
            t = self.transport
            if t is not None and not t.is_closing():
                if self._fd >= 0 and t.get_write_buffer_size() == 0:
                    buf = self._writev(buf, nbytes)
                    if not buf:
                        return         # all written: the transport's queue is still empty
                t.writelines(buf)
                if t.get_write_buffer_size() > INPUT_PAUSE_BYTES:
                    self._pause_reading()
                if t.get_write_buffer_size() > MAX_WRITE_BACKLOG:
                    # a peer that sends but never reads (commands wait in drain(),
                    # but NOP/Reject answers would pile up without bound)
                    log.warning("connection %s: peer is not reading (%d bytes queued), dropping",
                                self.peer, t.get_write_buffer_size())
                    self.abort("write backlog")

    def _writev(self, buf: list, nbytes: int) -> list:
        """Gather-write straight from the PDU buffers (headers and memoryview
        payloads) with one writev: no join copy. Only called while the
        transport has nothing queued, so ordering is kept; what the socket
        does not take is returned for the transport to queue. ``nbytes``:
        the buffers' exact total (the usual outcome, all of it sent, is
        known without walking them)."""
        try:
            sent = os.writev(self._fd, buf if len(buf) <= IOV_MAX else buf[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return buf
        except OSError:
            return buf             # let the transport see (and report) the error
        if sent == nbytes:
            return []
        if sent == 0:
            return buf
        for i, b in enumerate(buf):
            n = len(b) if not isinstance(b, memoryview) else b.nbytes
            if sent < n:
                return [memoryview(b)[sent:]] + buf[i + 1:]
            sent -= n
        return []

    # -- teardown --------------------------------------------------------------------
    def protocol_error(self, why: str, bhs: bytes | None = None) -> None:
        ratelog.warning("protocol-error", "connection %s: protocol error: %s", self.peer, why)
        if bhs is not None and self.session is not None:
            self.session.reject(bhs, P.REJECT_PROTOCOL_ERROR)
        self.close(why)

    def close(self, why: str = "") -> None:
        """Flush what is queued, then close."""
        if self.closing:
            return
        log.debug("connection %s: closing (%s)", self.peer, why)
        self.flush()
        self.closing = True
        if self.session is not None:
            self.session.close()
        if self.transport is not None:
            self.transport.close()
            if self.transport.get_write_buffer_size() and self.server.output_timeout > 0:
                # a closing transport waits for its output to be read: bound
                # that wait for a peer that reads nothing
                self.loop.call_later(self.server.output_timeout, self._abort_unless_gone)

    def _abort_unless_gone(self) -> None:
        if not self.closed_event.is_set() and self.transport is not None:
            self.transport.abort()

    def abort(self, why: str = "") -> None:
        if self.transport is None:
            return
        ratelog.info("abort", "connection %s: aborting (%s)", self.peer, why)
        self.closing = True
        if self.session is not None:
            self.session.close()
        self.transport.abort()

    # -- keepalive -----------------------------------------------------------------
    def _output_stuck(self, now: float) -> bool:
        """Drop a peer that has not taken any of our output for
        ``output_timeout`` seconds (it holds its answers' memory meanwhile)."""
        since = self._out_stuck_since
        if since is None or self.transport is None or self.server.output_timeout <= 0:
            return False
        backlog = self.transport.get_write_buffer_size()
        if backlog < self._out_backlog:          # it reads, slowly: still alive
            self._out_backlog = backlog
            self._out_stuck_since = now
            return False
        if now - since < self.server.output_timeout:
            return False
        ratelog.warning("output-stuck",
                        "connection %s: peer has read none of %d bytes of output for %.0fs, dropping",
                        self.peer, backlog, now - since)
        self.abort("output stuck")
        return True

    async def _keepalive_loop(self) -> None:
        srv = self.server
        periods = [t for t in (srv.nop_interval, srv.nop_timeout, srv.login_timeout,
                               srv.output_timeout) if t > 0]
        tick = max(0.05, min(periods, default=1.0) / 4)
        try:
            while not self.closing:
                await asyncio.sleep(tick)
                now = self.loop.time()
                if self._output_stuck(now):
                    return
                srv.memory.relieve()
                if self.session is None:
                    if srv.login_timeout > 0 and now - self.t_start > srv.login_timeout:
                        ratelog.info("login-timeout", "connection %s: login timed out", self.peer)
                        self.abort("login timeout")
                        return
                    continue
                if self.nop_ttt is not None:
                    if srv.nop_timeout > 0 and now - self.nop_sent > srv.nop_timeout:
                        log.warning("connection %s: no answer to NOP-In for %.1fs, dropping",
                                    self.peer, now - self.nop_sent)
                        self.abort("NOP-In timeout")
                        return
                elif now - self.last_rx >= srv.nop_interval and srv.nop_interval > 0:
                    self._nop_counter = (self._nop_counter + 1) & 0x7FFFFFFF or 1
                    ttt = self._nop_counter | 0x40000000
                    s = self.session
                    bhs = P.build_bhs(P.OP_NOP_IN, P.FLAG_FINAL, lun=0, itt=P.ALL_ONES,
                                      fields={20: ttt, 24: self.statsn, 28: s.window.exp_cmdsn,
                                              32: s.window.max_cmdsn})
                    self.send(bhs)
                    self.nop_ttt = ttt
                    self.nop_sent = now
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection %s: keepalive failed", self.peer)
            self.abort("keepalive failure")
