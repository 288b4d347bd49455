"""The TCMU ring ABI: constants and layouts from the kernel's
``include/uapi/linux/target_core_user.h``; x86-64/aarch64 ``struct iovec``
is two 64-bit words.

Careful: ``__packed`` is on the outer structs only. The anonymous ``req`` /
``rsp`` structs inside ``struct tcmu_cmd_entry``'s union are NOT packed, so
``req.cdb_off`` (a __u64 after three __u32) sits at union offset 16 after 4
bytes of padding, and ``req.iov[]`` at union offset 40 (entry offset 48).
Verified on the 6.1 guest kernel (see tests/vm): reading the iovecs at 44,
as a fully packed layout would have it, yields garbage. The mailbox's
``cmd_tail`` is ``__aligned__(64)`` inside a packed struct: offset 64,
sizeof 128 (the kernel's cmdr_off).

Shared memory (one uio map, mmap offset 0)::

    0                 struct tcmu_mailbox (cmd_tail on its own 64-byte line)
    cmdr_off          command ring, cmdr_size bytes, entries 8-byte aligned
    cmdr_off+size ..  data area; iov_base and cdb_off are offsets from 0
"""
from __future__ import annotations

import struct

TCMU_VERSION = "2.0"
TCMU_MAILBOX_VERSION = 2
ALIGN_SIZE = 64

TCMU_MAILBOX_FLAG_CAP_OOOC = 1 << 0       # out-of-order completions
TCMU_MAILBOX_FLAG_CAP_READ_LEN = 1 << 1   # rsp.read_len honoured
TCMU_MAILBOX_FLAG_CAP_TMR = 1 << 2        # TMR notifications
TCMU_MAILBOX_FLAG_CAP_KEEP_BUF = 1 << 3

TCMU_OP_PAD = 0
TCMU_OP_CMD = 1
TCMU_OP_TMR = 2
TCMU_OP_MASK = 0x7
TCMU_OP_ALIGN_SIZE = 8

TCMU_UFLAG_UNKNOWN_OP = 0x1
TCMU_UFLAG_READ_LEN = 0x2
TCMU_UFLAG_KEEP_BUF = 0x4

TCMU_SENSE_BUFFERSIZE = 96

# struct tcmu_mailbox
MB_VERSION = 0          # __u16
MB_FLAGS = 2            # __u16
MB_CMDR_OFF = 4         # __u32
MB_CMDR_SIZE = 8        # __u32
MB_CMD_HEAD = 12        # __u32
MB_CMD_TAIL = 64        # __u32 __aligned__(ALIGN_SIZE)
MAILBOX_HDR = struct.Struct("=HHIII")   # version, flags, cmdr_off, cmdr_size, cmd_head
U32 = struct.Struct("=I")

# struct tcmu_cmd_entry_hdr
ENT_HDR = struct.Struct("=IHBB")        # len_op, cmd_id, kflags, uflags
ENT_HDR_SIZE = 8
ENT_UFLAGS = 7
# req
REQ = struct.Struct("=III4xQQQ")        # iov_cnt, iov_bidi_cnt, iov_dif_cnt, (pad), cdb_off, pad1, pad2
REQ_OFF = 8
REQ_HEAD = struct.Struct("=III4xQ")     # the same up to cdb_off: what a command's parse needs
REQ_IOV_OFF = 8 + REQ.size              # 48: struct iovec iov[] (natural alignment)
IOVEC = struct.Struct("=QQ")            # iov_base (offset into the map), iov_len
# rsp
RSP_STATUS_OFF = 8                      # __u8 scsi_status
RSP_READ_LEN_OFF = 12                   # __u32 read_len
RSP_SENSE_OFF = 16                      # char sense_buffer[96]
RSP_HEAD = struct.Struct("=B3xI")       # scsi_status, (pad), read_len: at RSP_STATUS_OFF
CMD_ENTRY_SIZE = 8 + max(REQ.size, 8 + TCMU_SENSE_BUFFERSIZE)   # sizeof(struct tcmu_cmd_entry) = 112
# struct tcmu_tmr_entry
TMR = struct.Struct("=BBHIQQ")          # tmr_type, pad1, pad2, cmd_cnt, pad3, pad4
TMR_CMD_IDS_OFF = 8 + TMR.size          # 32: __u16 cmd_ids[]

TCMU_TMR_UNKNOWN = 0
TCMU_TMR_ABORT_TASK = 1
TCMU_TMR_ABORT_TASK_SET = 2
TCMU_TMR_CLEAR_ACA = 3
TCMU_TMR_CLEAR_TASK_SET = 4
TCMU_TMR_LUN_RESET = 5
TCMU_TMR_TARGET_WARM_RESET = 6
TCMU_TMR_TARGET_COLD_RESET = 7
TCMU_TMR_LUN_RESET_PRO = 128

# generic netlink family "TCM-USER"
TCMU_GENL_FAMILY = "TCM-USER"
TCMU_GENL_MCGRP = "config"
TCMU_CMD_UNSPEC = 0
TCMU_CMD_ADDED_DEVICE = 1
TCMU_CMD_REMOVED_DEVICE = 2
TCMU_CMD_RECONFIG_DEVICE = 3
TCMU_CMD_ADDED_DEVICE_DONE = 4
TCMU_CMD_REMOVED_DEVICE_DONE = 5
TCMU_CMD_RECONFIG_DEVICE_DONE = 6
TCMU_CMD_SET_FEATURES = 7

TCMU_ATTR_UNSPEC = 0
TCMU_ATTR_DEVICE = 1
TCMU_ATTR_MINOR = 2
TCMU_ATTR_PAD = 3
TCMU_ATTR_DEV_CFG = 4
TCMU_ATTR_DEV_SIZE = 5
TCMU_ATTR_WRITECACHE = 6
TCMU_ATTR_CMD_STATUS = 7
TCMU_ATTR_DEVICE_ID = 8
TCMU_ATTR_SUPP_KERN_CMD_REPLY = 9


def hdr_get_op(len_op: int) -> int:
    return len_op & TCMU_OP_MASK


def hdr_get_len(len_op: int) -> int:
    return len_op & ~TCMU_OP_MASK & 0xFFFFFFFF


def cdb_length(first_byte: int, seventh: int | None = None) -> int:
    """SCSI CDB length from the opcode's group code (as scsi_command_size)."""
    if first_byte == 0x7F:                       # variable length: 8 + additional
        return 8 + (seventh or 0)
    return _CDB_LEN_BY_GROUP[first_byte >> 5]


# by group code (opcode >> 5); 3 is reserved, 6 and 7 vendor specific: 16
_CDB_LEN_BY_GROUP = (6, 10, 10, 16, 16, 12, 16, 16)
