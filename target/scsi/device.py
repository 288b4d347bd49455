"""ScsiDevice: one logical unit, emulated over a LunIO.

``execute`` runs the checks every command goes through, in SAM/SPC order,
then the handler from the command table:

1. unit attentions of this I_T nexus (after noticing LunIO generation or
   capacity changes), unless the opcode is exempt;
2. opcode / service action known, CDB long enough, NACA not set;
3. reservation conflicts (SPC-2, then persistent reservations);
4. LU access state: NOT READY, or DATA PROTECT for writes when read-only;
5. the handler, which validates its own fields.

Nothing raises out of execute(): CheckCondition becomes sense data in the
format the control mode page asks for, LunIO errors are mapped, and any other
exception becomes HARDWARE ERROR / INTERNAL TARGET FAILURE with a logged
traceback. Commands run concurrently; the only ordering is the range lock
between COMPARE AND WRITE and overlapping writes.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from restore_core.lunio import Access, LunIO
from target.logsafe import NAME_CLIP, RateLimitedLog, clip

from . import constants as c
from .api import CHECK_CONDITION, GOOD, RESERVATION_CONFLICT, Nexus, ScsiCommand, ScsiResponse
from .commands import UA_EXEMPT, Cdb, CommandSpec, decode
from .identity import DeviceIdentity, DeviceOptions, Limits
from .lunio_access import map_lunio_error, not_ready, write_protected
from .modepages import ModePages
from .ports import TargetPorts
from .pr import MemoryReservationStore, ReservationStore, Reservations, nexus_key
from .rangelock import RangeLock
from .sense import CheckCondition, ReservationConflict, invalid_cdb, invalid_opcode
from .ua import UnitAttentions

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)     # for what a client can trigger once per command

# READ/WRITE(10/16), the commands try_execute serves: opcode -> writes
_FAST_RW = {c.READ_10: False, c.WRITE_10: True, c.READ_16: False, c.WRITE_16: True}


class ScsiDevice:
    """One SCSI direct-access block device (peripheral type 00h).

    ``reservations`` persists PERSISTENT RESERVE state (JSON-serialisable
    dicts); ``ports`` maps target port names to relative port numbers and is
    normally shared by all LUs of a target (LunSet passes its own).
    """

    def __init__(self, lunio: LunIO, identity: DeviceIdentity, *, block_size: int = 512,
                 reservations: ReservationStore | None = None,
                 options: DeviceOptions | None = None,
                 ports: TargetPorts | None = None) -> None:
        self.lunio = lunio
        self.identity = identity
        self.options = options or DeviceOptions()
        self.limits = Limits.resolve(block_size, self.options)
        self.block_size = block_size
        self.ports = ports or TargetPorts()
        self.ua = UnitAttentions()
        self.pr = Reservations(reservations if reservations is not None
                               else MemoryReservationStore(), self.ua, self.ports)
        self.mode = ModePages(self.options.write_cache)
        self.range_lock = RangeLock()
        self.lun_list: Callable[[], list[int]] = lambda: [0]   # LunSet replaces it
        self._generation = lunio.generation
        self._size = lunio.size
        self._last_access: Access | None = None
        # the LunIO's optional synchronous fast path (try_execute)
        self._try_read = getattr(lunio, "try_readinto", None)
        self._try_write = getattr(lunio, "try_write", None)
        if self._try_write is None:
            self._try_read = None

    # -- state the handlers read -------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.lunio.size // self.block_size

    def read_only(self) -> bool:
        return self.options.read_only or self.lunio.access_state().access is Access.READ_ONLY

    # -- transport-facing ----------------------------------------------------------
    async def execute(self, cmd: ScsiCommand) -> ScsiResponse:
        cdb = cmd.cdb
        if type(cdb) is not bytes:
            cdb = bytes(cdb)
        d = decode(cdb, self.block_size)
        try:
            data = await self._execute(cmd, d)
            resp = ScsiResponse(GOOD, b"", b"" if data is None else data)
        except CheckCondition as e:
            resp = self._check_condition(e, cmd)
        except ReservationConflict:
            resp = ScsiResponse(RESERVATION_CONFLICT)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the transport must never see it
            mapped = map_lunio_error(e, self.block_size)
            if mapped is not None:
                resp = self._check_condition(mapped, cmd)
            else:
                log.exception("internal error executing CDB %s on %s", cdb.hex(),
                              self.identity.serial)
                resp = self._check_condition(
                    CheckCondition(c.HARDWARE_ERROR, c.ASC_INTERNAL_TARGET_FAILURE), cmd)
        # The SCSI transfer length of a Data-Out command, which only the CDB
        # knows: the transport derives residuals from it (Data-In commands'
        # transfer length is len(data_in)), failed or not.
        resp.transfer_length = d.data_out
        return resp

    def try_execute(self, cmd: ScsiCommand,
                    into: list[memoryview] | None = None) -> ScsiResponse | None:
        """The fast path: a READ/WRITE(10/16) that nothing stands in the way
        of -- no unit attention due, no reservation conflict, the LU ready and
        unchanged, no COMPARE AND WRITE, no FUA, lengths that match the
        CDB -- done synchronously through LunIO.try_readinto/try_write, with
        GOOD. None: nothing was done, ``await execute(cmd)`` (which also
        makes every error's sense). ``into``: the transport's Data-In buffers
        for a read (then the response carries no data), else a new buffer."""
        cdb = cmd.cdb
        writing = _FAST_RW.get(cdb[0]) if cdb else None
        if writing is None or self._try_read is None:
            return None
        d = decode(cdb, self.block_size)
        spec = d.spec
        assert isinstance(spec, CommandSpec)
        if len(cdb) < spec.cdb_len or cdb[1] & 0xE0 or cdb[spec.cdb_len - 1] & 0x04:
            return None
        if writing and (cdb[1] & 0x08 or not self.mode.write_cache or self.range_lock.exclusive_pending):
            return None                          # FUA, write-through, or an ATS around
        key = nexus_key(cmd.nexus)
        if not self.ua.quiet(key):
            return None
        try:
            self.pr.check(key, spec.pr, spec.spc2_ok)        # the full path's own check
        except ReservationConflict:
            return None
        lunio = self.lunio
        if lunio.generation != self._generation or lunio.size != self._size:
            return None
        access = lunio.access_state().access
        if access is not self._last_access or access is Access.NOT_READY:
            return None                          # a change to note first, or an error
        if writing and (access is not Access.READ_WRITE or self.options.read_only):
            return None
        lba, blocks = d.lba, d.count
        bs = self.block_size
        if not 0 < blocks <= self.limits.max_transfer or lba + blocks > self._size // bs:
            return None
        n = blocks * bs
        if writing:
            data = cmd.data_out
            if data is None or len(data) != n or not self._try_write(lba * bs, [data]):
                return None
            return ScsiResponse(GOOD, b"", b"", n)
        if cmd.expected_in != n:
            return None
        if into is not None:
            if sum(map(len, into)) != n or not self._try_read(lba * bs, into):
                return None
            return ScsiResponse(GOOD)
        buf = bytearray(n)
        if not self._try_read(lba * bs, [memoryview(buf)]):
            return None
        return ScsiResponse(GOOD, b"", buf)

    def _check_condition(self, e: CheckCondition, cmd: ScsiCommand) -> ScsiResponse:
        if e.key == c.MEDIUM_ERROR:
            # one burst per LU: a failing LU does not hide another's first error
            serial = self.identity.serial
            ratelog.warning(f"medium-error {serial}", "LU %s: CDB %s: %s", serial,
                            bytes(cmd.cdb[:1]).hex(), e)
        elif e.key in (c.NOT_READY, c.DATA_PROTECT):
            log.debug("LU %s: CDB %s: %s", self.identity.serial, bytes(cmd.cdb[:1]).hex(), e)
        return ScsiResponse(CHECK_CONDITION, sense=e.encode(self.mode.descriptor_sense))

    async def _execute(self, cmd: ScsiCommand, d: Cdb) -> object:
        cdb, spec = d.raw, d.spec
        if not cdb:
            raise invalid_opcode()
        key = nexus_key(cmd.nexus)
        self.ua.register(key)
        self._poll_lunio()
        if cdb[0] not in UA_EXEMPT:
            ua = self.ua.pop(key)
            if ua is not None:
                raise CheckCondition(c.UNIT_ATTENTION, ua)
        if spec is None:
            raise invalid_opcode()
        if spec == -1:
            raise invalid_cdb(1, 4)          # unsupported service action
        assert isinstance(spec, CommandSpec)
        if len(cdb) < spec.cdb_len:
            raise CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_CDB,
                                 message="CDB shorter than its opcode requires")
        if cdb[spec.cdb_len - 1] & 0x04:
            raise invalid_cdb(spec.cdb_len - 1, 2)   # NACA: no ACA support
        self.pr.check(key, spec.pr, spec.spc2_ok)
        if spec.needs_ready or spec.writes:
            st = self.lunio.access_state()
            self._note_access(st.access, st.reason)
            if spec.needs_ready and st.access is Access.NOT_READY:
                raise not_ready(st.reason)
            if spec.writes and (st.access is Access.READ_ONLY or self.options.read_only):
                raise write_protected(st.reason)
        return await spec.handler(self, cmd, d)

    def _note_access(self, access: Access, reason: str) -> None:
        if access is not self._last_access:
            if self._last_access is not None or access is not Access.READ_WRITE:
                log.info("LU %s is now %s%s", self.identity.serial, access.value,
                         f" ({reason})" if reason else "")
            self._last_access = access

    def _poll_lunio(self) -> None:
        """Turn LunIO generation / size changes into unit attentions."""
        gen = self.lunio.generation
        if gen != self._generation:
            self._generation = gen
            log.info("LU %s: data changed underneath (generation %s)", self.identity.serial, gen)
            self.ua.establish(c.ASC_MEDIUM_MAY_HAVE_CHANGED)
        size = self.lunio.size
        if size != self._size:
            self._size = size
            log.info("LU %s: capacity now %d bytes", self.identity.serial, size)
            self.ua.establish(c.ASC_CAPACITY_DATA_HAS_CHANGED)

    # -- task management -------------------------------------------------------
    async def lun_reset(self, nexus: Nexus | None = None) -> None:
        """LOGICAL UNIT RESET: SPC-2 reservations and mode pages go back,
        persistent reservations stay (SPC-4 5.13.1); every I_T nexus,
        the issuer's included (SAM-5 7.7), gets BUS DEVICE RESET FUNCTION
        OCCURRED. ``nexus`` (the issuer) is for logging only."""
        if nexus is not None:
            ratelog.info("lu-reset", "LU %s reset by %s", self.identity.serial, clip(nexus.initiator, NAME_CLIP))
        self.pr.reset()
        self.mode.reset()
        self.ua.reset(c.ASC_BUS_DEVICE_RESET)

    async def target_reset(self, nexus: Nexus | None = None) -> None:
        """TARGET (warm/cold) RESET as seen by this LU: as a LU reset, with
        POWER ON, RESET, OR BUS DEVICE RESET OCCURRED."""
        self.pr.reset()
        self.mode.reset()
        self.ua.reset(c.ASC_POWER_ON_RESET)

    def nexus_lost(self, nexus: Nexus) -> None:
        """Drop per-nexus state; registrations survive (they are per I_T
        nexus identity, not per connection)."""
        key = nexus_key(nexus)
        self.pr.nexus_lost(key)
        self.ua.forget(key)

    def lun_inventory_changed(self) -> None:
        self.ua.establish(c.ASC_REPORTED_LUNS_DATA_HAS_CHANGED)
