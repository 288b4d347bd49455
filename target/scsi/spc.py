"""Primary (SPC-4) command handlers: identification, sense, mode
parameters, reservations, REPORT LUNS and REPORT SUPPORTED OPERATION CODES.

Every handler takes (device, command, decoded CDB) and returns the Data-In bytes
(already cut to the CDB's allocation length) or None, or raises
CheckCondition / ReservationConflict.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Sequence

from . import constants as c
from . import inquiry as inq
from .api import ScsiCommand
from .cdb import be, encode_lun
from .lunio_access import not_ready_sense
from .pr import nexus_key
from .sense import encode_sense, invalid_cdb

if TYPE_CHECKING:
    from .commands import Cdb, CommandSpec
    from .device import ScsiDevice


async def test_unit_ready(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    return None     # readiness was checked before dispatch


async def start_stop_unit(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    return None     # no spindle, no medium to eject: accepted as a no-op


async def inquiry(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    cdb = d.raw
    evpd = cdb[1] & 0x01
    if cdb[1] & 0x02:
        raise invalid_cdb(1, 1)          # CMDDT is obsolete
    page = cdb[2]
    alloc = be(cdb, 3, 5)
    if not evpd:
        if page != 0:
            raise invalid_cdb(2)
        return inq.standard(dev.identity)[:alloc]
    if page == inq.VPD_SUPPORTED:
        data = inq.supported_pages()
    elif page == inq.VPD_UNIT_SERIAL:
        data = inq.unit_serial(dev.identity)
    elif page == inq.VPD_DEVICE_ID:
        port = cmd.nexus.target_port
        data = inq.device_identification(
            dev.identity, target_port=port,
            relative_port=dev.ports.relative_id(port) if port else None)
    elif page == inq.VPD_BLOCK_LIMITS:
        data = inq.block_limits(dev.limits, thin=dev.options.thin_provisioning)
    elif page == inq.VPD_BLOCK_CHARACTERISTICS:
        data = inq.block_characteristics()
    elif page == inq.VPD_LB_PROVISIONING:
        data = inq.lb_provisioning(thin=dev.options.thin_provisioning)
    else:
        raise invalid_cdb(2)
    return data[:alloc]


async def request_sense(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    """Report a pending unit attention (and clear it, SAM-5 5.14), else the
    LU's current condition (NOT READY), else NO SENSE. Autosense already
    delivered the sense of failed commands, so nothing else is kept."""
    cdb = d.raw
    desc = bool(cdb[1] & 0x01)
    alloc = cdb[4]
    ua = dev.ua.pop(nexus_key(cmd.nexus))
    if ua is not None:
        data = encode_sense(c.UNIT_ATTENTION, ua, descriptor=desc)
    else:
        nr = not_ready_sense(dev.lunio)
        if nr is not None:
            data = nr.encode(desc)
        else:
            data = encode_sense(c.NO_SENSE, c.ASC_NO_ADDITIONAL_SENSE, descriptor=desc)
    return data[:alloc]


async def report_luns(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    dev.ua.clear(nexus_key(cmd.nexus), c.ASC_REPORTED_LUNS_DATA_HAS_CHANGED)
    return report_luns_data(d.raw, dev.lun_list())


def report_luns_data(cdb: bytes, luns: list[int]) -> bytes:
    select = cdb[2]
    alloc = be(cdb, 6, 10)
    if alloc < 16:
        raise invalid_cdb(6)            # SPC-3: at least 16 bytes
    if select in (0x00, 0x02):
        entries = b"".join(encode_lun(n) for n in sorted(luns))
    elif select == 0x01:
        entries = b""                   # no well-known LUs
    else:
        raise invalid_cdb(2)
    return (struct.pack(">I", len(entries)) + bytes(4) + entries)[:alloc]


async def mode_sense(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    cdb = d.raw
    return dev.mode.sense(cdb, ten=cdb[0] == c.MODE_SENSE_10, num_blocks=dev.num_blocks,
                          block_size=dev.block_size, read_only=dev.read_only())


async def mode_select(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    cdb = d.raw
    changed = dev.mode.select(cdb, cmd.data_out, ten=cdb[0] == c.MODE_SELECT_10,
                              block_size=dev.block_size)
    if changed:
        # SPC-4 7.5.1: other I_T nexuses learn of the change by unit attention.
        dev.ua.establish(c.ASC_MODE_PARAMETERS_CHANGED, exclude=nexus_key(cmd.nexus))


async def reserve(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    # Third-party and extent reservations (obsolete) are not supported.
    cdb = d.raw
    if cdb[1] & 0x10:
        raise invalid_cdb(1, 4)
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)
    if cdb[0] == c.RESERVE_10 and cdb[1] & 0x02:
        raise invalid_cdb(1, 1)
    dev.pr.reserve_spc2(nexus_key(cmd.nexus))


async def release(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    cdb = d.raw
    if cdb[1] & 0x10:
        raise invalid_cdb(1, 4)
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)
    dev.pr.release_spc2(nexus_key(cmd.nexus))


async def persistent_reserve_in(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> bytes:
    return dev.pr.pr_in(d.raw, cmd.nexus)


async def persistent_reserve_out(dev: "ScsiDevice", cmd: ScsiCommand, d: "Cdb") -> None:
    dev.pr.pr_out(d.raw, cmd.data_out, cmd.nexus)


def report_supported_opcodes(commands: Sequence["CommandSpec"], sa_opcodes: frozenset[int],
                             cdb: bytes) -> bytes:
    """REPORT SUPPORTED OPERATION CODES over a command table: the table
    (target.scsi.commands, which refers to these handlers) passes itself."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = be(cdb, 4, 6)
    alloc = be(cdb, 6, 10)
    # Command timeouts descriptor: no nominal/recommended timeouts to report.
    timeouts = struct.pack(">HBBII", 0x0A, 0, 0, 0, 0) if rctd else b""
    if options == 0:
        out = bytearray()
        for spec in sorted(commands, key=lambda s: (s.opcode, s.sa or 0)):
            flags = (0x02 if rctd else 0) | (0x01 if spec.sa is not None else 0)
            out += struct.pack(">BBHBBH", spec.opcode, 0, spec.sa or 0, 0, flags, len(spec.usage))
            out += timeouts
        data = struct.pack(">I", len(out)) + bytes(out)
        return data[:alloc]
    if options == 1:
        if opcode in sa_opcodes:
            raise invalid_cdb(3)
        want_sa = None
    elif options == 2:
        if opcode not in sa_opcodes:
            raise invalid_cdb(3)
        want_sa = sa
    elif options == 3:
        want_sa = sa if opcode in sa_opcodes else None
    else:
        raise invalid_cdb(2, 2)
    spec = next((s for s in commands if s.opcode == opcode and s.sa == want_sa), None)
    if spec is None:
        data = bytes((0, 0x01, 0, 0))                  # SUPPORT 001b: not supported
    else:
        data = (bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(spec.usage))
                + spec.usage + timeouts)               # SUPPORT 011b: as the standard says
    return data[:alloc]
