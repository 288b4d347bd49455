"""Hostile iSCSI clients, reusable by any test that needs an attacker.

Each attack is a coroutine ``attack(arena)`` that keeps a bounded number of
connections busy until ``arena.done`` is set, counting what it did in
``arena.stats``. ``run_attacks`` runs a list of them in a process of its
own (so the attackers' CPU use cannot stall the test's well-behaved
initiator and its timeouts), from one loopback source address each, and
hangs up every socket when the run ends.

Attack clients close with RST (SO_LINGER 0): thousands of short
connections must not pile up TIME_WAIT ports on the source address.
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from target.iscsi import pdu as P
from target.iscsi.cmdsn import sn_lt
from target.iscsi.params import encode_text

from .initiator import TIMEOUT, Initiator, InitiatorError

# What a hostile client expects to happen to it; anything else is a bug in the harness.
EXPECTED = (ConnectionError, OSError, EOFError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            InitiatorError, ValueError)

MiB = 1 << 20
# A thrown-out client comes back after this long: persistent, yet not a
# reconnect storm that would only measure how fast the target logs logins.
RECONNECT_PAUSE = 1.0


# -- sockets from a chosen loopback source ------------------------------------------

async def open_from(source: str, host: str, port: int, *, rcvbuf: int | None = None,
                    timeout: float = TIMEOUT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP stream to host:port whose local address is ``source``; ``rcvbuf``
    shrinks the receive buffer so a client that stops reading pushes back on
    the target after a few KiB instead of the kernel's megabytes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((source, 0))
        s.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (host, port)), timeout)
        return await asyncio.open_connection(sock=s)
    except BaseException:
        s.close()
        raise


def hang_up(writer: asyncio.StreamWriter | None) -> None:
    """Close at once with RST: no TIME_WAIT left on the source address."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class SourcedInitiator(Initiator):
    """The test initiator, connecting from a chosen source address, with a
    per-instance timeout (a well-behaved client under load gets a patient one)."""

    def __init__(self, host: str, port: int, *, source: str = "127.0.0.1",
                 timeout: float = TIMEOUT, rcvbuf: int | None = None, **kw) -> None:
        super().__init__(host, port, **kw)
        self.source, self.timeout, self.rcvbuf = source, timeout, rcvbuf

    async def connect(self) -> None:
        self.reader, self.writer = await open_from(self.source, self.host, self.port,
                                                   rcvbuf=self.rcvbuf, timeout=self.timeout)

    async def recv(self, timeout: float | None = None) -> P.Pdu:
        return await super().recv(self.timeout if timeout is None else timeout)

    async def _get(self, q: asyncio.Queue) -> P.Pdu:
        pdu = await asyncio.wait_for(q.get(), self.timeout)
        if pdu is None:
            raise InitiatorError("connection closed")
        return pdu

    async def _wait_window(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout
        while sn_lt(self.max_cmdsn, self.cmdsn):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise InitiatorError("CmdSN window never opened")
            self._window.clear()
            await asyncio.wait_for(self._window.wait(), left)


# -- the arena: where an attack runs and what it reports -----------------------------

@dataclass
class Arena:
    host: str
    port: int
    iqn: str                       # the target under attack
    lun: int
    source: str                    # loopback address the attack connects from
    done: asyncio.Event = field(default_factory=asyncio.Event)
    brake: asyncio.Event = field(default_factory=asyncio.Event)   # memory attacks stop
    stats: Counter = field(default_factory=Counter)
    writers: set = field(default_factory=set)

    def over(self, *, memory: bool = False) -> bool:
        return self.done.is_set() or (memory and self.brake.is_set())

    async def pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def connect(self, *, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader,
                                                                    asyncio.StreamWriter]:
        r, w = await open_from(self.source, self.host, self.port, rcvbuf=rcvbuf)
        self.writers.add(w)
        self.stats["connections"] += 1
        return r, w

    async def login(self, name: str, *, rcvbuf: int | None = None, reader: bool = False,
                    **kw) -> SourcedInitiator:
        ini = SourcedInitiator(self.host, self.port, source=self.source, rcvbuf=rcvbuf, name=name)
        try:
            await ini.login(self.iqn, start_reader=reader, **kw)
        except BaseException:
            hang_up(ini.writer)
            raise
        self.writers.add(ini.writer)
        self.stats["connections"] += 1
        self.stats["logins"] += 1
        return ini

    def drop(self, writer: asyncio.StreamWriter | None) -> None:
        self.writers.discard(writer)
        hang_up(writer)

    def hang_up_all(self) -> None:
        for w in list(self.writers):
            self.drop(w)


Attack = Callable[[Arena], Awaitable[None]]


async def cancel_all(tasks: set[asyncio.Task], tries: int = 50) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again those still
    running: Python 3.11's wait_for loses a cancel that races its inner
    future finishing (a connect completing as the flood stops), and that
    task then waits in _discard for the target to hang up -- longer than
    the runner's grace, which then cancels the whole attack. Bounded."""
    for _ in range(tries):
        running = [t for t in tasks if not t.done()]
        if not running:
            break
        for t in running:
            t.cancel()
        await asyncio.wait(running, timeout=0.2)
    for t in tasks:             # retrieved, as gather(return_exceptions=True) did
        if t.done() and not t.cancelled():
            t.exception()


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read and throw away whatever the target sends, until EOF."""
    try:
        while await reader.read(1 << 16):
            pass
    except EXPECTED:
        pass


async def _each(n: int, one: Callable[[int], Awaitable[None]], arena: Arena, *,
                memory: bool) -> None:
    """Run ``one(i)`` for i < n concurrently, each again and again until the
    run is over: a client the target throws out comes back."""
    async def again(i: int) -> None:
        while not arena.over(memory=memory):
            try:
                await one(i)
            except EXPECTED as e:
                arena.stats[f"error {type(e).__name__}"] += 1
            await arena.pause(RECONNECT_PAUSE)
    await asyncio.gather(*(again(i) for i in range(n)))


def _cdb16(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, lba, blocks, 0, 0)


def _scsi_cmd(ini: Initiator, arena: Arena, cdb: bytes, *, edtl: int, read: bool,
              immediate: bool) -> bytearray:
    flags = P.FLAG_FINAL | (P.FLAG_READ if read else P.FLAG_WRITE) | 1
    bhs = P.build_bhs(P.OP_SCSI_CMD, flags, immediate=immediate, lun=arena.lun, itt=ini.new_itt(),
                      fields={20: edtl, 24: ini.cmdsn, 28: ini.exp_statsn}, raw={32: cdb})
    if not immediate:
        ini.cmdsn = (ini.cmdsn + 1) & P.ALL_ONES
    return bhs


def _in_window(ini: Initiator) -> bool:
    return not sn_lt(ini.max_cmdsn, ini.cmdsn)


# -- a PDU fuzzer ----------------------------------------------------------------------

def valid_pdus(iqn: str, cmdsn: int = 2) -> list[bytes]:
    """Well-formed initiator PDUs of every kind: the corpus mutations start from."""
    read = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_READ | 1, lun=0, itt=0x10,
                       fields={20: 4096, 24: cmdsn}, raw={32: struct.pack(">BBQIBB", 0x88, 0, 0, 8, 0, 0)})
    write = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_FINAL | P.FLAG_WRITE | 1, lun=0, itt=0x11,
                        fields={20: 2048, 24: cmdsn + 1}, raw={32: struct.pack(">BBQIBB", 0x8A, 0, 0, 4, 0, 0)})
    dout = P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL, lun=0, itt=0x11, fields={20: P.ALL_ONES, 40: 1024})
    nop = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, itt=0x12, fields={20: P.ALL_ONES})
    tmf = P.build_bhs(P.OP_TMF_REQ, P.FLAG_FINAL | 1, immediate=True, itt=0x13, fields={20: 0x10})
    text = P.build_bhs(P.OP_TEXT_REQ, P.FLAG_FINAL, immediate=True, itt=0x14, fields={20: P.ALL_ONES})
    logout = P.build_bhs(P.OP_LOGOUT_REQ, P.FLAG_FINAL, itt=0x15, fields={24: cmdsn + 2})
    login = P.build_bhs(P.OP_LOGIN_REQ, 0x87, immediate=True, itt=0x16, raw={8: bytes(6)})
    # a big write whose unsolicited Data-Out is large enough to be received in place
    bigw = P.build_bhs(P.OP_SCSI_CMD, P.FLAG_WRITE | 1, lun=0, itt=0x21,
                       fields={20: 65536, 24: cmdsn + 3}, raw={32: struct.pack(">BBQIBB", 0x8A, 0, 64, 128, 0, 0)})
    bigd = P.build_bhs(P.OP_DATA_OUT, 0, lun=0, itt=0x21, fields={20: P.ALL_ONES, 36: 0, 40: 0})
    return [
        P.encode_bytes(read), P.encode_bytes(write, b"w" * 1024), P.encode_bytes(dout, b"d" * 1024),
        P.encode_bytes(nop, b"ping"), P.encode_bytes(tmf),
        P.encode_bytes(text, encode_text([("SendTargets", "All")])), P.encode_bytes(logout),
        P.encode_bytes(login, encode_text([("InitiatorName", "iqn.2025-01.org.x:y"),
                                           ("TargetName", iqn)])),
        P.encode_bytes(bigw), P.encode_bytes(bigd, b"B" * 32768),
    ]


def mutate(raw: bytes, muts) -> bytes:
    """Apply (kind, a, v) mutations: flip/set a byte, truncate, rewrite the
    DataSegmentLength or the TotalAHSLength."""
    b = bytearray(raw)
    for kind, a, v in muts:
        if not b:
            break
        if kind == "flip":
            b[a % len(b)] ^= v
        elif kind == "set":
            if a < len(b):
                b[a] = v
        elif kind == "truncate":
            del b[a % (len(b) + 1):]
        elif kind == "dlen" and len(b) >= 8:
            b[5:8] = a.to_bytes(3, "big")
        elif kind == "ahs" and len(b) >= 5:
            b[4] = a
    return bytes(b)


LOGIN_KEYS = ["InitiatorName", "TargetName", "SessionType", "AuthMethod", "CHAP_A", "CHAP_N",
              "CHAP_R", "CHAP_I", "CHAP_C", "HeaderDigest", "DataDigest",
              "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "InitialR2T",
              "ImmediateData", "MaxConnections", "ErrorRecoveryLevel", "SendTargets",
              "TargetAlias", "X-foo", "Bogus"]
LOGIN_VALUES = ["None", "CHAP", "CRC32C", "Yes", "No", "Normal", "Discovery", "0", "512",
                "16777215", "99999999999", "0x10", "5", "0xzz", "", "Reject"]


def random_mutations(rnd: random.Random) -> list[tuple[str, int, int]]:
    kinds = [("flip", 2000, 255), ("set", 47, 255), ("truncate", 2000, 0),
             ("dlen", (1 << 24) - 1, 0), ("ahs", 255, 0)]
    out = []
    for _ in range(rnd.randrange(0, 5)):
        kind, amax, vmax = rnd.choice(kinds)
        out.append((kind, rnd.randrange(amax + 1), rnd.randrange(1, vmax + 1) if vmax else 0))
    return out


def random_login_text(rnd: random.Random, iqn: str) -> bytes:
    """Well-framed Login Requests with random stages, flags and key=value text
    (sometimes a single enormous value)."""
    payload = b""
    for _ in range(rnd.randrange(1, 5)):
        csg, nsg = rnd.randrange(4), rnd.randrange(4)
        flags = (0x80 if rnd.random() < 0.5 else 0) | (0x40 if rnd.random() < 0.3 else 0) | (csg << 2) | nsg
        pairs = []
        for _ in range(rnd.randrange(0, 9)):
            key = rnd.choice(LOGIN_KEYS)
            r = rnd.random()
            if r < 0.6:
                value = rnd.choice(LOGIN_VALUES + [iqn])
            elif r < 0.9:
                value = "".join(chr(rnd.randrange(1, 0x2FF)) for _ in range(rnd.randrange(30)))
            else:
                value = "x" * rnd.randrange(1000, 9000)
            pairs.append((key, value.replace("\0", "")))
        bhs = P.build_bhs(P.OP_LOGIN_REQ, flags, immediate=True, itt=7,
                          raw={8: bytes.fromhex("400001370001")}, fields={24: 1})
        try:
            payload += P.encode_bytes(bhs, encode_text(pairs))
        except ValueError:       # a pair the encoder itself refuses: send raw text instead
            payload += P.encode_bytes(bhs, "\0".join(f"{k}={v}" for k, v in pairs).encode() + b"\0")
    return payload


def _bad_pdus(rnd: random.Random, ini: Initiator, arena: Arena) -> bytes:
    """One malformed PDU for a logged-in connection (digests as negotiated)."""
    hd, dd = ini.hd, ini.dd
    kind = rnd.randrange(8)
    if kind == 0:                           # an opcode no initiator may send
        op = rnd.choice([0x07, 0x08, 0x0F, 0x11, 0x1C, 0x1F, 0x20, 0x21, 0x3F])
        bhs = P.build_bhs(op, P.FLAG_FINAL, immediate=True, itt=ini.new_itt(), fields={24: ini.cmdsn})
        return b"".join(bytes(b) for b in P.encode(bhs, b"", header_digest=hd, data_digest=dd))
    if kind == 1:                           # an AHS that does not parse
        bhs = _scsi_cmd(ini, arena, _cdb16(0x88, 0, 8), edtl=4096, read=True, immediate=True)
        raw = bytearray(P.encode_bytes(bhs))
        raw[4] = rnd.randrange(1, 256)       # TotalAHSLength with no AHS behind it
        return bytes(raw) + os.urandom(rnd.randrange(0, 64))
    if kind == 2:                           # a digest (without digests: the data) that does not match
        bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, itt=ini.new_itt(),
                          fields={20: P.ALL_ONES, 24: ini.cmdsn})
        raw = bytearray(b"".join(bytes(b) for b in P.encode(bhs, b"digest", header_digest=hd,
                                                               data_digest=dd)))
        raw[-1] ^= 0xFF
        return bytes(raw)
    if kind == 3:                           # DataSegmentLength near 16 MiB, little data behind it
        bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, itt=ini.new_itt(),
                          fields={20: P.ALL_ONES, 24: ini.cmdsn})
        raw = bytearray(P.encode_bytes(bhs))
        raw[5:8] = rnd.randrange(1 << 20, 1 << 24).to_bytes(3, "big")
        return bytes(raw) + os.urandom(rnd.randrange(0, 65536))
    if kind == 4:                           # a truncated header
        return os.urandom(rnd.randrange(1, P.BHS_LEN))
    if kind == 5:                           # CmdSNs far outside the window, many of them
        out = bytearray()
        for _ in range(rnd.randrange(50, 500)):
            cmdsn = (ini.cmdsn + rnd.randrange(1000, 1 << 31)) & P.ALL_ONES
            bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, itt=ini.new_itt(),
                              fields={20: P.ALL_ONES, 24: cmdsn})
            out += b"".join(bytes(b) for b in P.encode(bhs, b"", header_digest=hd, data_digest=dd))
        return bytes(out)
    if kind == 6:                           # random bytes
        return os.urandom(rnd.randrange(1, 600))
    corpus = valid_pdus(arena.iqn, ini.cmdsn)   # mutated valid PDUs
    return b"".join(mutate(rnd.choice(corpus), random_mutations(rnd)) for _ in range(rnd.randrange(1, 6)))


async def _listen_briefly(reader: asyncio.StreamReader, seconds: float) -> None:
    """Read what the target answers for a moment (bounded), then let go."""
    end = time.monotonic() + seconds
    try:
        while (left := end - time.monotonic()) > 0:
            if not await asyncio.wait_for(reader.read(1 << 16), left):
                return
    except EXPECTED:
        pass


def fuzzer(workers: int = 8, rate: float = 40.0) -> Attack:
    """``workers`` connections at a time (at most ``rate`` new ones a second),
    each sending malformed, random or mutated PDUs before login (random bytes, login key=value fuzz) or after
    one (bad opcodes, bad AHS, bad digests, huge DataSegmentLength, truncated
    headers, out-of-window CmdSN floods, mutated valid PDUs)."""
    async def attack(arena: Arena) -> None:
        async def worker(n: int) -> None:
            rnd = random.Random(os.urandom(8))
            while not arena.over():
                writer = None
                try:
                    scenario = rnd.randrange(4)
                    if scenario < 2:
                        reader, writer = await arena.connect()
                        payload = (random_login_text(rnd, arena.iqn) if scenario == 0 else
                                   rnd.choice([os.urandom(rnd.randrange(0, 400)),
                                               mutate(rnd.choice(valid_pdus(arena.iqn)),
                                                      random_mutations(rnd))]))
                        arena.stats["fuzz before login"] += 1
                    else:
                        digest = ["None", "CRC32C"]
                        ini = await arena.login(f"iqn.2026-11.io.hostile:fuzz{n}",
                                                header_digest=rnd.choice(digest),
                                                data_digest=rnd.choice(digest))
                        reader, writer = ini.reader, ini.writer
                        payload = b"".join(_bad_pdus(rnd, ini, arena) for _ in range(rnd.randrange(1, 4)))
                        arena.stats["fuzz after login"] += 1
                    writer.write(payload)
                    arena.stats["fuzz bytes"] += len(payload)
                    await asyncio.wait_for(writer.drain(), 2)
                    await _listen_briefly(reader, rnd.choice([0.02, 0.1, 0.5]))
                except EXPECTED as e:
                    arena.stats[f"fuzz {type(e).__name__}"] += 1
                finally:
                    arena.drop(writer)
                await arena.pause(workers / rate)
        await _each(workers, worker, arena, memory=False)
    return attack


# -- a connection flood ----------------------------------------------------------------

def connection_flood(count: int = 2100, rate: float = 400.0, half_login: float = 0.5) -> Attack:
    """Hold up to ``count`` connections open (reopening those the target
    closes, at most ``rate`` per second): some idle, some that sent a first
    Login Request and then never another byte."""
    async def attack(arena: Arena) -> None:
        rnd = random.Random(os.urandom(8))
        live: set[asyncio.Task] = set()
        open_now = 0

        async def one() -> None:
            nonlocal open_now
            writer = None
            try:
                reader, writer = await arena.connect(rcvbuf=4096)
                open_now += 1
                arena.stats["flood open peak"] = max(arena.stats["flood open peak"], open_now)
                if rnd.random() < half_login:
                    bhs = P.build_bhs(P.OP_LOGIN_REQ, (0 << 2) | 1, immediate=True, itt=1,
                                      raw={8: bytes.fromhex("40000137") + os.urandom(2)},
                                      fields={24: 1})
                    writer.write(P.encode_bytes(bhs, encode_text([
                        ("InitiatorName", f"iqn.2026-11.io.hostile:flood{rnd.randrange(1 << 20)}"),
                        ("SessionType", "Normal"), ("TargetName", arena.iqn),
                        ("AuthMethod", "None")])))
                await _discard(reader)           # until the target hangs up
                arena.stats["flood closed by target"] += 1
            except EXPECTED as e:
                arena.stats[f"flood {type(e).__name__}"] += 1
            finally:
                if writer is not None:
                    open_now -= 1
                arena.drop(writer)

        while not arena.over():
            if len(live) < count:
                t = asyncio.ensure_future(one())
                live.add(t)
                t.add_done_callback(live.discard)
                arena.stats["flood tries peak"] = max(arena.stats["flood tries peak"], len(live))
            await arena.pause(1.0 / rate)
        await cancel_all(live)
    return attack


# -- clients that pin memory in the target ---------------------------------------------

def non_readers(sessions: int = 32, read_bytes: int = 8 * MiB, per_session: int = 512,
                pace: float = 0.05) -> Attack:
    """Log in, queue READs of ``read_bytes`` each (a full CmdSN window, then
    immediate ones beyond it) and never read a byte of the answers."""
    blocks = read_bytes // 512

    async def attack(arena: Arena) -> None:
        async def one(n: int) -> None:
            ini = await arena.login(f"iqn.2026-11.io.hostile:nonreader{n}", rcvbuf=4096)
            try:
                for k in range(per_session):
                    if arena.over(memory=True):
                        break
                    cdb = _cdb16(0x88, (k * blocks) % (1 << 16), blocks)
                    ini.send(_scsi_cmd(ini, arena, cdb, edtl=read_bytes, read=True,
                                       immediate=not _in_window(ini)))
                    arena.stats["unread READs"] += 1
                    await arena.pause(pace)
                # then sit on the session, still not reading
                while not arena.over(memory=True):
                    await arena.pause(0.2)
            finally:
                arena.drop(ini.writer)
        await _each(sessions, one, arena, memory=True)
    return attack


def silent_writers(sessions: int = 32, write_bytes: int = 64 * MiB, per_session: int = 64,
                   pace: float = 0.2) -> Attack:
    """Log in, announce WRITEs of ``write_bytes`` each (no immediate data;
    immediate commands beyond the CmdSN window) and never send a Data-Out.
    The target's R2Ts are read and ignored."""
    blocks = write_bytes // 512

    async def attack(arena: Arena) -> None:
        async def one(n: int) -> None:
            ini = await arena.login(f"iqn.2026-11.io.hostile:silent{n}", initial_r2t=True,
                                    immediate_data=True)
            drain = asyncio.ensure_future(_discard(ini.reader))
            try:
                for k in range(per_session):
                    if arena.over(memory=True) or drain.done():
                        break
                    cdb = _cdb16(0x8A, 0, blocks)
                    ini.send(_scsi_cmd(ini, arena, cdb, edtl=write_bytes, read=False,
                                       immediate=k % 2 == 1 or not _in_window(ini)))
                    arena.stats["WRITEs without data"] += 1
                    await arena.pause(pace)
                while not arena.over(memory=True) and not drain.done():
                    await arena.pause(0.2)
            finally:
                arena.drop(ini.writer)
                drain.cancel()
        await _each(sessions, one, arena, memory=True)
    return attack


def immediate_flood(sessions: int = 16, burst: int = 1024, pace: float = 0.05) -> Attack:
    """Log in and send bursts of immediate commands (READs of 64 KiB and
    NOP-Outs with data), which bypass the CmdSN window; half the sessions
    read the answers, half never do."""
    async def attack(arena: Arena) -> None:
        async def one(n: int) -> None:
            reads_answers = n % 2 == 0
            ini = await arena.login(f"iqn.2026-11.io.hostile:immediate{n}",
                                    rcvbuf=None if reads_answers else 4096)
            drain = asyncio.ensure_future(_discard(ini.reader)) if reads_answers else None
            try:
                while not arena.over(memory=True) and not (drain and drain.done()):
                    out = bytearray()
                    for k in range(burst):
                        if k % 4:
                            bhs = _scsi_cmd(ini, arena, _cdb16(0x88, k * 128, 128), edtl=65536,
                                            read=True, immediate=True)
                            out += P.encode_bytes(bhs)
                        else:
                            bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True,
                                              itt=ini.new_itt(),
                                              fields={20: P.ALL_ONES, 24: ini.cmdsn})
                            out += P.encode_bytes(bhs, b"n" * 8192)
                    ini.writer.write(out)
                    arena.stats["immediate commands"] += burst
                    # a target that stops reading (backpressure) ends this session
                    await asyncio.wait_for(ini.writer.drain(), 5)
                    await arena.pause(pace)
            finally:
                arena.drop(ini.writer)
                if drain is not None:
                    drain.cancel()
        await _each(sessions, one, arena, memory=True)
    return attack


# -- running attacks in a process of their own -----------------------------------------

@dataclass(frozen=True)
class Assault:
    """One attack against one target from one loopback source."""
    name: str
    source: str
    iqn: str
    lun: int = 0
    kw: tuple = ()              # keyword arguments of the attack, as (name, value) pairs


ATTACKS: dict[str, Callable[..., Attack]] = {
    "fuzzer": fuzzer, "connection_flood": connection_flood, "non_readers": non_readers,
    "silent_writers": silent_writers, "immediate_flood": immediate_flood,
}


def run_attacks(host: str, port: int, assaults: list[Assault], until: float, stop, brake,
                results) -> None:
    """Process entry point: run ``assaults`` until wall time ``until`` or until
    the multiprocessing Event ``stop`` is set (memory attacks also stop at
    ``brake``); put {name: stats} on the ``results`` queue; hang up everything."""
    async def main() -> dict[str, dict]:
        arenas = [Arena(host, port, a.iqn, a.lun, a.source) for a in assaults]

        async def watch() -> None:
            while time.time() < until and not stop.is_set():
                if brake.is_set():
                    for a in arenas:
                        a.brake.set()
                await asyncio.sleep(0.05)
            for a in arenas:
                a.done.set()

        async def guarded(assault: Assault, arena: Arena) -> None:
            try:
                await ATTACKS[assault.name](**dict(assault.kw))(arena)
            except BaseException as e:      # a harness bug: report it, never hide it
                arena.stats[f"HARNESS {type(e).__name__}: {e}"] += 1
            finally:
                arena.hang_up_all()

        watcher = asyncio.ensure_future(watch())
        tasks = [asyncio.ensure_future(guarded(a, r)) for a, r in zip(assaults, arenas)]
        await watcher
        # attacks notice ``done`` within their pause; give them a bounded grace
        _, pending = await asyncio.wait(tasks, timeout=15)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in arenas:
            a.hang_up_all()
        return {f"{s.name}@{s.source}": dict(r.stats) for s, r in zip(assaults, arenas)}

    stats = asyncio.run(main())
    results.put(stats)
