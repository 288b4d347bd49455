"""`liverestore export ...`: targets, their LUNs, ACL and CHAP.

Every subcommand is one control operation, the same ones the shell
(/iscsi/<iqn>/tpg1/{luns,acls}, `set auth`) and the Ansible export module
use."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .control import ControlError
from .secret_input import literal_refused, read_secret

IQN_HELP = "the target's iSCSI name (iqn.YYYY-MM.reversed.domain:name)"
#: client_cmd(parent, name, help, op, kind, build) of target.cli
ClientCmd = Callable[..., argparse.ArgumentParser]


def _lun(text: str) -> tuple[str, str]:
    n, sep, vol = text.partition("=")
    if not sep or not n.isdigit() or not vol:
        raise ControlError(f"--lun wants N=VOLUME, not {text!r}")
    return n, vol


def _auth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chap-user", help="CHAP user initiators log in as (its secret is asked "
                   "for unless --chap-secret-file gives it)")
    p.add_argument("--chap-secret-file", metavar="FILE",
                   help="first line of FILE is the CHAP secret ('-': standard input)")
    p.add_argument("--mutual-user", help="user the target answers mutual CHAP as")
    p.add_argument("--mutual-secret-file", metavar="FILE",
                   help="first line of FILE is the mutual CHAP secret ('-': standard input)")
    # The old way, refused with the way to do it now (never a secret in argv).
    p.add_argument("--chap-secret", dest="chap_secret_file",
                   type=literal_refused("chap-secret"),
                   help="refused: use --chap-secret-file or the prompt")
    p.add_argument("--mutual-secret", dest="mutual_secret_file",
                   type=literal_refused("mutual-secret"),
                   help="refused: use --mutual-secret-file or the prompt")


def _auth(a: argparse.Namespace) -> dict[str, Any]:
    """CHAP settings from the options; secrets read now, never from argv."""
    out: dict[str, Any] = {"chap_user": a.chap_user, "chap_secret": None,
                           "mutual_user": a.mutual_user, "mutual_secret": None}
    if a.mutual_user and not a.chap_user:
        raise ControlError("mutual CHAP needs CHAP as well: give --chap-user too")
    if a.chap_user:
        out["chap_secret"] = read_secret(a.chap_secret_file, f"CHAP secret for {a.chap_user}")
    if a.mutual_user:
        out["mutual_secret"] = read_secret(a.mutual_secret_file,
                                           f"mutual CHAP secret for {a.mutual_user}")
    return out


def _auth_change(a: argparse.Namespace) -> dict[str, Any]:
    if a.none:
        return {"chap_user": None, "chap_secret": None, "mutual_user": None,
                "mutual_secret": None}
    if not a.chap_user:
        raise ControlError("export auth: give --chap-user USER (its secret from "
                           "--chap-secret-file or the prompt), or --none to turn CHAP off")
    return _auth(a)


def add_export_commands(sub: Any, client_cmd: ClientCmd) -> None:
    ex = sub.add_parser("export", help="iSCSI targets: LUNs, ACL, CHAP").add_subparsers(
        dest="sub", metavar="ACTION", required=True)
    p = client_cmd(ex, "create", "export volumes as LUNs of an iSCSI target", "export.create",
                   "export", lambda a: {"iqn": a.iqn, "luns": dict(_lun(x) for x in a.lun),
                                        "acl": a.acl, **_auth(a)})
    p.add_argument("iqn", help=IQN_HELP)
    p.add_argument("--lun", action="append", default=[], metavar="N=VOLUME",
                   help="export VOLUME as LUN N (repeatable)")
    p.add_argument("--acl", action="append", metavar="INITIATOR_IQN",
                   help="an initiator allowed to log in (repeatable; none: any initiator)")
    _auth_options(p)

    p = client_cmd(ex, "delete", "remove an iSCSI target", "export.delete", "deleted",
                   lambda a: {"iqn": a.iqn, "force": a.force})
    p.add_argument("iqn", help=IQN_HELP)
    p.add_argument("--force", action="store_true",
                   help="even while initiators are logged in (they lose their disks)")
    client_cmd(ex, "list", "list iSCSI targets", "export.list", "exports")
    p = client_cmd(ex, "show", "one iSCSI target in detail", "export.show", "export",
                   lambda a: {"iqn": a.iqn})
    p.add_argument("iqn", help=IQN_HELP)
    p = client_cmd(ex, "portal", "set the listening portals (applied at restart)", "portal.set",
                   "portals", lambda a: {"portals": a.portals})
    p.add_argument("portals", nargs="+", metavar="HOST:PORT",
                   help="address to listen on ([IPv6]:PORT for IPv6)")

    acl = ex.add_parser("acl", help="initiators allowed to log in").add_subparsers(
        dest="acl_action", metavar="ACTION", required=True)
    for name, op, help_ in (("add", "export.acl.add", "allow an initiator to log in"),
                            ("remove", "export.acl.delete",
                             "stop allowing an initiator (an empty ACL allows any)")):
        p = client_cmd(acl, name, help_, op, "export",
                       lambda a: {"iqn": a.iqn, "initiator": a.initiator})
        p.add_argument("iqn", help=IQN_HELP)
        p.add_argument("initiator", help="the initiator's iSCSI name")

    lun = ex.add_parser("lun", help="volumes exported as LUNs").add_subparsers(
        dest="lun_action", metavar="ACTION", required=True)
    p = client_cmd(lun, "add", "export one more volume", "export.lun.add", "export",
                   lambda a: {"iqn": a.iqn, "volume": a.volume, "lun": a.lun})
    p.add_argument("iqn", help=IQN_HELP)
    p.add_argument("volume", help="the volume to export")
    p.add_argument("--lun", type=int, help="its LUN number (default: the lowest free one)")
    p = client_cmd(lun, "remove", "stop exporting a LUN (the volume stays)",
                   "export.lun.delete", "export", lambda a: {"iqn": a.iqn, "lun": a.lun})
    p.add_argument("iqn", help=IQN_HELP)
    p.add_argument("lun", type=int, help="the LUN number")

    p = client_cmd(ex, "auth", "set or turn off CHAP (secrets from a file or a prompt)",
                   "export.update", "export",
                   lambda a: {"iqn": a.iqn, **_auth_change(a)})
    p.add_argument("iqn", help=IQN_HELP)
    _auth_options(p)
    p.add_argument("--none", action="store_true", help="turn CHAP (and mutual CHAP) off")
