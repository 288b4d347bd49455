"""TCMU (LIO ``user:`` backstore) transport: serves the kernel's command
ring of each ``user:liverestore`` device through the SCSI layer."""
from .device import TcmuDevice
from .handler import TcmuHandler, as_scsi_target, scan_uio
from .ring import Request, Ring, RingError

__all__ = ["TcmuDevice", "TcmuHandler", "Ring", "Request", "RingError", "as_scsi_target", "scan_uio"]
