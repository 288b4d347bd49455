"""Human-readable output shared by the service, the CLI and the shell."""
from __future__ import annotations

# What stands for a CHAP secret in every listing: secrets are never shown.
SECRET = "********"


def human(n: float) -> str:
    """Bytes as '512 B', '1.5 MiB', ..."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def eta(s: float | None) -> str:
    """Seconds as H:MM:SS, '-' when unknown."""
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def duration(s: float) -> str:
    """Elapsed seconds as '12s', '3m05s', '1h02m'."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 extent', '2 extents', '0 extents'."""
    return f"{n} {one if n == 1 else (many or one + 's')}"
