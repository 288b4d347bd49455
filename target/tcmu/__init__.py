"""TCMU (LIO ``user:`` backstore) transport: serves the kernel's command
ring of each ``user:liverestore`` device through the SCSI layer.

How the daemon uses it (one asyncio loop, no threads per command)::

    from target.tcmu import TcmuHandler
    from target.lio import Description, LioConfigurator

    def open_device(config, size, block_size):
        # config = the part after "liverestore/" (the volume name); return a
        # LunIO (wrapped in ScsiDevice + LunSet, LUN 0) or a ScsiTarget
        return service.lunio_for_volume(config)

    handler = TcmuHandler(open_device, close_device=lambda cfg, obj: ...)
    await handler.start()          # serves existing devices, then netlink + rescans
    LioConfigurator().apply(Description.from_dict(cfg))   # blocking configfs writes
    ...
    await handler.stop()

Start the handler before or after LIO objects exist: devices are found by a
scan at start, by TCM-USER netlink events and by periodic rescans. Each
device opened gets ``action/reset_ring = 1`` first: commands a previous
handler left uncompleted are answered BUSY by the kernel and retried by the
initiator. The kernel fails commands that stay on the ring longer than the
backstore's ``cmd_time_out`` (30 s by default), so a restart must be quicker.

Each device's ring runs in a native thread when the install built
``target.tcmu._nativering`` (setup.py): it answers the READ/WRITEs of an LU
whose route goes straight to a file store itself and hands every other
command to the Python path (native_device.py); else the Python ring loop
(device.py) serves every command.
"""
from .device import TcmuDevice
from .handler import TcmuHandler, as_scsi_target, scan_uio
from .ring import Request, Ring, RingError

__all__ = ["TcmuDevice", "TcmuHandler", "Ring", "Request", "RingError", "as_scsi_target", "scan_uio"]
