"""A small pure-Python iSCSI initiator for the tests (asyncio streams).

Not a product: it exists to drive the target through login (with or without
CHAP), discovery, reads/writes with every R2T/immediate/unsolicited combo,
digests, NOP, TMF and logout, and to check what the target sends back.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from dataclasses import dataclass, field

from target.iscsi import pdu as P
from target.iscsi.cmdsn import sn_add, sn_lt
from target.iscsi.params import encode_text, parse_text

TIMEOUT = 10.0


class InitiatorError(Exception):
    pass


class LoginError(InitiatorError):
    def __init__(self, status: tuple[int, int], keys=None) -> None:
        super().__init__(f"login failed with status {status[0]:02x}/{status[1]:02x}")
        self.status = status
        self.keys = keys or {}


@dataclass
class ScsiResult:
    status: int
    sense: bytes
    data: bytes
    response: P.Pdu | None
    datain: list[P.Pdu] = field(default_factory=list)
    r2ts: list[P.Pdu] = field(default_factory=list)
    residual: int = 0
    flags: int = 0


def chap_md5(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes((ident,)) + secret + challenge).digest()


class Initiator:
    def __init__(self, host: str, port: int, name: str = "iqn.2025-01.org.test:initiator",
                 isid: bytes | None = None) -> None:
        self.host, self.port = host, port
        self.name = name
        self.isid = isid or bytes((0x40, 0x00, 0x01, 0x37)) + os.urandom(2)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.itt = 0x100
        self.cmdsn = 1
        self.exp_statsn = 0
        self.max_cmdsn = 1
        self.exp_cmdsn = 1
        self.tsih = 0
        self.hd = False
        self.dd = False
        # negotiated (initiator view)
        self.target_mrdsl = 8192
        self.my_mrdsl = 262144
        self.first_burst = 65536
        self.max_burst = 262144
        self.immediate_data = True
        self.initial_r2t = True
        self.max_outstanding_r2t = 1
        self.queues: dict[int, asyncio.Queue] = {}
        self.rejects: asyncio.Queue = asyncio.Queue()
        self.async_msgs: asyncio.Queue = asyncio.Queue()
        self.nopins: list[P.Pdu] = []
        self.answer_nops = True
        self.route_rejects = True      # also hand a Reject to the waiter of the rejected ITT
        self._reader_task: asyncio.Task | None = None
        self._window = asyncio.Event()
        self.statsns: list[int] = []
        self.closed = False

    # -- transport ---------------------------------------------------------------
    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), TIMEOUT)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, bhs: bytearray, data=b"", ahs: bytes = b"") -> None:
        self.writer.writelines(P.encode(bhs, data, ahs=ahs, header_digest=self.hd, data_digest=self.dd))

    async def recv(self, timeout: float = TIMEOUT) -> P.Pdu:
        r = self.reader
        hdr = await asyncio.wait_for(r.readexactly(P.BHS_LEN), timeout)
        ahs_len, dlen = P.parse_bhs_lengths(hdr)
        rest = await asyncio.wait_for(r.readexactly(ahs_len + (4 if self.hd else 0)), timeout)
        if self.hd:
            if P.digest_bytes(hdr + rest[:ahs_len]) != rest[ahs_len:]:
                raise InitiatorError("header digest mismatch from target")
        dtotal = dlen + P.pad_len(dlen) + (4 if self.dd and dlen else 0)
        body = await asyncio.wait_for(r.readexactly(dtotal), timeout) if dtotal else b""
        if self.dd and dlen:
            padded = body[:dlen + P.pad_len(dlen)]
            if P.digest_bytes(padded) != body[-4:]:
                raise InitiatorError("data digest mismatch from target")
        pdu = P.Pdu(hdr, rest[:ahs_len], body[:dlen])
        self._track(pdu)
        return pdu

    def _track(self, pdu: P.Pdu) -> None:
        if pdu.opcode in (P.OP_SCSI_RSP, P.OP_NOP_IN, P.OP_TMF_RSP, P.OP_TEXT_RSP, P.OP_LOGOUT_RSP,
                          P.OP_R2T, P.OP_DATA_IN, P.OP_REJECT, P.OP_LOGIN_RSP, P.OP_ASYNC_MSG):
            exp, mx = pdu.u32(28), pdu.u32(32)
            if pdu.opcode != P.OP_DATA_IN or pdu.flags & P.DATAIN_STATUS or True:
                if sn_lt(self.max_cmdsn, mx):
                    self.max_cmdsn = mx
                    self._window.set()
                if sn_lt(self.exp_cmdsn, exp):
                    self.exp_cmdsn = exp
        status_bearing = pdu.opcode in (P.OP_SCSI_RSP, P.OP_TMF_RSP, P.OP_TEXT_RSP, P.OP_LOGOUT_RSP,
                                        P.OP_REJECT, P.OP_LOGIN_RSP, P.OP_ASYNC_MSG) or \
            (pdu.opcode == P.OP_DATA_IN and pdu.flags & P.DATAIN_STATUS) or \
            (pdu.opcode == P.OP_NOP_IN and pdu.itt != P.ALL_ONES)
        if status_bearing:
            st = pdu.u32(24)
            self.statsns.append(st)
            self.exp_statsn = (st + 1) & P.ALL_ONES

    def start_reader(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                pdu = await self.recv(timeout=3600)
                if pdu.opcode == P.OP_NOP_IN and pdu.itt == P.ALL_ONES:
                    self.nopins.append(pdu)
                    if self.answer_nops and pdu.ttt != P.ALL_ONES:
                        bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, immediate=True, lun=0,
                                          itt=P.ALL_ONES, fields={20: pdu.ttt, 24: self.cmdsn,
                                                                  28: self.exp_statsn})
                        self.send(bhs)
                    continue
                if pdu.opcode == P.OP_ASYNC_MSG:
                    await self.async_msgs.put(pdu)
                    continue
                if pdu.opcode == P.OP_REJECT:
                    await self.rejects.put(pdu)
                    bad_itt = struct.unpack_from(">I", pdu.data, 16)[0] if len(pdu.data) >= 20 else None
                    if self.route_rejects and bad_itt in self.queues:
                        await self.queues[bad_itt].put(pdu)
                    continue
                q = self.queues.get(pdu.itt)
                if q is not None:
                    await q.put(pdu)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True
            for q in self.queues.values():
                q.put_nowait(None)

    async def close(self) -> None:
        # close the socket first: the reader then ends on EOF even if a
        # cancellation gets swallowed by wait_for (Python 3.11 race)
        if self.writer is not None:
            self.writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self._reader_task), 5)
            except BaseException:
                pass
        if self.writer is not None:
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except (Exception, asyncio.TimeoutError):
                pass

    def new_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        return self.itt

    # -- login -------------------------------------------------------------------
    def _login_pdu(self, csg: int, nsg: int, transit: bool, pairs, cont: bool = False) -> bytearray:
        flags = (P.FLAG_TRANSIT if transit else 0) | (P.FLAG_CONTINUE if cont else 0) | (csg << 2) | nsg
        bhs = P.build_bhs(P.OP_LOGIN_REQ, flags, immediate=True, b2=0, b3=0, itt=self._login_itt,
                          raw={8: self.isid + self.tsih.to_bytes(2, "big")},
                          fields={20: 0, 24: self.cmdsn, 28: self.exp_statsn})
        return bhs

    async def login_exchange(self, csg: int, nsg: int, transit: bool, pairs) -> tuple[P.Pdu, dict]:
        data = encode_text(pairs)
        self.send(self._login_pdu(csg, nsg, transit, pairs), data)
        rsp = await self.recv()
        if rsp.opcode != P.OP_LOGIN_RSP:
            raise InitiatorError(f"expected Login Response, got opcode 0x{rsp.opcode:02x}")
        keys = dict(parse_text(rsp.data))
        status = (rsp.bhs[36], rsp.bhs[37])
        if status != (0, 0):
            raise LoginError(status, keys)
        return rsp, keys

    async def login(self, target: str | None = None, *, discovery: bool = False,
                    chap: tuple[str, str] | None = None, mutual: tuple[str, str] | None = None,
                    header_digest: str = "None", data_digest: str = "None",
                    immediate_data: bool = True, initial_r2t: bool = False,
                    first_burst: int = 65536, max_burst: int = 262144, mrdsl: int = 262144,
                    max_outstanding_r2t: int = 4, skip_security: bool = False,
                    extra: list[tuple[str, str]] | None = None, start_reader: bool = True) -> dict:
        if self.reader is None:
            await self.connect()
        self._login_itt = self.new_itt()
        self.my_mrdsl = mrdsl
        leading = [("InitiatorName", self.name),
                   ("SessionType", "Discovery" if discovery else "Normal")]
        if not discovery:
            leading.append(("TargetName", target))
        op = [("HeaderDigest", header_digest), ("DataDigest", data_digest),
              ("MaxRecvDataSegmentLength", str(mrdsl)), ("DefaultTime2Wait", "2"),
              ("DefaultTime2Retain", "0"), ("ErrorRecoveryLevel", "0")]
        if not discovery:
            op += [("InitialR2T", "Yes" if initial_r2t else "No"),
                   ("ImmediateData", "Yes" if immediate_data else "No"),
                   ("MaxBurstLength", str(max_burst)), ("FirstBurstLength", str(first_burst)),
                   ("MaxOutstandingR2T", str(max_outstanding_r2t)), ("MaxConnections", "1"),
                   ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
        op += extra or []
        answers: dict = {}
        if skip_security:
            rsp, k = await self.login_exchange(1, 3, True, leading + op)
            answers.update(k)
        elif chap is None:
            rsp, k = await self.login_exchange(0, 1, True, leading + [("AuthMethod", "None")])
            answers.update(k)
            if not rsp.flags & P.FLAG_TRANSIT:
                raise InitiatorError("target did not transit from security stage")
            rsp, k = await self.login_exchange(1, 3, True, op)
            answers.update(k)
        else:
            rsp, k = await self.login_exchange(0, 1, False, leading + [("AuthMethod", "CHAP,None")])
            answers.update(k)
            if k.get("AuthMethod") != "CHAP":
                raise InitiatorError(f"target chose AuthMethod {k.get('AuthMethod')}")
            rsp, k = await self.login_exchange(0, 1, False, [("CHAP_A", "5")])
            answers.update(k)
            ident = int(k["CHAP_I"])
            challenge = bytes.fromhex(k["CHAP_C"][2:])
            pairs = [("CHAP_N", chap[0]),
                     ("CHAP_R", "0x" + chap_md5(ident, chap[1].encode(), challenge).hex())]
            my_ident = my_chal = None
            if mutual is not None:
                my_ident = 77
                my_chal = os.urandom(16)
                pairs += [("CHAP_I", str(my_ident)), ("CHAP_C", "0x" + my_chal.hex())]
            rsp, k = await self.login_exchange(0, 1, True, pairs)
            answers.update(k)
            if mutual is not None:
                if k.get("CHAP_N") != mutual[0]:
                    raise InitiatorError("mutual CHAP: wrong target user")
                want = chap_md5(my_ident, mutual[1].encode(), my_chal)
                if bytes.fromhex(k["CHAP_R"][2:]) != want:
                    raise InitiatorError("mutual CHAP: bad target response")
            if not rsp.flags & P.FLAG_TRANSIT:
                raise InitiatorError("target did not transit after CHAP")
            rsp, k = await self.login_exchange(1, 3, True, op)
            answers.update(k)
        if not (rsp.flags & P.FLAG_TRANSIT and (rsp.flags & 3) == 3):
            raise InitiatorError("login did not reach full feature phase")
        self.tsih = rsp.u16(14)
        self.hd = answers.get("HeaderDigest") == "CRC32C"
        self.dd = answers.get("DataDigest") == "CRC32C"
        self.target_mrdsl = int(answers.get("MaxRecvDataSegmentLength", 8192))
        self.first_burst = int(answers.get("FirstBurstLength", 65536))
        self.max_burst = int(answers.get("MaxBurstLength", 262144))
        self.immediate_data = answers.get("ImmediateData", "Yes") == "Yes"
        self.initial_r2t = answers.get("InitialR2T", "Yes") == "Yes"
        self.max_outstanding_r2t = int(answers.get("MaxOutstandingR2T", 1))
        self.answers = answers
        if start_reader:
            self.start_reader()
        return answers

    # -- FFP requests ------------------------------------------------------------------
    async def _wait_window(self) -> None:
        for _ in range(1000):
            if not sn_lt(self.max_cmdsn, self.cmdsn):
                return
            self._window.clear()
            await asyncio.wait_for(self._window.wait(), TIMEOUT)
        raise InitiatorError("CmdSN window never opened")

    async def _get(self, q: asyncio.Queue) -> P.Pdu:
        pdu = await asyncio.wait_for(q.get(), TIMEOUT)
        if pdu is None:
            raise InitiatorError("connection closed")
        return pdu

    async def scsi(self, lun: int, cdb: bytes, *, data_out: bytes = b"", read_len: int = 0,
                   attr: int = 1, immediate: bool = False, edtl: int | None = None) -> ScsiResult:
        itt = self.new_itt()
        q = self.queues[itt] = asyncio.Queue()
        try:
            if not immediate:
                await self._wait_window()
            write = bool(data_out)
            if edtl is None:
                edtl = len(data_out) if write else read_len
            flags = (P.FLAG_READ if read_len else 0) | (P.FLAG_WRITE if write else 0) | attr
            cdb16 = bytes(cdb[:16]).ljust(16, b"\0")
            ahs = b""
            if len(cdb) > 16:
                ahs = P.build_ahs(P.AHS_EXTENDED_CDB, b"\0" + bytes(cdb[16:]))
            imm = b""
            if write and self.immediate_data:
                imm = data_out[:min(self.first_burst, self.target_mrdsl, len(data_out))]
            unsol_end = len(imm)
            if write and not self.initial_r2t:
                unsol_end = min(self.first_burst, len(data_out))
            if unsol_end <= len(imm):
                flags |= P.FLAG_FINAL          # F=0 announces unsolicited Data-Out
            bhs = P.build_bhs(P.OP_SCSI_CMD, flags, immediate=immediate, lun=lun, itt=itt,
                              fields={20: edtl, 24: self.cmdsn, 28: self.exp_statsn}, raw={32: cdb16})
            if ahs:
                bhs[4] = len(ahs) // 4
            self.send(bhs, imm, ahs=ahs)
            if not immediate:
                self.cmdsn = sn_add(self.cmdsn, 1)
            if unsol_end > len(imm):
                self._send_data(itt, lun, P.ALL_ONES, len(imm), unsol_end, data_out)
            result = ScsiResult(0, b"", b"", None)
            buf = bytearray()
            next_datasn = 0
            while True:
                pdu = await self._get(q)
                if pdu.opcode == P.OP_R2T:
                    result.r2ts.append(pdu)
                    off, length = pdu.u32(40), pdu.u32(44)
                    if pdu.u32(36) != len(result.r2ts) - 1:
                        raise InitiatorError("R2TSN out of sequence")
                    if length > self.max_burst:
                        raise InitiatorError(f"R2T for {length} > MaxBurstLength {self.max_burst}")
                    self._send_data(itt, lun, pdu.ttt, off, off + length, data_out)
                elif pdu.opcode == P.OP_DATA_IN:
                    result.datain.append(pdu)
                    if pdu.u32(36) != next_datasn:
                        raise InitiatorError(f"DataSN {pdu.u32(36)} != {next_datasn}")
                    next_datasn += 1
                    if pdu.u32(40) != len(buf):
                        raise InitiatorError(f"Data-In offset {pdu.u32(40)} != {len(buf)}")
                    if len(pdu.data) > self.my_mrdsl:
                        raise InitiatorError("Data-In larger than our MaxRecvDataSegmentLength")
                    buf += pdu.data
                    if pdu.flags & P.DATAIN_STATUS:
                        result.status = pdu.bhs[3]
                        result.residual = pdu.u32(44)
                        result.flags = pdu.flags
                        result.response = pdu
                        break
                elif pdu.opcode == P.OP_SCSI_RSP:
                    result.status = pdu.bhs[3]
                    result.residual = pdu.u32(44)
                    result.flags = pdu.flags
                    result.response = pdu
                    if len(pdu.data) >= 2:
                        sl = struct.unpack_from(">H", pdu.data, 0)[0]
                        result.sense = bytes(pdu.data[2:2 + sl])
                    break
                elif pdu.opcode == P.OP_REJECT:
                    raise InitiatorError(f"command rejected, reason 0x{pdu.bhs[2]:02x}")
                else:
                    raise InitiatorError(f"unexpected opcode 0x{pdu.opcode:02x}")
            result.data = bytes(buf)
            return result
        finally:
            self.queues.pop(itt, None)

    def _send_data(self, itt: int, lun: int, ttt: int, start: int, end: int, data: bytes) -> None:
        off = start
        datasn = 0
        mv = memoryview(data)
        while off < end:
            n = min(self.target_mrdsl, end - off)
            final = off + n == end
            bhs = P.build_bhs(P.OP_DATA_OUT, P.FLAG_FINAL if final else 0, lun=lun, itt=itt,
                              fields={20: ttt, 28: self.exp_statsn, 36: datasn, 40: off})
            self.send(bhs, mv[off:off + n])
            off += n
            datasn += 1

    async def read(self, lun: int, lba: int, blocks: int, block: int = 512) -> bytes:
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        r = await self.scsi(lun, cdb, read_len=blocks * block)
        if r.status != 0:
            raise InitiatorError(f"READ failed: status 0x{r.status:02x} sense {r.sense.hex()}")
        return r.data

    async def write(self, lun: int, lba: int, data: bytes, block: int = 512) -> ScsiResult:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // block, 0, 0)
        r = await self.scsi(lun, cdb, data_out=data)
        if r.status != 0:
            raise InitiatorError(f"WRITE failed: status 0x{r.status:02x} sense {r.sense.hex()}")
        return r

    async def request(self, bhs: bytearray, data=b"", *, immediate: bool = True) -> P.Pdu:
        """Send a non-SCSI request built by the caller (ITT at 16, CmdSN at 24 filled here)."""
        itt = self.new_itt()
        q = self.queues[itt] = asyncio.Queue()
        try:
            if not immediate:
                await self._wait_window()
            struct.pack_into(">III", bhs, 16, itt, struct.unpack_from(">I", bhs, 20)[0], self.cmdsn)
            struct.pack_into(">I", bhs, 28, self.exp_statsn)
            if immediate:
                bhs[0] |= P.FLAG_IMMEDIATE
            else:
                bhs[0] &= ~P.FLAG_IMMEDIATE & 0xFF
                self.cmdsn = sn_add(self.cmdsn, 1)
            self.send(bhs, data)
            return await self._get(q)
        finally:
            self.queues.pop(itt, None)

    async def nop(self, data: bytes = b"", immediate: bool = True) -> P.Pdu:
        bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, lun=0, fields={20: P.ALL_ONES})
        return await self.request(bhs, data, immediate=immediate)

    async def tmf(self, func: int, lun: int = 0, ref_itt: int = P.ALL_ONES, ref_cmdsn: int = 0,
                  immediate: bool = True) -> int:
        bhs = P.build_bhs(P.OP_TMF_REQ, P.FLAG_FINAL | func, lun=lun,
                          fields={20: ref_itt, 32: ref_cmdsn, 36: 0})
        rsp = await self.request(bhs, immediate=immediate)
        if rsp.opcode != P.OP_TMF_RSP:
            raise InitiatorError(f"expected TMF response, got 0x{rsp.opcode:02x}")
        return rsp.bhs[2]

    async def text(self, pairs, immediate: bool = True) -> list[tuple[str, str]]:
        out = bytearray()
        ttt = P.ALL_ONES
        data = encode_text(pairs)
        for _ in range(1000):
            bhs = P.build_bhs(P.OP_TEXT_REQ, P.FLAG_FINAL, fields={20: ttt})
            rsp = await self.request(bhs, data, immediate=immediate)
            if rsp.opcode != P.OP_TEXT_RSP:
                raise InitiatorError(f"expected Text response, got 0x{rsp.opcode:02x}")
            out += rsp.data
            if rsp.flags & P.FLAG_FINAL:
                return parse_text(bytes(out))
            ttt = rsp.ttt
            data = b""
        raise InitiatorError("endless text response")

    async def send_targets(self, value: str = "All") -> list[tuple[str, str]]:
        return await self.text([("SendTargets", value)])

    async def logout(self, reason: int = 0) -> int:
        bhs = P.build_bhs(P.OP_LOGOUT_REQ, P.FLAG_FINAL | reason, fields={20: 0})
        rsp = await self.request(bhs, immediate=False)
        if rsp.opcode != P.OP_LOGOUT_RSP:
            raise InitiatorError(f"expected Logout response, got 0x{rsp.opcode:02x}")
        return rsp.bhs[2]
