"""INQUIRY data: standard data and the VPD pages (SPC-4 6.6, 7.8; SBC-3 6.6).

Pure functions from identity/limits to bytes, so the byte layouts are easy
to test and to compare with the standards tables.
"""
from __future__ import annotations

import struct

from .identity import DeviceIdentity, Limits

# Version descriptors (SPC-4 table 29): SAM-5, SPC-4, SBC-3.
_VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)

VPD_SUPPORTED = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_ID = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_CHARACTERISTICS = 0xB1
VPD_LB_PROVISIONING = 0xB2
SUPPORTED_VPD = (VPD_SUPPORTED, VPD_UNIT_SERIAL, VPD_DEVICE_ID, VPD_BLOCK_LIMITS,
                 VPD_BLOCK_CHARACTERISTICS, VPD_LB_PROVISIONING)

PQ_NOT_CONNECTED_NO_LU = 0x7F   # peripheral qualifier 011b, type 1Fh


def _pad(text: str, n: int) -> bytes:
    return text.encode("ascii").ljust(n, b" ")[:n]


def standard(identity: DeviceIdentity, *, peripheral: int = 0x00) -> bytes:
    """Standard INQUIRY data, 74 bytes.

    VERSION 06h (SPC-4); HISUP (LUNs are hierarchical addresses); response
    data format 2; TPGS 00b: no ALUA, one access state for all ports (hosts
    then pick their default multipath handler, which is right for a target
    whose ports all reach the same LU the same way); CMDQUE: full queueing.
    """
    buf = bytearray(74)
    buf[0] = peripheral
    buf[2] = 0x06
    buf[3] = 0x10 | 0x02
    buf[4] = len(buf) - 5
    buf[5] = 0x00
    buf[6] = 0x00
    buf[7] = 0x02
    buf[8:16] = _pad(identity.vendor, 8)
    buf[16:32] = _pad(identity.product_id, 16)
    buf[32:36] = _pad(identity.revision, 4)
    for i, vd in enumerate(_VERSION_DESCRIPTORS):
        struct.pack_into(">H", buf, 58 + 2 * i, vd)
    return bytes(buf)


def _vpd(page: int, body: bytes | bytearray) -> bytes:
    return bytes((0x00, page)) + struct.pack(">H", len(body)) + bytes(body)


def supported_pages() -> bytes:
    return _vpd(VPD_SUPPORTED, bytes(SUPPORTED_VPD))


def unit_serial(identity: DeviceIdentity) -> bytes:
    return _vpd(VPD_UNIT_SERIAL, identity.serial.encode("ascii"))


def _designator(code_set: int, assoc: int, dtype: int, value: bytes, piv: bool = False) -> bytes:
    return bytes((code_set & 0xF, (0x80 if piv else 0) | (assoc << 4) | dtype, 0, len(value))) + value


def device_identification(identity: DeviceIdentity, *, target_port: str = "",
                          relative_port: int | None = None) -> bytes:
    """VPD 83h: NAA (LU), T10 vendor ID (LU), and, when the nexus names a
    target port, its relative port number and SCSI name string."""
    body = bytearray()
    body += _designator(1, 0, 0x3, identity.naa_bytes())
    t10 = _pad(identity.vendor, 8) + identity.t10_vendor_id.encode("ascii")
    body += _designator(2, 0, 0x1, t10)
    if relative_port is not None:
        body += _designator(1, 1, 0x4, struct.pack(">HH", 0, relative_port & 0xFFFF))
    if target_port:
        name = target_port.encode("utf-8", "replace") + b"\x00"
        name += b"\x00" * (-len(name) % 4)
        if len(name) <= 252:
            body += _designator(3, 1, 0x8, name)
    return _vpd(VPD_DEVICE_ID, body)


def block_limits(limits: Limits, *, thin: bool) -> bytes:
    body = bytearray(0x3C)
    body[0] = 0x01                              # WSNZ: WRITE SAME of 0 blocks is refused
    body[1] = limits.max_compare_and_write
    struct.pack_into(">H", body, 2, min(limits.optimal_granularity, 0xFFFF))
    struct.pack_into(">I", body, 4, limits.max_transfer)
    # OPTIMAL TRANSFER LENGTH: hosts turn it into io_opt (mkfs stripe
    # width, readahead); 8 MiB keeps that sane while MAXIMUM allows more.
    struct.pack_into(">I", body, 8, min(limits.max_transfer, max(1, (8 << 20) // limits.block_size)))
    if thin:
        struct.pack_into(">I", body, 16, limits.max_unmap)
        struct.pack_into(">I", body, 20, limits.max_unmap_descriptors)
        struct.pack_into(">I", body, 24, 1)     # optimal unmap granularity: one block
        struct.pack_into(">I", body, 28, 0x80000000)   # UGAVALID, alignment 0
    struct.pack_into(">Q", body, 32, limits.max_write_same)
    return _vpd(VPD_BLOCK_LIMITS, body)


def block_characteristics() -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, 0x0001)    # MEDIUM ROTATION RATE: non-rotating
    return _vpd(VPD_BLOCK_CHARACTERISTICS, body)


def lb_provisioning(*, thin: bool) -> bytes:
    body = bytearray(4)
    if thin:
        # LBPU (UNMAP), LBPWS (WRITE SAME(16) UNMAP), LBPWS10, LBPRZ=001b:
        # unmapped blocks read back as zeros (LunIO.unmap's contract).
        body[1] = 0x80 | 0x40 | 0x20 | 0x04
        body[2] = 0x02                           # PROVISIONING TYPE: thin
    return _vpd(VPD_LB_PROVISIONING, body)
