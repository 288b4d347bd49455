"""LIO's dbroot: the one directory the kernel and every rtslib-fb on the host share.

The kernel keeps persistent-reservation and ALUA state under
``/sys/kernel/config/target/dbroot`` (``/var/target`` until someone writes
it), and it can be changed only while no backstore is registered. Each
rtslib-fb writes its own preferred directory there when it starts: the
upstream one (PyPI, which this daemon uses) wants ``/etc/target``, Debian's
python3-rtslib-fb and targetcli-fb want ``/etc/rtslib-fb-target``. Two
tools that disagree either switch the kernel's dbroot under each other or,
once backstores exist, make one of them warn on every call (or fail when
its directory is missing).

So the daemon agrees with the host instead of imposing its library's
choice: a dbroot someone already chose (the kernel's value is not its
default) is kept; otherwise the directory of the host's own tools is taken
(created if missing), and this process's rtslib-fb is told to prefer
exactly that, so it never writes the kernel's dbroot again.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

CONFIGFS_DBROOT = "/sys/kernel/config/target/dbroot"
KERNEL_DEFAULT = "/var/target"
DEBIAN = "/etc/rtslib-fb-target"      # Debian/Ubuntu python3-rtslib-fb, targetcli-fb
UPSTREAM = "/etc/target"              # upstream rtslib-fb (PyPI), Fedora/RHEL targetcli
OS_RELEASE = "/etc/os-release"


def debian_like(os_release: str = OS_RELEASE) -> bool:
    try:
        with open(os_release) as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return False
    ids = f"{fields.get('ID', '')} {fields.get('ID_LIKE', '')}".replace('"', "").split()
    return "debian" in ids


def preferred(isdir: Callable[[str], bool] = os.path.isdir, debian: bool | None = None) -> str:
    """The host tools' dbroot: an existing Debian or upstream directory, in
    that order (Debian's package creates its own), else the one of this
    distribution family."""
    for d in (DEBIAN, UPSTREAM):
        if isdir(d):
            return d
    return DEBIAN if (debian_like() if debian is None else debian) else UPSTREAM


@dataclass(frozen=True)
class Dbroot:
    path: str
    how: str            # "kept" (chosen before us), "set", or "stuck" (backstores under the default)

    def __str__(self) -> str:
        return f"{self.path} ({self.how})"


def settle(configfs_dbroot: str = CONFIGFS_DBROOT, want: str | None = None) -> Dbroot | None:
    """Make the kernel's dbroot the host tools' one if nobody chose yet, and
    return it; None where the kernel has no dbroot file (no LIO, or a kernel
    older than the setting)."""
    try:
        with open(configfs_dbroot) as f:
            cur = f.read().strip()
    except OSError:
        return None
    if cur != KERNEL_DEFAULT:
        return _prefer(Dbroot(cur, "kept"))
    want = want or preferred()
    os.makedirs(want, mode=0o700, exist_ok=True)     # the kernel wants an existing directory
    try:
        with open(configfs_dbroot, "w") as f:
            f.write(want + "\n")
    except OSError as e:
        # EINVAL: backstores exist already, registered under the default.
        log.warning("LIO dbroot stays %s (cannot set %s: %s); admin tools that prefer "
                    "another directory will warn", cur, want, e.strerror or e)
        return _prefer(Dbroot(cur, "stuck"))
    return _prefer(Dbroot(want, "set"))


def _prefer(d: Dbroot) -> Dbroot:
    """Tell this process's rtslib-fb that the kernel's dbroot is the one it
    prefers: every RTSRoot() it makes (its own objects make some) then
    leaves the kernel's value alone instead of switching it or warning."""
    from rtslib_fb import RTSRoot
    RTSRoot._preferred_dbroot = d.path
    return d
