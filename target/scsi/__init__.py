"""Transport-agnostic SPC/SBC emulation over a LunIO.

Transports (iSCSI, TCMU) talk to a ``LunSet`` through the ``ScsiTarget``
protocol in ``api``; the daemon builds one ``ScsiDevice`` per LU from a
LunIO, a ``DeviceIdentity``, a ``ReservationStore`` and ``DeviceOptions``::

    dev = ScsiDevice(lunio, DeviceIdentity(product_id="liverestore", revision="0001",
                                           serial=serial, naa="6001405" + hex25,
                                           t10_vendor_id=serial),
                     block_size=512, reservations=store, options=DeviceOptions())
    target = LunSet({0: dev}, ports=TargetPorts({"iqn...:tgt,t,0x1": 1}))
    resp = await target.execute(ScsiCommand(cdb, lun, nexus, data_out))

Transports use ``submit`` instead (api.submitter): the same, but a command
that needs nothing waited for comes back as a ScsiResponse at once, with
no coroutine; a READ may place its data straight into ``ScsiCommand.into``.

``resp.transfer_length`` is set for Data-Out commands (the CDB's
Data-Out size, for residuals). ``LunSet.add/remove`` change the inventory
at run time (hosts get REPORTED LUNS DATA HAS CHANGED).

Exports are resolved lazily so that ``import target.scsi.api`` (all a
transport needs) does not pull in the emulation and the storage modules.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Nexus": "api", "ScsiCommand": "api", "ScsiResponse": "api", "ScsiTarget": "api",
    "ScsiDevice": "device",
    "DeviceIdentity": "identity", "DeviceOptions": "identity",
    "LunSet": "lunset",
    "TargetPorts": "ports",
    "MemoryReservationStore": "pr", "ReservationStore": "pr",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import Nexus, ScsiCommand, ScsiResponse, ScsiTarget
    from .device import ScsiDevice
    from .identity import DeviceIdentity, DeviceOptions
    from .lunset import LunSet
    from .ports import TargetPorts
    from .pr import MemoryReservationStore, ReservationStore
