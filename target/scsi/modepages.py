"""Mode parameter pages and MODE SENSE / MODE SELECT (SPC-4 7.5, SBC-3 6.4).

Pages kept: read-write error recovery (01h, fixed), caching (08h, WCE
changeable: with WCE=0 every write is written through), control (0Ah,
D_SENSE changeable: selects descriptor sense) and informational exceptions
control (1Ch, fixed). State is per LU (SPC allows per I_T nexus; one copy is
what Linux and VMware expect), and nothing is savable: PS=0 in every page,
PC=11b and SP=1 are refused as SPC requires.
"""
from __future__ import annotations

import struct
from typing import Callable

from . import constants as c
from .sense import (CheckCondition, invalid_cdb, invalid_param,
                    param_list_length_error, short_data_out)

RW_ERROR_RECOVERY = 0x01
CACHING = 0x08
CONTROL = 0x0A
INFORMATIONAL_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F

_WCE = 0x04       # caching page byte 2
_D_SENSE = 0x04   # control page byte 2


def _page(code: int, length: int, **bytes_at: int) -> bytearray:
    buf = bytearray(2 + length)
    buf[0], buf[1] = code, length
    for k, v in bytes_at.items():
        buf[int(k[1:])] = v
    return buf


class ModePages:
    def __init__(self, write_cache: bool = True) -> None:
        # QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering): commands run
        # concurrently; hosts order what they need with the task attributes.
        self._default = {
            RW_ERROR_RECOVERY: _page(RW_ERROR_RECOVERY, 0x0A),
            CACHING: _page(CACHING, 0x12, b2=_WCE if write_cache else 0),
            CONTROL: _page(CONTROL, 0x0A, b3=0x10),
            INFORMATIONAL_EXCEPTIONS: _page(INFORMATIONAL_EXCEPTIONS, 0x0A),
        }
        self._changeable = {code: bytearray(len(p)) for code, p in self._default.items()}
        for code, p in self._changeable.items():
            p[0], p[1] = code, len(p) - 2
        self._changeable[CACHING][2] = _WCE
        self._changeable[CONTROL][2] = _D_SENSE
        self._current = {code: bytearray(p) for code, p in self._default.items()}
        #: called after the current pages change (ScsiDevice.route_changed)
        self.on_change: Callable[[], None] | None = None

    @property
    def write_cache(self) -> bool:
        return bool(self._current[CACHING][2] & _WCE)

    @property
    def descriptor_sense(self) -> bool:
        return bool(self._current[CONTROL][2] & _D_SENSE)

    def reset(self) -> None:
        """Back to defaults (SAM: a LU reset restores mode parameters)."""
        self._current = {code: bytearray(p) for code, p in self._default.items()}
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- MODE SENSE -----------------------------------------------------------
    def sense(self, cdb: bytes, *, ten: bool, num_blocks: int, block_size: int,
              read_only: bool) -> bytes:
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        alloc = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
        if pc == 3:
            raise CheckCondition(c.ILLEGAL_REQUEST, c.ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
        if page == ALL_PAGES:
            if subpage not in (0x00, 0xFF):
                raise invalid_cdb(3)
            codes = sorted(self._current)
        elif page in self._current:
            if subpage != 0:
                raise invalid_cdb(3)
            codes = [page]
        else:
            raise invalid_cdb(2, 5)
        table = {0: self._current, 1: self._changeable, 2: self._default}[pc]
        pages = b"".join(bytes(table[code]) for code in codes)

        if dbd:
            bdesc = b""
        elif llbaa:
            bdesc = struct.pack(">QII", num_blocks, 0, block_size)
        else:
            bdesc = struct.pack(">I", min(num_blocks, 0xFFFFFFFF)) + struct.pack(">I", block_size & 0xFFFFFF)
        # Device-specific parameter: WP when the LU is read-only; DPOFUA since
        # DPO and FUA are honoured in READ/WRITE(10/12/16).
        dsp = (0x80 if read_only else 0) | 0x10
        if ten:
            total = 8 + len(bdesc) + len(pages)
            header = struct.pack(">HBBBBH", total - 2, 0, dsp, 0x01 if llbaa and bdesc else 0,
                                 0, len(bdesc))
        else:
            total = 4 + len(bdesc) + len(pages)
            header = bytes((min(total - 1, 0xFF), 0, dsp, len(bdesc)))
        return (header + bdesc + pages)[:alloc]

    # -- MODE SELECT ----------------------------------------------------------
    def select(self, cdb: bytes, data_out: memoryview | bytes | None, *, ten: bool,
               block_size: int) -> bool:
        """Apply a MODE SELECT parameter list; return True if anything changed."""
        if cdb[1] & 0x01:
            raise invalid_cdb(1, 0)          # SP: no savable pages
        plen = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
        if plen == 0:
            return False
        if data_out is None or len(data_out) < plen:
            raise short_data_out()
        data = bytes(memoryview(data_out)[:plen])
        hlen = 8 if ten else 4
        if plen < hlen:
            raise param_list_length_error()
        if ten:
            longlba = bool(data[4] & 0x01)
            bdl = int.from_bytes(data[6:8], "big")
            bdl_field = 6
        else:
            longlba = False
            bdl = data[3]
            bdl_field = 3
        if bdl not in (0, 16 if longlba else 8):
            raise invalid_param(bdl_field)
        if hlen + bdl > plen:
            raise param_list_length_error()
        if bdl:
            if longlba:
                blen = int.from_bytes(data[hlen + 12:hlen + 16], "big")
                blen_at = hlen + 12
            else:
                blen = int.from_bytes(data[hlen + 5:hlen + 8], "big")
                blen_at = hlen + 5
            if blen != block_size:
                raise invalid_param(blen_at)
        pos = hlen + bdl
        staged: dict[int, bytearray] = {}
        while pos < plen:
            if plen - pos < 2:
                raise param_list_length_error()
            code = data[pos] & 0x3F
            if data[pos] & 0x40:
                raise invalid_param(pos, 6)    # no subpages
            cur = staged.get(code) or self._current.get(code)
            if cur is None:
                raise invalid_param(pos, 5)
            length = data[pos + 1]
            if length != len(cur) - 2:
                raise invalid_param(pos + 1)
            if pos + 2 + length > plen:
                raise param_list_length_error()
            new = bytearray(data[pos:pos + 2 + length])
            new[0] = cur[0]                   # PS is reserved in MODE SELECT
            mask = self._changeable[code]
            for i in range(2, len(new)):      # <= 20 bytes per page
                if (new[i] ^ cur[i]) & ~mask[i] & 0xFF:
                    raise invalid_param(pos + i)
            staged[code] = new
            pos += 2 + length
        changed = False
        for code, new in staged.items():
            if new != self._current[code]:
                self._current[code] = new
                changed = True
        if changed:
            self._changed()
        return changed
