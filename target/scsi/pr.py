"""Reservations: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations.

One ``Reservations`` object per LU holds the registrations, the persistent
reservation and the SPC-2 reservation, answers "does this command conflict
for this I_T nexus" (SPC-4 5.13.1 / SBC-3 table 13, reduced to three command
classes), and implements PERSISTENT RESERVE IN/OUT. Every change of the
persistent state is written through a ReservationStore as a JSON-serialisable
dict; on start the state is reloaded when APTPL was in force (SPC-4: without
APTPL, persistent reservations do not survive power loss).

Not supported (reported so in REPORT CAPABILITIES): SPEC_I_PT, REGISTER AND
MOVE, REPLACE LOST RESERVATION, element scope; PREEMPT AND ABORT is handled
as PREEMPT (aborting the preempted nexuses' tasks is the transport's job).
"""
from __future__ import annotations

import copy
import json
import logging
import struct
from dataclasses import dataclass
from typing import Callable, Protocol

from . import constants as c
from .api import Nexus
from .ports import TargetPorts
from .cdb import data_out_view
from .sense import (CheckCondition, ReservationConflict, invalid_cdb, invalid_param,
                    param_list_length_error)
from .ua import UnitAttentions

log = logging.getLogger(__name__)

# Reservation types (SPC-4 table 173).
WRITE_EXCLUSIVE = 0x1
EXCLUSIVE_ACCESS = 0x3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8
VALID_TYPES = frozenset((1, 3, 5, 6, 7, 8))
_WRITE_EXCLUSIVE_FAMILY = frozenset((1, 5, 7))
_REGISTRANTS_TYPES = frozenset((5, 6, 7, 8))     # registrants may access
_ALL_REGISTRANTS = frozenset((7, 8))             # every registrant is a holder

# PR OUT service actions.
SA_REGISTER = 0x00
SA_RESERVE = 0x01
SA_RELEASE = 0x02
SA_CLEAR = 0x03
SA_PREEMPT = 0x04
SA_PREEMPT_AND_ABORT = 0x05
SA_REGISTER_AND_IGNORE = 0x06
# PR IN service actions.
SA_READ_KEYS = 0x00
SA_READ_RESERVATION = 0x01
SA_REPORT_CAPABILITIES = 0x02
SA_READ_FULL_STATUS = 0x03

# Command classes for the conflict check.
ALLOW = "allow"    # never conflicts (INQUIRY, REPORT LUNS, PR IN/OUT, ...)
READ = "read"      # conflicts for non-holders only under exclusive-access types
WRITE = "write"    # conflicts for every non-holder

NexusKey = tuple[str, str]


def nexus_key(nexus: Nexus) -> NexusKey:
    return nexus.key


class ReservationStore(Protocol):
    """Where a LU's persistent reservation state lives between restarts."""

    def load(self) -> dict: ...

    def save(self, state: dict) -> None: ...


class MemoryReservationStore:
    """In-memory store (tests; LUs whose PR state need not survive restarts).

    Round-trips through JSON on save so a state that SQLite could not hold
    fails here too.
    """

    def __init__(self, state: dict | None = None) -> None:
        self.state: dict = copy.deepcopy(state) if state else {}
        self.saves = 0

    def load(self) -> dict:
        return copy.deepcopy(self.state)

    def save(self, state: dict) -> None:
        self.state = json.loads(json.dumps(state))
        self.saves += 1


@dataclass(eq=False)
class Registration:
    initiator: str
    target_port: str
    key: int
    all_tg_pt: bool = False
    transport_id: bytes = b""

    def matches(self, key: NexusKey) -> bool:
        return self.initiator == key[0] and (self.all_tg_pt or self.target_port == key[1])


def iscsi_transport_id(initiator: str) -> bytes:
    """SPC-4 7.6.4.6 iSCSI TransportID for an initiator port name.

    "<name>,i,0x<isid>" gives format 01b (port name with ISID), a bare name
    format 00b. The name is NUL-terminated and padded to a multiple of 4.
    """
    fmt = 0x40 if ",i,0x" in initiator else 0x00
    name = initiator.encode("utf-8", "replace") + b"\x00"
    name += b"\x00" * (-len(name) % 4)
    if len(name) < 20:
        name += b"\x00" * (20 - len(name))
    return bytes((fmt | 0x05, 0)) + struct.pack(">H", len(name)) + name


class Reservations:
    def __init__(self, store: ReservationStore, ua: UnitAttentions, ports: TargetPorts) -> None:
        self.store = store
        self.ua = ua
        self.ports = ports
        self.registrations: list[Registration] = []
        self.holder: Registration | None = None
        self.res_type = 0
        self.generation = 0
        self.aptpl = False
        self.spc2_holder: NexusKey | None = None
        #: called after any change of the state above (ScsiDevice.route_changed)
        self.on_change: Callable[[], None] | None = None
        self._load()

    # -- persistence --------------------------------------------------------
    def state(self) -> dict:
        regs = [{"initiator": r.initiator, "target_port": r.target_port,
                 "key": f"{r.key:016x}", "all_tg_pt": r.all_tg_pt,
                 "transport_id": r.transport_id.hex()} for r in self.registrations]
        res = None
        if self.holder is not None:
            res = {"holder": self.registrations.index(self.holder), "type": self.res_type, "scope": 0}
        return {"version": 1, "aptpl": self.aptpl, "generation": self.generation,
                "registrations": regs, "reservation": res}

    def _save(self) -> None:
        try:
            self.store.save(self.state())
        finally:                # changed in memory either way
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _load(self) -> None:
        try:
            state = self.store.load() or {}
        except Exception:
            log.exception("loading persistent reservations failed; starting without")
            return
        if not state.get("aptpl"):
            return   # no APTPL: a restart is a power loss, which clears PR state
        try:
            self._apply(state)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError):
            log.exception("persistent reservation state is malformed; starting without")

    def _apply(self, state: dict) -> None:
        """Replace the persistent state by a ``state()`` dict (all or nothing)."""
        regs = [Registration(str(r["initiator"]), str(r["target_port"]), int(r["key"], 16),
                             bool(r.get("all_tg_pt")), bytes.fromhex(r.get("transport_id", "")))
                for r in state.get("registrations", [])]
        if any(not 0 < r.key < 1 << 64 for r in regs):
            raise ValueError("reservation key out of range")
        res = state.get("reservation")
        holder = None
        res_type = 0
        if res is not None:
            index = int(res["holder"])
            if not 0 <= index < len(regs):
                raise IndexError(f"reservation holder {index} is not a registration")
            holder = regs[index]
            res_type = int(res["type"])
            if res_type not in VALID_TYPES:
                raise ValueError(f"bad reservation type {res_type}")
        generation = int(state.get("generation", 0)) & 0xFFFFFFFF
        self.registrations, self.holder, self.res_type = regs, holder, res_type
        self.generation, self.aptpl = generation, bool(state.get("aptpl"))

    # -- queries ------------------------------------------------------------
    def registration(self, key: NexusKey) -> Registration | None:
        for r in self.registrations:
            if r.matches(key):
                return r
        return None

    def is_holder(self, key: NexusKey) -> bool:
        if self.holder is None:
            return False
        if self.res_type in _ALL_REGISTRANTS:
            return self.registration(key) is not None
        return self.holder.matches(key)

    def check(self, key: NexusKey, pr_class: str, spc2_allowed: bool) -> None:
        """Raise ReservationConflict if the command may not run for this nexus."""
        if self.spc2_holder is not None and self.spc2_holder != key and not spc2_allowed:
            raise ReservationConflict()
        if self.holder is None or pr_class == ALLOW:
            return
        if self.is_holder(key):
            return
        if self.res_type in _REGISTRANTS_TYPES and self.registration(key) is not None:
            return
        if pr_class == READ and self.res_type in _WRITE_EXCLUSIVE_FAMILY:
            return
        raise ReservationConflict()

    def _nexuses_of(self, regs: list[Registration]) -> list[NexusKey]:
        return [k for k in self.ua.nexuses() if any(r.matches(k) for r in regs)]

    # -- SPC-2 RESERVE / RELEASE --------------------------------------------
    def reserve_spc2(self, key: NexusKey) -> None:
        if self.registrations or (self.spc2_holder is not None and self.spc2_holder != key):
            raise ReservationConflict()
        self.spc2_holder = key
        self._changed()

    def release_spc2(self, key: NexusKey) -> None:
        if self.registrations:
            raise ReservationConflict()
        if self.spc2_holder == key:
            self.spc2_holder = None
            self._changed()

    def reset(self) -> None:
        """LU reset / target reset: SPC-2 reservations go, PR state stays."""
        self.spc2_holder = None
        self._changed()

    def nexus_lost(self, key: NexusKey) -> None:
        if self.spc2_holder == key:
            self.spc2_holder = None
            self._changed()

    # -- PERSISTENT RESERVE IN ----------------------------------------------
    def pr_in(self, cdb: bytes, nexus: Nexus) -> bytes:
        sa = cdb[1] & 0x1F
        alloc = int.from_bytes(cdb[7:9], "big")
        if sa == SA_READ_KEYS:
            keys = b"".join(struct.pack(">Q", r.key) for r in self.registrations)
            data = struct.pack(">II", self.generation, len(keys)) + keys
        elif sa == SA_READ_RESERVATION:
            if self.holder is None:
                data = struct.pack(">II", self.generation, 0)
            else:
                rkey = 0 if self.res_type in _ALL_REGISTRANTS else self.holder.key
                data = struct.pack(">IIQIBBH", self.generation, 16, rkey, 0, 0,
                                   self.res_type & 0xF, 0)
        elif sa == SA_REPORT_CAPABILITIES:
            # ATP_C: ALL_TG_PT supported; PTPL_C: APTPL supported; TMV: the
            # type mask is valid; ALLOW COMMANDS 000b (SPC-4 table 180).
            flags2 = 0x04 | 0x01
            flags3 = 0x80 | (0x01 if self.aptpl else 0)
            mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02   # WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
            data = struct.pack(">HBBBBH", 8, flags2, flags3, mask, 0x01, 0)  # 0x01: EX_AC_AR
        elif sa == SA_READ_FULL_STATUS:
            body = bytearray()
            for r in self.registrations:
                holder = self.holder is not None and (
                    self.res_type in _ALL_REGISTRANTS or r is self.holder)
                tid = r.transport_id or iscsi_transport_id(r.initiator)
                flags = (0x02 if r.all_tg_pt else 0) | (0x01 if holder else 0)
                body += struct.pack(">QIBBIHI", r.key, 0, flags,
                                    (self.res_type & 0xF) if holder else 0, 0,
                                    0 if r.all_tg_pt else self.ports.relative_id(r.target_port),
                                    len(tid))
                body += tid
            data = struct.pack(">II", self.generation, len(body)) + bytes(body)
        else:
            raise invalid_cdb(1, 4)
        return data[:alloc]

    # -- PERSISTENT RESERVE OUT ---------------------------------------------
    def pr_out(self, cdb: bytes, data_out: memoryview | bytes | None, nexus: Nexus) -> None:
        sa = cdb[1] & 0x1F
        scope = cdb[2] >> 4
        rtype = cdb[2] & 0x0F
        plen = int.from_bytes(cdb[5:9], "big")
        if sa not in (SA_REGISTER, SA_RESERVE, SA_RELEASE, SA_CLEAR, SA_PREEMPT,
                      SA_PREEMPT_AND_ABORT, SA_REGISTER_AND_IGNORE):
            raise invalid_cdb(1, 4)
        if plen != 24:
            raise param_list_length_error()
        params = bytes(data_out_view(data_out, 24))
        before = self.state()
        try:
            self._pr_out(sa, scope, rtype, params, nexus)
        except Exception as e:
            if not isinstance(e, (CheckCondition, ReservationConflict)):
                # The store failed (e.g. SQLite): the command fails, and the
                # state the host can observe must be the one still persisted.
                self._apply(before)
            raise

    def _pr_out(self, sa: int, scope: int, rtype: int, params: bytes, nexus: Nexus) -> None:
        rkey, sakey = struct.unpack_from(">QQ", params, 0)
        flags = params[20]
        spec_i_pt, all_tg_pt, aptpl = bool(flags & 0x08), bool(flags & 0x04), bool(flags & 0x01)
        key = nexus_key(nexus)
        if sa in (SA_REGISTER, SA_REGISTER_AND_IGNORE):
            if spec_i_pt:
                raise invalid_param(20, 3)
            self._register(key, nexus, rkey, sakey, all_tg_pt, aptpl,
                           ignore=(sa == SA_REGISTER_AND_IGNORE))
            return
        if sa in (SA_RESERVE, SA_RELEASE, SA_PREEMPT, SA_PREEMPT_AND_ABORT):
            if scope != 0:
                raise invalid_cdb(2, 7)
            if rtype not in VALID_TYPES:
                raise invalid_cdb(2, 3)
        reg = self.registration(key)
        if reg is None or reg.key != rkey:
            raise ReservationConflict()
        if sa == SA_RESERVE:
            self._reserve(key, reg, rtype)
        elif sa == SA_RELEASE:
            self._release(key, rtype)
        elif sa == SA_CLEAR:
            self._clear(key)
        else:
            self._preempt(key, reg, sakey, rtype)

    def _register(self, key: NexusKey, nexus: Nexus, rkey: int, sakey: int,
                  all_tg_pt: bool, aptpl: bool, *, ignore: bool) -> None:
        reg = self.registration(key)
        if reg is None:
            if not ignore and rkey != 0:
                raise ReservationConflict()
            if sakey == 0:
                return     # unregistering an unregistered nexus: nothing to do
            self.registrations.append(Registration(key[0], key[1], sakey, all_tg_pt,
                                                   bytes(nexus.transport_id)))
        else:
            if not ignore and rkey != reg.key:
                raise ReservationConflict()
            if sakey == 0:
                self._unregister(reg)
            else:
                reg.key = sakey
        self.aptpl = aptpl
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        self._save()

    def _unregister(self, reg: Registration) -> None:
        self.registrations.remove(reg)
        if self.holder is None:
            return
        if self.res_type in _ALL_REGISTRANTS:
            if not self.registrations:
                self.holder = None
            elif self.holder is reg:
                self.holder = self.registrations[0]   # any remaining registrant holds it
        elif self.holder is reg:
            released_type = self.res_type
            self.holder = None
            if released_type in _REGISTRANTS_TYPES:
                self.ua.establish(c.ASC_RESERVATIONS_RELEASED, self._nexuses_of(self.registrations))

    def _reserve(self, key: NexusKey, reg: Registration, rtype: int) -> None:
        if self.holder is None:
            self.holder, self.res_type = reg, rtype
            self._save()
            return
        if self.is_holder(key) and self.res_type == rtype:
            return
        raise ReservationConflict()

    def _release(self, key: NexusKey, rtype: int) -> None:
        if self.holder is None or not self.is_holder(key):
            return   # SPC-4: releasing what one does not hold is GOOD, no effect
        if rtype != self.res_type:
            raise CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_RELEASE_OF_PR)
        released_type = self.res_type
        self.holder = None
        self.res_type = 0
        if released_type in _REGISTRANTS_TYPES:
            self.ua.establish(c.ASC_RESERVATIONS_RELEASED,
                              self._nexuses_of(self.registrations), exclude=key)
        self._save()

    def _clear(self, key: NexusKey) -> None:
        others = [k for k in self._nexuses_of(self.registrations) if k != key]
        self.registrations = []
        self.holder = None
        self.res_type = 0
        self.ua.establish(c.ASC_RESERVATIONS_PREEMPTED, others)
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        self._save()

    def _preempt(self, key: NexusKey, reg: Registration, sakey: int, rtype: int) -> None:
        holder_key = None
        if self.holder is not None and self.res_type not in _ALL_REGISTRANTS:
            holder_key = self.holder.key
        all_reg_preempt_all = (self.holder is not None and self.res_type in _ALL_REGISTRANTS
                               and sakey == 0)
        if all_reg_preempt_all:
            victims = [r for r in self.registrations if r is not reg]
        else:
            if sakey == 0:
                raise invalid_param(8)
            victims = [r for r in self.registrations if r.key == sakey and r is not reg]
            if not victims and not (holder_key == sakey or reg.key == sakey):
                raise ReservationConflict()
        takes_reservation = all_reg_preempt_all or (holder_key is not None and holder_key == sakey)
        for r in victims:
            self.registrations.remove(r)
        self.ua.establish(c.ASC_REGISTRATIONS_PREEMPTED, self._nexuses_of(victims))
        if takes_reservation:
            self.holder, self.res_type = reg, rtype
        elif self.holder is not None and self.holder not in self.registrations:
            # Only an all-registrants holder can vanish here; pass it on.
            self.holder = self.registrations[0] if self.registrations else None
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        self._save()
