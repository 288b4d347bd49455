"""Transport-agnostic SPC/SBC emulation over a LunIO.

Transports (iSCSI, TCMU) talk to a ``LunSet`` through the ``ScsiTarget``
protocol in ``api``; the daemon builds one ``ScsiDevice`` per LU from a
LunIO, a ``DeviceIdentity``, a ``ReservationStore`` and ``DeviceOptions``.
"""
from .api import Nexus, ScsiCommand, ScsiResponse, ScsiTarget
from .device import ScsiDevice
from .identity import DeviceIdentity, DeviceOptions
from .lunset import LunSet
from .ports import TargetPorts
from .pr import MemoryReservationStore, ReservationStore

__all__ = [
    "DeviceIdentity", "DeviceOptions", "LunSet", "MemoryReservationStore", "Nexus",
    "ReservationStore", "ScsiCommand", "ScsiDevice", "ScsiResponse", "ScsiTarget",
    "TargetPorts",
]
