"""Embedded pure-Python iSCSI target on asyncio (RFC 7143, ERL 0).

Public API::

    from target.iscsi import IscsiServer, IscsiTargetConfig
    server = IscsiServer([IscsiTargetConfig(iqn, scsi_target, acl={...}, chap=(u, s))],
                         [("127.0.0.1", 3260)])
    await server.start(); ...; await server.stop()
"""
from .params import SessionParams, TargetPreferences
from .server import IscsiServer, IscsiTargetConfig

__all__ = ["IscsiServer", "IscsiTargetConfig", "TargetPreferences", "SessionParams"]
