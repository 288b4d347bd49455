"""Transport-agnostic SPC/SBC emulation over a LunIO.

Transports (iSCSI, TCMU) talk to a ``LunSet`` through the ``ScsiTarget``
protocol in ``api``; the daemon builds one ``ScsiDevice`` per LU from a
LunIO, a ``DeviceIdentity``, a ``ReservationStore`` and ``DeviceOptions``.

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
