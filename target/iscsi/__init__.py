"""Embedded pure-Python iSCSI target on asyncio (RFC 7143, ErrorRecoveryLevel 0).

Public API::

    from target.iscsi import IscsiServer, IscsiTargetConfig, TargetPreferences

    cfg = IscsiTargetConfig(
        iqn="iqn.2025-01.io.liverestore:vol1",
        scsi_target=lunset,                  # target.scsi.LunSet (any ScsiTarget)
        tpgt=1,
        acl={"iqn.1994-05.com.redhat:host1"},   # None: every initiator
        chap=("user", "secret"),             # None: AuthMethod=None
        mutual_chap=("target-user", "other-secret"),
        alias="vol1",
    )
    server = IscsiServer([cfg], [("0.0.0.0", 3260), ("::", 3260)],
                         queue_depth=128, nop_interval=15, nop_timeout=15)
    await server.start()                     # binds the portals
    ...
    server.add_target(cfg2); server.remove_target(iqn); server.set_scsi_target(iqn, lunset2)
    server.set_acl(iqn, {...}); await server.add_portal(host, port)
    server.stats()                           # sessions, connections, per-target, per-session
    await server.stop(timeout=10, logout_grace=5)   # ask hosts to log out, drain, close

Everything runs on the event loop that called ``start()``; call the other
methods from that loop too (``loop.call_soon_threadsafe`` /
``asyncio.run_coroutine_threadsafe`` from other threads).

Modules: ``pdu`` (codec, digests), ``params`` (text keys, negotiation),
``chap``, ``login`` (login state machine), ``cmdsn`` (command window),
``session`` (full feature phase), ``connection`` (framing, keepalive),
``server`` (portals, targets, discovery), ``residual`` (write residuals);
``python -m target.iscsi --lun0 FILE:SIZE --portal 127.0.0.1:3261`` serves
files for manual tests.
"""
from .params import SessionParams, TargetPreferences
from .server import IscsiServer, IscsiTargetConfig

__all__ = ["IscsiServer", "IscsiTargetConfig", "TargetPreferences", "SessionParams"]
