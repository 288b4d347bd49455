"""ScsiDevice: one logical unit, emulated over a LunIO.

``submit`` (and ``execute``, its awaitable form) runs the checks every
command goes through, in SAM/SPC order, then the handler from the command
table:

1. unit attentions of this I_T nexus (after noticing LunIO generation or
   capacity changes), unless the opcode is exempt;
2. opcode / service action known, CDB long enough, NACA not set;
3. reservation conflicts (SPC-2, then persistent reservations);
4. LU access state: NOT READY, or DATA PROTECT for writes when read-only;
5. the handler, which validates its own fields.

A command goes through these once (``submit``): the CDB is decoded once
(commands.decode) and a READ/WRITE asks the LunIO once where it goes
(LunIO.route_read/route_write): straight to the store, done before submit
returns, or the work still to do, awaited from there.

Nothing raises out of submit()/execute(): CheckCondition becomes sense data
in the format the control mode page asks for, LunIO errors are mapped, any other
exception becomes HARDWARE ERROR / INTERNAL TARGET FAILURE with a logged
traceback. Commands run concurrently; the only ordering is the range lock
between COMPARE AND WRITE and overlapping writes.
"""
from __future__ import annotations

import logging
from asyncio import Future
from functools import partial
from time import perf_counter
from types import CoroutineType
from typing import Any, Callable, Coroutine

from restore_core.lunio import Access, LunIO
from target.logsafe import NAME_CLIP, RateLimitedLog, clip

from . import constants as c
from .api import (CHECK_CONDITION, GOOD, RESERVATION_CONFLICT, Deferred, Nexus, ScsiCommand,
                  ScsiResponse)
from .commands import UA_EXEMPT, Cdb, CommandSpec, decode
from .identity import DeviceIdentity, DeviceOptions, Limits
from .lustats import LuStats
from .lunio_access import map_lunio_error, not_ready, write_protected
from .modepages import ModePages
from .ports import TargetPorts
from .pr import MemoryReservationStore, ReservationStore, Reservations, nexus_key
from .rangelock import RangeLock
from .sbc import PLACED, ReadInFlight, read_failed
from .sense import CheckCondition, ReservationConflict, invalid_cdb, invalid_opcode
from .ua import UnitAttentions

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)     # for what a client can trigger once per command


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
        self.stats = LuStats()          # read at scrape time (target.metrics)
        self.ua = UnitAttentions()
        self.pr = Reservations(reservations if reservations is not None
                               else MemoryReservationStore(), self.ua, self.ports)
        self.mode = ModePages(self.options.write_cache)
        self.range_lock = RangeLock()
        self.lun_list: Callable[[], list[int]] = lambda: [0]   # LunSet replaces it
        self._generation = lunio.generation
        self._size = lunio.size
        # the capacity every command is checked against: the LunIO's size
        # as the command's dispatch saw it (a change is noticed there, with
        # its unit attention, before any handler runs); kept with _size
        self.num_blocks = self._size // block_size
        self._last_access: Access | None = None
        # who answers plain READ/WRITEs without asking submit (watch_route)
        self._route_watchers: list[Callable[[], None]] = []
        self.ua.on_queue = self.pr.on_change = self.mode.on_change = self.route_changed

    # -- state the handlers read -------------------------------------------------
    def read_only(self) -> bool:
        return self.options.read_only or self.lunio.access_state().access is Access.READ_ONLY

    def direct_refusal(self, nexus: Nexus) -> str | None:
        """Why this nexus's plain READ/WRITEs need a check here beyond their
        own CDB fields right now, or None when they do not (a transport that
        answers them itself asks): a unit attention to report, a reservation,
        read-only, the write cache off, a COMPARE AND WRITE holding a range,
        or a LunIO change for dispatch to notice first. The LunIO's own say
        is its direct lease."""
        key = nexus.key
        lunio = self.lunio
        if key not in self.ua.nexuses() or self.ua.pending(key):
            return "unit attention"
        if self.pr.holder is not None or self.pr.registrations or self.pr.spc2_holder is not None:
            return "reservation"
        if self.options.read_only:
            return "read-only"
        if not self.mode.write_cache:
            return "write cache off"
        if self.range_lock.exclusive_pending:
            return "COMPARE AND WRITE"
        if lunio.generation != self._generation or lunio.size != self._size:
            return "LU changed"
        return None

    def watch_route(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed`` (on the loop, synchronously) right after any
        change that may make direct_refusal say no for some nexus -- a unit
        attention queued, a reservation or mode page changed, the LunIO's size
        or generation noticed, the LU taken out of its LunSet -- whether a
        command of any transport or a control request made it. A transport
        that answers plain commands itself stops there (it must not block
        nor re-publish from inside the change; it re-checks later). Returns
        the function that stops the calls."""
        self._route_watchers.append(changed)

        def unwatch() -> None:
            if changed in self._route_watchers:
                self._route_watchers.remove(changed)
        return unwatch

    def route_changed(self) -> None:
        for changed in self._route_watchers[:]:
            changed()

    def lunio_changed(self) -> None:
        """The LunIO's size or generation changed outside a command (a
        control request: the volume grown): queue its unit attention now,
        not at the next command's dispatch, so that no transport answers a
        command as if nothing happened."""
        lunio = self.lunio
        if lunio.generation != self._generation or lunio.size != self._size:
            self._poll_lunio()

    # -- transport-facing ----------------------------------------------------------
    def submit(self, cmd: ScsiCommand) -> ScsiResponse | Coroutine[Any, Any, ScsiResponse]:
        """Run one command along one path: the CDB decoded once, the checks
        above made once, then its handler. A command that needs nothing
        waited for -- a READ/WRITE the LunIO routes straight to the store --
        returns its response at once; any other returns a coroutine that
        finishes it from where it stopped (nothing is decoded or checked
        again). Nothing raises out of it but cancellation."""
        t0 = perf_counter()
        cdb = cmd.cdb
        if type(cdb) is not bytes:
            cdb = bytes(cdb)
        d = decode(cdb, self.block_size)
        try:
            out = self._dispatch(cmd, d)
            if type(out) is CoroutineType:
                return self._finish(out, cmd, d, t0)
            if out.__class__ is ReadInFlight:
                # answered when the store's read is done, from its done-
                # callback where the transport can: no coroutine and no Task
                # per read (through iSCSI on an RBD LU those were a third of
                # the loop's CPU per 4 KiB read)
                return Deferred(out.work, partial(self._read_answer, out, cmd, d, t0))  # type: ignore[attr-defined]
            resp = self._respond(out, d)
        except Exception as e:  # noqa: BLE001 - the transport must never see it
            resp = self._failed(e, cmd, d)
        self.stats.record(d, cmd, resp, perf_counter() - t0)
        return resp

    async def execute(self, cmd: ScsiCommand) -> ScsiResponse:
        r = self.submit(cmd)
        return r if r.__class__ is ScsiResponse else await r

    async def _finish(self, work: Coroutine[Any, Any, object], cmd: ScsiCommand,
                      d: Cdb, t0: float) -> ScsiResponse:
        try:
            resp = self._respond(await work, d)
        except Exception as e:  # noqa: BLE001 - the transport must never see it
            resp = self._failed(e, cmd, d)
        self.stats.record(d, cmd, resp, perf_counter() - t0)
        return resp

    def _read_answer(self, read: ReadInFlight, cmd: ScsiCommand, d: Cdb, t0: float,
                     work: Future[None]) -> ScsiResponse:
        """The answer to a READ that was in flight in its store (the
        Deferred's finish), once ``work`` is done and not cancelled."""
        try:
            e = work.exception()
            if e is not None:
                raise read_failed(self, e, read.lba)
            resp = self._respond(read.data, d)
        except Exception as e:  # noqa: BLE001 - the transport must never see it
            resp = self._failed(e, cmd, d)
        self.stats.record(d, cmd, resp, perf_counter() - t0)
        return resp

    @staticmethod
    def _respond(out: object, d: Cdb) -> ScsiResponse:
        # d.data_out: the SCSI transfer length of a Data-Out command, which
        # only the CDB knows: the transport derives residuals from it
        # (Data-In commands' transfer length is len(data_in)), failed or not.
        if out is PLACED:
            return ScsiResponse(GOOD, b"", b"", d.data_out, True)
        return ScsiResponse(GOOD, b"", b"" if out is None else out, d.data_out)  # type: ignore[arg-type]

    def _failed(self, e: Exception, cmd: ScsiCommand, d: Cdb) -> ScsiResponse:
        """The response for an exception out of the checks or the handler
        (called in its except clause, for the traceback)."""
        if isinstance(e, CheckCondition):
            resp = self._check_condition(e, cmd)
        elif isinstance(e, ReservationConflict):
            resp = ScsiResponse(RESERVATION_CONFLICT)
        else:
            mapped = map_lunio_error(e, self.block_size)
            if mapped is not None:
                resp = self._check_condition(mapped, cmd)
            else:
                log.exception("internal error executing CDB %s on %s", d.raw.hex(),
                              self.identity.serial)
                resp = self._check_condition(
                    CheckCondition(c.HARDWARE_ERROR, c.ASC_INTERNAL_TARGET_FAILURE), cmd)
        resp.transfer_length = d.data_out
        return resp

    def _check_condition(self, e: CheckCondition, cmd: ScsiCommand) -> ScsiResponse:
        if e.key == c.MEDIUM_ERROR:
            # one burst per LU: a failing LU does not hide another's first error
            serial = self.identity.serial
            ratelog.warning(f"medium-error {serial}", "LU %s: CDB %s: %s", serial,
                            bytes(cmd.cdb[:1]).hex(), e)
        elif e.key in (c.NOT_READY, c.DATA_PROTECT):
            log.debug("LU %s: CDB %s: %s", self.identity.serial, bytes(cmd.cdb[:1]).hex(), e)
        return ScsiResponse(CHECK_CONDITION, sense=e.encode(self.mode.descriptor_sense))

    def _dispatch(self, cmd: ScsiCommand, d: Cdb) -> object:
        """The checks, then the handler's result (or its coroutine). A check
        that can hold for a plain READ/WRITE needs its condition in
        direct_refusal too: the native TCMU ring loop skips these."""
        cdb, spec = d.raw, d.spec
        if not cdb:
            raise invalid_opcode()
        key = cmd.nexus.key
        pending_ua = self.ua.register(key)
        lunio = self.lunio
        if lunio.generation != self._generation or lunio.size != self._size:
            self._poll_lunio()
        if pending_ua and cdb[0] not in UA_EXEMPT:
            raise CheckCondition(c.UNIT_ATTENTION, pending_ua.popleft())
        if spec.__class__ is not CommandSpec:
            if spec is None:
                raise invalid_opcode()
            raise invalid_cdb(1, 4)          # unsupported service action
        if len(cdb) < spec.cdb_len:
            raise CheckCondition(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_CDB,
                                 message="CDB shorter than its opcode requires")
        if cdb[spec.cdb_len - 1] & 0x04:
            raise invalid_cdb(spec.cdb_len - 1, 2)   # NACA: no ACA support
        pr = self.pr
        if pr.holder is not None or pr.spc2_holder is not None:     # (else nothing to check)
            pr.check(key, spec.pr, spec.spc2_ok)
        if spec.needs_ready or spec.writes:
            st = lunio.access_state()
            if st.access is not self._last_access:
                self._note_access(st.access, st.reason)
            if spec.needs_ready and st.access is Access.NOT_READY:
                raise not_ready(st.reason)
            if spec.writes and (st.access is Access.READ_ONLY or self.options.read_only):
                raise write_protected(st.reason)
        return spec.handler(self, cmd, d)

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
            self.num_blocks = size // self.block_size
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
