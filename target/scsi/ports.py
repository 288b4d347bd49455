"""Relative target port identifiers (SPC-4 VPD 83h, READ FULL STATUS).

Transports name target ports by string; SCSI reports a 16-bit relative
port number. The registry hands out stable numbers per name, optionally
pre-assigned by the daemon so they survive restarts.
"""
from __future__ import annotations


class TargetPorts:
    def __init__(self, assigned: dict[str, int] | None = None) -> None:
        self._ids: dict[str, int] = dict(assigned or {})

    def relative_id(self, name: str) -> int:
        rid = self._ids.get(name)
        if rid is None:
            used = set(self._ids.values())
            rid = 1
            while rid in used:
                rid += 1
            if rid > 0xFFFF:
                rid = 0xFFFF
            self._ids[name] = rid
        return rid
