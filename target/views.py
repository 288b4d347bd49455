"""Detailed human views of one object (`export show`, `pair show`, `volume
show`), as `lvdisplay` or `rbd info` give them: one "field  value" line
each, sizes in bytes and in human units. The listings' tables are in
target.cli; the values come from the daemon's replies."""
from __future__ import annotations

from typing import Any, Iterable

from .fmt import human, plural

Field = tuple[str, str]


def render(fields: Iterable[Field]) -> str:
    rows = list(fields)
    width = max(len(k) for k, _ in rows)
    out = []
    for k, v in rows:
        lines = v.split("\n")
        out.append(f"{k.ljust(width)}  {lines[0]}")
        out.extend(f"{'':{width}}  {more}" for more in lines[1:])
    return "\n".join(out)


def size(n: int | None) -> str:
    """'8.0 MiB (8388608 bytes)'."""
    if n is None:
        return "-"
    return f"{human(n)} ({n} bytes)"


def sessions_text(sessions: list[dict[str, Any]]) -> str:
    """'none', or one line per logged-in initiator (and where from)."""
    if not sessions:
        return "none logged in"
    lines = [plural(len(sessions), "session") + " logged in"]
    lines += [s["initiator"] + (f" from {s['peer']}" if s.get("peer") else "") for s in sessions]
    return "\n".join(lines)


def auth_text(e: dict[str, Any]) -> str:
    if e.get("mutual_chap"):
        return f"mutual CHAP (user {e['chap']['user']}, target answers as {e['mutual_chap']['user']})"
    if e.get("chap"):
        return f"CHAP (user {e['chap']['user']})"
    return "none"


def export_fields(e: dict[str, Any]) -> list[Field]:
    luns = sorted(e["luns"].items(), key=lambda kv: int(kv[0]))
    fields: list[Field] = [("target", e["iqn"]), ("tpg", str(e.get("tpgt", 1))),
                           ("portals", ", ".join(e.get("portals") or []) or "-"),
                           ("LUNs", "\n".join(f"{n}: {v}" for n, v in luns) or "none"),
                           ("ACL", "\n".join(e["acl"]) if e.get("acl") else
                            "none: any initiator may log in"),
                           ("auth", auth_text(e)),
                           ("sessions", sessions_text(e.get("sessions") or []))]
    if e.get("problem"):
        fields.append(("PROBLEM", e["problem"]))
    return fields
