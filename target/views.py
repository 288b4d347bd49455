"""Detailed human views of one object (`export show`, `pair show`, `volume
show`), as `lvdisplay` or `rbd info` give them: one "field  value" line
each, sizes in bytes and in human units. The listings' tables are in
target.cli; the values come from the daemon's replies."""
from __future__ import annotations

import time
from typing import Any, Iterable

from .fmt import duration, eta, human, plural
from .follow import job_bytes

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


def when(ts: float | None) -> str:
    """A daemon timestamp in local time, to the second."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def throttle_text(t: dict[str, Any]) -> str:
    """'rate unlimited, 16 extents per copy, depth 4, ...' (pair throttle, pair show)."""
    rate = "unlimited" if not t.get("rate") else f"{human(t['rate'])}/s"
    return (f"rate {rate}, {plural(t['batch_extents'], 'extent')} per copy, "
            f"depth {t['depth']}, host window {t['host_window']} copy round trips, "
            f"min progress {t['min_progress_pct']}% of idle"
            + (f", calibration hold {t['calibrate_ms']} ms" if t.get("calibrate_ms")
               else ", no calibration hold" if "calibrate_ms" in t else ""))


def job_text(p: dict[str, Any]) -> str:
    pr = p["progress"]
    if pr["job"] is None:
        return "none"
    text = pr["job"]
    if pr["job"] == "restore":
        text += " (protected)" if pr["protected"] else " (unprotected)"
    if pr["error"]:
        text += f", FAILED: {pr['error']}"
    elif pr["paused"]:
        text += ", paused"
    if p.get("offline"):
        text += f", WAITING: {p['offline']}"
    done, total = job_bytes(p)
    pct = 100 * done // total if total else 100
    # the copier's measured idle rate: under host load it keeps the throttle's
    # min_progress_pct of it
    idle = f", idle rate {human(pr['idle_rate'])}/s" if pr.get("idle_rate") else ""
    return (f"{text}\n{pct}% {human(done)} of {human(total)} "
            f"({pr['extents_done']} of {plural(pr['extents_total'], 'extent')}), "
            f"{human(pr['rate'])}/s, ETA {eta(pr['eta'])}{idle}")


def pair_fields(p: dict[str, Any]) -> list[Field]:
    pr = p["progress"]
    nextents = -(-p["size"] // p["extent_size"])
    delta = min(pr["delta_extents"] * p["extent_size"], p["size"])
    fields: list[Field] = [
        ("pair", p["id"]), ("source", p["source"]), ("clone", p["clone"]),
        ("size", size(p["size"])),
        ("extent size", f"{size(p['extent_size'])}, {plural(nextents, 'extent')}"),
        ("state", p["state"]), ("job", job_text(p)),
        ("delta", f"{size(delta)} in {plural(pr['delta_extents'], 'extent')}"),
        ("throttle", throttle_text(p["throttle"]))]
    h = p.get("history") or {}
    fields.insert(6, ("fractured", when(h.get("fractured_at")) if h.get("fractured_at") else
                      "- (the clone follows the source)" if p["state"] != "fractured" else
                      "- (not known)"))
    fields.insert(8, ("last job", last_job_text(h.get("last_job"))))
    if h.get("restored_from"):
        fields.insert(9, ("restored from", f"the clone as of {when(h['restored_from'])}"
                          + (" (its current point in time)" if h.get("current_point_restored")
                             else "")))
    if p.get("undo_image"):
        fields.append(("undo image", f"{p['undo_image']} ('liverestore pair abort {p['id']}' "
                       f"puts back what the restore overwrote; 'pair commit' discards it)"))
    for side, snap in sorted((p.get("snapshots") or {}).items()):
        fields.append((f"{side} snapshot", f"{snap} (of the fracture: a crash costs only the "
                       "extents written since; removed by the next sync or restore)"))
    for key, label in (("held", "HELD"), ("damaged", "DAMAGED")):
        if p.get(key):
            fields.append((label, p[key]))
    return fields


def volume_fields(v: dict[str, Any]) -> list[Field]:
    access = v["access"] + (f" ({v['access_reason']})" if v.get("access_reason") else "")
    fields: list[Field] = [
        ("volume", v["name"]), ("path", f"{v['path']} ({v['kind']})"), ("size", size(v["size"])),
        ("extent size", size(v["extent_size"])), ("role", v["role"]), ("access", access),
        ("exported by", v.get("exported_by") or "-"),
        ("pairs", ", ".join(v.get("pairs") or []) or "-"), ("created", when(v.get("created_at")))]
    if v.get("snapshots"):
        fields.append(("snapshots", ", ".join(v["snapshots"]) + " (the daemon's, holding "
                       "space until the pair's next sync or restore)"))
    if v.get("offline"):
        fields.append(("OFFLINE", v["offline"]))
    return fields


def last_job_text(job: dict[str, Any] | None) -> str:
    """'restore (protected) finished 2026-12-01 20:12:27 UTC after 12s'."""
    if not job:
        return "none"
    kind = job["kind"] + ({True: " (protected)", False: " (unprotected)"}.get(job.get("protected"))
                          or "")
    text = f"{kind} started {when(job.get('started_at'))}, {job['result']}"
    if job.get("ended_at"):
        text += f" {when(job['ended_at'])} after {duration(job['ended_at'] - job['started_at'])}"
    if job.get("error"):
        text += f": {job['error']}"
    return text
