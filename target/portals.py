"""Portals (the addresses the iSCSI front end listens on): the one parser
for ``serve --portal``, ``portal set``, saved configurations and the stored
``portals`` setting, so each accepts exactly the same values."""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from .errors import clip
from .iscsi.names import printable_token

DEFAULT_PORTAL: tuple[str, int] = ("127.0.0.1", 3260)
PORTAL_HELP = "HOST:PORT or [IPv6]:PORT with an IP address or host name and a port 1-65535"

# [0-9], not \d: \d also matches non-ASCII digits, which int() would accept.
_TEXT = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<p6>[0-9]{1,5})|(?P<host>[^:\[\]]+):(?P<port>[0-9]{1,5})")
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


class PortalError(ValueError):
    """Not a portal; the message says what one looks like."""


def _host(host: str) -> str:
    if not printable_token(host):
        raise PortalError(f"portal host {clip(host, 80)} has spaces or control characters")
    try:
        ipaddress.ip_address(host)     # IPv6 scope ids ("fe80::1%eth0") included
        return host
    except ValueError:
        pass
    if len(host) <= 253 and _HOSTNAME.fullmatch(host):
        return host
    raise PortalError(f"portal host {clip(host, 80)} is neither an IP address nor a host name")


def _port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PortalError(f"portal port {clip(port, 20)} is not 1-65535")
    return port


def parse_portal(value: Any) -> tuple[str, int]:
    """"HOST:PORT", "[IPv6]:PORT" or a stored [host, port] pair."""
    if isinstance(value, str):
        m = _TEXT.fullmatch(value)
        if not m:
            raise PortalError(f"portal {clip(value, 80)} is not {PORTAL_HELP}")
        host, port = (m["v6"], m["p6"]) if m["v6"] else (m["host"], m["port"])
        return _host(host), _port(int(port))
    if (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)):
        return _host(value[0]), _port(value[1])
    raise PortalError(f"portal {clip(value, 80)} is not {PORTAL_HELP}")


def parse_portals(values: Any) -> list[tuple[str, int]]:
    """A non-empty list of portals without repeats."""
    if not isinstance(values, list) or not values:
        raise PortalError(f"portals must be a non-empty list of {PORTAL_HELP}")
    out = [parse_portal(v) for v in values]
    if len(set(out)) != len(out):
        raise PortalError("a portal is given twice")
    return out


def format_portal(portal: tuple[str, int]) -> str:
    host, port = portal
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_only(portals: list[tuple[str, int]]) -> bool:
    """Whether only this machine can reach these portals (127.0.0.0/8, ::1,
    localhost); a wildcard or any other address is reachable from outside."""
    for host, _ in portals:
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                return False
        except ValueError:          # a host name: it may resolve anywhere
            return False
    return True
