"""SPIKE (docs/native-lane.md): the published route of a session's native
READ lane (target/iscsi/_nativelane.c).

The route is published, not re-made per command, as the TCMU native ring
does (target/tcmu/native_device.py): a LUN is direct for this session while
its ScsiDevice says this nexus's plain READ/WRITEs need no check beyond
their CDB (``direct_refusal``) and the session holds the LunIO's
:class:`~restore_core.direct.DirectLease` on a file store. Unlike a TCMU
device, an iSCSI LU has several nexuses: a command of any session of the
target that is not a plain READ/WRITE may change what every session may do
(a reservation, a unit attention, MODE SELECT), so its delivery takes every
session's lane back (``hold``) and its end re-checks them; the lease's
on_change and a poll every ``ROUTE_CHECK_S`` are the net under both. The
lane answers commands inside its scan, on the loop's thread, so taking a
LUN back needs no waiting: no native command is ever in flight.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from restore_core.direct import DirectLease
from restore_core.stores.file import FileBlockStore
from target.scsi.device import ScsiDevice

try:
    from ._nativelane import Lane
except ImportError:             # not built
    Lane = None

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger(__name__)

#: LIVERESTORE_ISCSI_LANE=1 turns the spike on (off by default: not merged)
ENABLED = Lane is not None and os.environ.get("LIVERESTORE_ISCSI_LANE") == "1"
ROUTE_CHECK_S = 0.1
#: opcodes that cannot change any nexus's route (the lane answers the reads)
PLAIN_IO = frozenset((0x28, 0x2A, 0x88, 0x8A))
MAX_LANE_LUN = 255
#: id(target config) -> commands of its sessions that may change a route,
#: running now: while any runs, no lane of the target answers
HOLDS: dict[int, int] = {}


class SessionLane:
    def __init__(self, session: "Session") -> None:
        self.session = session
        self.native = Lane()
        self._leases: dict[int, tuple[DirectLease, int]] = {}
        self._scsi_target: Any = None
        self._closed = False
        self._timer = session.conn.loop.call_later(ROUTE_CHECK_S, self._poll)

    # -- the route --------------------------------------------------------------
    def _devices(self) -> dict[int, ScsiDevice]:
        st = self.session.target.scsi_target if self.session.target is not None else None
        if isinstance(st, ScsiDevice):
            return {0: st}
        luns = getattr(st, "luns", None)
        if luns is None or not hasattr(st, "device"):
            return {}
        out = {}
        for lun in luns():
            dev = st.device(lun)
            if isinstance(dev, ScsiDevice) and lun <= MAX_LANE_LUN:
                out[lun] = dev
        return out

    def check(self) -> None:
        """Publish each LUN this nexus may read directly; take back the
        others."""
        s = self.session
        if self._closed or s.closed or s.logging_out or HOLDS.get(id(s.target)):
            self.revoke_all()
            return
        st = s.target.scsi_target if s.target is not None else None
        if st is not self._scsi_target:
            self.revoke_all()
            self._scsi_target = st
        devices = self._devices()
        for lun in list(self._leases):
            dev = devices.get(lun)
            lease = self._leases[lun][0]
            if dev is None or not lease.valid() or dev.direct_refusal(s.nexus) is not None:
                self._revoke(lun)
        for lun, dev in devices.items():
            if lun in self._leases or dev.direct_refusal(s.nexus) is not None:
                continue
            get = getattr(dev.lunio, "direct_lease", None)
            lease = get() if get is not None else None
            if lease is None:
                continue
            store = lease.store
            if not isinstance(store, FileBlockStore) or store.size < dev.num_blocks * dev.block_size:
                lease.release()
                continue
            fd = os.dup(store.fd)
            self._leases[lun] = (lease, fd)
            lease.on_change = self.check
            self.native.set_lun(lun, fd, dev.block_size, dev.num_blocks, dev.limits.max_transfer)

    def _revoke(self, lun: int) -> None:
        lease, fd = self._leases.pop(lun)
        self.native.set_lun(lun, -1)
        os.close(fd)
        lease.release()

    def revoke_all(self) -> None:
        for lun in list(self._leases):
            self._revoke(lun)

    def _poll(self) -> None:
        if self._closed:
            return
        try:
            self.check()
        except Exception:
            log.exception("session %s: lane route check failed", self.session.tsih)
            self.revoke_all()
        self._timer = self.session.conn.loop.call_later(ROUTE_CHECK_S, self._poll)

    def close(self) -> None:
        self._closed = True
        log.info("session %s: the lane answered %d READs (%d would have waited for the disk)",
                 self.session.tsih, self.native.commands, self.native.would_block)
        self._timer.cancel()
        self.revoke_all()
