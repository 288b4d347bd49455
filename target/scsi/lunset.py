"""LunSet: the LUNs behind one target port group — the ScsiTarget that
transports call.

It routes each command to its ScsiDevice and answers for LUNs that do not
exist the way SPC-4/SAM-5 want: INQUIRY gets peripheral qualifier 011b /
type 1Fh, REQUEST SENSE reports LOGICAL UNIT NOT SUPPORTED as parameter
data, REPORT LUNS is served at LUN 0 even when no LU 0 exists, and anything
else fails with ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
"""
from __future__ import annotations

import asyncio
import logging

from . import constants as c
from . import inquiry as inq
from . import spc
from .api import CHECK_CONDITION, GOOD, Nexus, ScsiCommand, ScsiResponse, Submitted
from .cdb import be
from .device import ScsiDevice
from .identity import DeviceIdentity
from .ports import TargetPorts
from .sense import CheckCondition, encode_sense

log = logging.getLogger(__name__)

_PLACEHOLDER = DeviceIdentity(product_id="liverestore", revision="0001", serial="none",
                              naa="5000000000000000", t10_vendor_id="none")


class LunSet:
    def __init__(self, devices: dict[int, ScsiDevice] | None = None, *,
                 ports: TargetPorts | None = None,
                 identity: DeviceIdentity | None = None) -> None:
        """``identity`` supplies vendor/product/revision for INQUIRY to an
        absent LUN (defaults to a liverestore placeholder)."""
        self.ports = ports or TargetPorts()
        self.identity = identity or _PLACEHOLDER
        self._devices: dict[int, ScsiDevice] = {}
        for lun, dev in (devices or {}).items():
            self._attach(lun, dev)

    # -- inventory ----------------------------------------------------------------
    def _attach(self, lun: int, dev: ScsiDevice) -> None:
        if not 0 <= lun < 16384:
            raise ValueError(f"LUN {lun} outside single-level addressing (0..16383)")
        if lun in self._devices:
            raise ValueError(f"LUN {lun} already present")
        dev.ports = self.ports
        dev.pr.ports = self.ports
        dev.lun_list = self.luns
        self._devices[lun] = dev

    def add(self, lun: int, dev: ScsiDevice) -> None:
        self._attach(lun, dev)
        self._inventory_changed(lun)

    def remove(self, lun: int) -> ScsiDevice:
        dev = self._devices.pop(lun)
        dev.route_changed()             # nobody answers for it any more
        self._inventory_changed(lun)
        return dev

    def device(self, lun: int) -> ScsiDevice | None:
        return self._devices.get(lun)

    def _inventory_changed(self, changed: int) -> None:
        # SPC-4: REPORTED LUNS DATA HAS CHANGED on every LU, for every nexus.
        for lun, dev in self._devices.items():
            if lun != changed:
                dev.lun_inventory_changed()

    # -- ScsiTarget ---------------------------------------------------------------
    def luns(self) -> list[int]:
        return sorted(self._devices)

    def submit(self, cmd: ScsiCommand) -> Submitted:
        dev = self._devices.get(cmd.lun)
        if dev is not None:
            return dev.submit(cmd)
        try:
            return self._absent(cmd)
        except CheckCondition as e:
            return ScsiResponse(CHECK_CONDITION, sense=e.encode(False))
        except Exception:  # noqa: BLE001 - never into the transport
            log.exception("internal error for absent LUN %s", cmd.lun)
            return ScsiResponse(CHECK_CONDITION, sense=encode_sense(
                c.HARDWARE_ERROR, c.ASC_INTERNAL_TARGET_FAILURE))

    async def execute(self, cmd: ScsiCommand) -> ScsiResponse:
        r = self.submit(cmd)
        return r if r.__class__ is ScsiResponse else await r

    def _absent(self, cmd: ScsiCommand) -> ScsiResponse:
        cdb = bytes(cmd.cdb)
        op = cdb[0] if cdb else None
        if op == c.INQUIRY and len(cdb) >= 6:
            if cdb[1] & 0x03 or cdb[2]:
                raise CheckCondition(c.ILLEGAL_REQUEST, c.ASC_LU_NOT_SUPPORTED)
            return ScsiResponse(GOOD, data_in=inq.standard(
                self.identity, peripheral=inq.PQ_NOT_CONNECTED_NO_LU)[:be(cdb, 3, 5)])
        if op == c.REPORT_LUNS and cmd.lun == 0 and len(cdb) >= 12:
            return ScsiResponse(GOOD, data_in=spc.report_luns_data(cdb, self.luns()))
        if op == c.REQUEST_SENSE and len(cdb) >= 6:
            data = encode_sense(c.ILLEGAL_REQUEST, c.ASC_LU_NOT_SUPPORTED,
                                descriptor=bool(cdb[1] & 0x01))
            return ScsiResponse(GOOD, data_in=data[:cdb[4]])
        raise CheckCondition(c.ILLEGAL_REQUEST, c.ASC_LU_NOT_SUPPORTED)

    async def lun_reset(self, lun: int, nexus: Nexus) -> None:
        dev = self._devices.get(lun)
        if dev is not None:
            await dev.lun_reset(nexus)

    async def target_reset(self, nexus: Nexus) -> None:
        await asyncio.gather(*(d.target_reset(nexus) for d in self._devices.values()))

    def nexus_lost(self, nexus: Nexus) -> None:
        for dev in self._devices.values():
            dev.nexus_lost(nexus)
