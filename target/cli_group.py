"""`liverestore group ...`: consistency groups (restore_core.groups).

A group fracture or restore start takes effect at one instant for every
member pair; sync, pause, resume and wait act on every member. Members
refuse their own pair operations until `group remove` frees them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .cli_shared import wait_job
from .control import Client
from .follow import Followed, Outcome

PAIRS_HELP = "a pair: its clone's name, or SOURCE/CLONE"
GROUP_COLS = [("name", "GROUP"), ("state", "STATE"), ("pairs", "PAIRS")]
MEMBER_COLS = [("pair", "PAIR"), ("source", "SOURCE"), ("clone", "CLONE"), ("state", "STATE"),
               ("job", "JOB"), ("progress", "EXTENTS")]

Build = Callable[[argparse.Namespace], dict[str, Any]]


def add_parser(sub: argparse._SubParsersAction,
               print_table: Callable[[list[dict[str, Any]], list[tuple[str, str]]], None]) -> None:
    g = sub.add_parser("group", help="consistency groups: pairs fractured and restored at "
                       "one instant").add_subparsers(dest="sub", metavar="ACTION", required=True)

    def cmd(name: str, help_: str, op: str, build: Build | None = None, *,
            name_arg: bool = True, wait: bool = False) -> argparse.ArgumentParser:
        p = g.add_parser(name, help=help_)
        if name_arg:
            p.add_argument("name", metavar="NAME", help="the group's name")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if wait:
            p.add_argument("--wait", action="store_true",
                           help="follow every member's job to its end")
        p.set_defaults(func=lambda a: run(a, op, (build or _by_name)(a), print_table),
                       wait=False)
        return p

    p = cmd("create", "make a group of pairs (a pair is in at most one group)", "group.create",
            lambda a: {"name": a.name, "pairs": a.pairs})
    p.add_argument("pairs", nargs="*", metavar="PAIR", help=PAIRS_HELP)
    p = cmd("add", "put pairs into a group", "group.add",
            lambda a: {"name": a.name, "pairs": a.pairs})
    p.add_argument("pairs", nargs="+", metavar="PAIR", help=PAIRS_HELP)
    p = cmd("remove", "take pairs out of a group (they become free)", "group.remove",
            lambda a: {"name": a.name, "pairs": a.pairs})
    p.add_argument("pairs", nargs="+", metavar="PAIR", help=PAIRS_HELP)
    cmd("delete", "forget a group (its pairs stay as they are)", "group.delete")
    cmd("list", "list groups", "group.list", lambda a: {}, name_arg=False)
    cmd("show", "one group and its members", "group.show")
    cmd("fracture", "split every member at one instant", "group.fracture")
    p = cmd("sync", "copy source -> clone on every member", "group.sync",
            lambda a: {"name": a.name, "full": a.full}, wait=True)
    p.add_argument("--full", action="store_true", help="copy every extent")
    p = cmd("restore", "start restoring every member at one instant", "group.restore",
            lambda a: {"name": a.name, "protected": not a.unprotected,
                       "keep_undo": a.keep_undo}, wait=True)
    p.add_argument("--unprotected", action="store_true",
                   help="mirror host writes to the clones; the pairs end synchronized")
    p.add_argument("--keep-undo", action="store_true",
                   help="save what each member's restore overwrites (see 'pair restore')")
    cmd("abort", "undo every member's --keep-undo restore from one instant on", "group.abort",
        wait=True)
    cmd("commit", "keep every member's --keep-undo restore (discard the undo images)",
        "group.commit")
    cmd("pause", "pause every member's job", "group.pause")
    cmd("resume", "resume every member's job", "group.resume")
    p = cmd("wait", "follow every member's job to its end", "group.show")
    p.set_defaults(wait=True)


def _by_name(a: argparse.Namespace) -> dict[str, Any]:
    return {"name": a.name}


def follow_members(client: Client, group: dict[str, Any], json_out: bool) -> Followed | None:
    """Follow every member's job to its end, one after the other; the first
    that did not finish (paused, failed, waiting), or None when all did."""
    for pid in group["pairs"]:
        f = wait_job(client, client.call("pair.show", pair=pid), json_out)
        if f.outcome is not Outcome.FINISHED:
            return f
    return None


def run(args: argparse.Namespace, op: str, kw: dict[str, Any],
        print_table: Callable[[list[dict[str, Any]], list[tuple[str, str]]], None]) -> int:
    status = 0
    with Client(args.socket) as c:
        result = c.call(op, **kw)
        if args.wait:
            stopped = follow_members(c, result, args.json)
            if stopped is not None:
                print(f"liverestore: {stopped.message}", file=sys.stderr)
                status = stopped.exit_status
            result = c.call("group.show", name=result["name"])
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif op == "group.list":
        print_table([_group_row(g) for g in result], GROUP_COLS)
    elif op == "group.delete":
        print(f"deleted group {result['deleted']}")
    else:
        print_table([_group_row(result)], GROUP_COLS)
        if result["members"]:
            print()
            print_table([_member_row(m) for m in result["members"]], MEMBER_COLS)
        if result.get("damaged"):
            print(f"{result['name']}: DAMAGED: {result['damaged']}")
    return status


def _group_row(g: dict[str, Any]) -> dict[str, Any]:
    return {"name": g["name"], "state": g["state"], "pairs": ", ".join(g["pairs"]) or "-"}


def _member_row(m: dict[str, Any]) -> dict[str, Any]:
    if m.get("missing"):
        return {"pair": m["pair"], "state": "MISSING (group remove it)"}
    job = (m["job"] or "") + (" paused" if m["paused"] else "") + \
        (f" ERROR: {m['error']}" if m["error"] else "")
    return {**m, "job": job,
            "progress": f"{m['extents_done']}/{m['extents_total']}" if m["job"] else ""}
