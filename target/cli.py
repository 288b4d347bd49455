# PYTHON_ARGCOMPLETE_OK  (lets bash's global argcomplete hook complete `liverestore`)
"""The `liverestore` command line.

Every subcommand but `serve` and `demo` is a client of the daemon's control
socket (the same API the shell and Ansible use). Errors are one line on
stderr and a non-zero exit status; --json prints machine-readable output.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import signal
import sys
from typing import Any, Iterator

import argcomplete

from restore_core.throttle import KNOBS

from .cli_events import add_parser as add_events_parser
from .cli_exports import add_export_commands
from .cli_group import add_parser as add_group_parser
from .cli_shared import client_path, wait_job, write_private
from .control import DEFAULT_SOCKET, Client, ControlError
from .errors import ServiceError
from . import views
from .fmt import eta as _eta, human as _human, plural
from .follow import EXIT_HELP, Followed, Outcome

DEFAULT_STATE = "/var/lib/liverestore"
SOCKET_ENV = "LIVERESTORE_SOCKET"
PAIR_HELP = "the pair: its clone's name, or SOURCE/CLONE"
DEMO_IQN = "iqn.2026-11.io.liverestore:demo"

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PIPE = 141           # as if killed by SIGPIPE, what shells expect of `cmd | head`


# -- output --------------------------------------------------------------------------
def _print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    data = [[str(r.get(k, "")) if r.get(k) is not None else "-" for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) for i, (_, h) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(cols, widths)))
    for d in data:
        print("  ".join(v.ljust(w) for v, w in zip(d, widths)))


def _pair_row(p: dict[str, Any]) -> dict[str, Any]:
    pr = p["progress"]
    job = pr["job"] or ""
    if job == "restore":
        job += " (protected)" if pr["protected"] else " (unprotected)"
    if pr.get("undo"):
        job += (" " if job else "") + "undo kept"
    done = f"{pr['extents_done']}/{pr['extents_total']}" if pr["job"] else ""
    if pr["paused"]:
        job += " paused"
    if pr["error"]:
        job += f" ERROR: {pr['error']}"
    if p.get("offline") and pr["job"]:
        job += f" WAITING: {p['offline']}"
    return {"pair": p["id"], "source": p["source"], "clone": p["clone"], "state": p["state"],
            "job": job, "progress": done, "rate": _human(pr["rate"]) + "/s" if pr["job"] else "",
            "eta": _eta(pr["eta"]) if pr["job"] else "", "delta": pr["delta_extents"]}


PAIR_COLS = [("pair", "PAIR"), ("source", "SOURCE"), ("clone", "CLONE"), ("state", "STATE"),
             ("job", "JOB"), ("progress", "EXTENTS"), ("rate", "RATE"), ("eta", "ETA"),
             ("delta", "DELTA")]
VOL_COLS = [("name", "VOLUME"), ("size_h", "SIZE"), ("role", "ROLE"), ("access", "ACCESS"),
            ("exported_by", "EXPORT"), ("kind", "STORE"), ("path", "PATH")]


def _print_pair_notes(pairs: list[dict[str, Any]]) -> None:
    """Why a pair is held or damaged: too long for a table column."""
    for p in pairs:
        if p.get("held"):
            print(f"{p['id']}: HELD: {p['held']} (liverestore pair acknowledge {p['id']})")
        if p.get("damaged"):
            print(f"{p['id']}: DAMAGED: {p['damaged']}")


def _print_rollback(rb: dict[str, Any] | None) -> None:
    if not rb:
        return
    print(f"\nROLLBACK: {rb['message']}")
    for name, path in rb["vanished_volumes"].items():
        print(f"  volume {name} is missing: re-create it with --path {path}")
    for pid in rb["held_pairs"]:
        print(f"  pair {pid} is held: liverestore pair acknowledge {pid}")
    for pid in rb.get("vanished_pairs", []):
        print(f"  pair {pid} is missing: re-create it (a full sync)")
    for name, path in rb.get("resurrected_volumes", {}).items():
        print(f"  volume {name} ({path}) had been deleted and is back: delete it again "
              "if its image is in other use")


def _print_drift(drift: list[str] | None) -> None:
    if not drift:
        return
    print("\nLIO DRIFT (changed outside liverestore; left as is until you act with targetcli "
          "or liverestore export commands):")
    for line in drift:
        print(f"  {line}")


def _rbd_args(a: argparse.Namespace) -> dict[str, Any]:
    """An RBD image's names as typed (no path rules apply to them) and its ceph.conf."""
    return {k: v for k, v in (("rbd", a.rbd), ("ceph_conf", client_path(a.ceph_conf)),
                              ("ceph_id", a.ceph_id)) if v is not None}


def _ceph_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ceph-conf", metavar="PATH", help="with --rbd: the cluster's ceph.conf "
                   "(default /etc/ceph/ceph.conf)")
    p.add_argument("--ceph-id", metavar="ID", help="with --rbd: the Ceph client id "
                   "(default admin: client.admin's keyring)")


def _vol_rows(vols: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**v, "size_h": _human(v["size"]),
             "access": f"OFFLINE: {v['offline']}" if v.get("offline") else v["access"]}
            for v in vols]


def _export_rows(exports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"iqn": e["iqn"], "luns": ", ".join(f"{k}:{v}" for k, v in sorted(
        e["luns"].items(), key=lambda kv: int(kv[0]))),
        "acl": ", ".join(e["acl"]) if e["acl"] else "any",
        "auth": "mutual CHAP" if e["mutual_chap"] else ("CHAP" if e["chap"] else "none"),
        "sessions": ", ".join(sorted({s["initiator"] for s in e.get("sessions") or []})) or "-"}
        for e in exports]


EXPORT_COLS = [("iqn", "TARGET"), ("luns", "LUNS"), ("acl", "ACL"), ("auth", "AUTH"),
               ("sessions", "LOGGED IN")]


def _show(args: argparse.Namespace, result: Any, kind: str) -> None:
    if isinstance(result, dict) and result.get("warning"):
        # on stderr: seen even with --json or a pipe
        print(f"liverestore: WARNING: {result['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    if kind == "pairs":
        _print_table([_pair_row(p) for p in result], PAIR_COLS)
        _print_pair_notes(result)
    elif kind == "pair":
        _print_table([_pair_row(result)], PAIR_COLS)
        _print_pair_notes([result])
    elif kind == "pair_detail":
        print(views.render(views.pair_fields(result)))
    elif kind == "throttle":
        print(f"throttle of {result['id']}: {views.throttle_text(result['throttle'])}")
    elif kind == "volume_detail":
        print(views.render(views.volume_fields(result)))
    elif kind == "portals":
        print(f"portals set to {', '.join(result['portals'])}; {result['note']}")
    elif kind == "created":
        print(_created_text(result["created"]))
    elif kind == "deleted":
        print(_deleted_text(result))
    elif kind == "acknowledged":
        print(result["message"])
    elif kind == "volumes":
        _print_table(_vol_rows(result), VOL_COLS)
    elif kind == "volume":
        _print_table(_vol_rows([result]), VOL_COLS)
    elif kind == "exports":
        _print_table(_export_rows(result), EXPORT_COLS)
    elif kind == "export":
        print(views.render(views.export_fields(result)))
        if result.get("note"):
            print(f"note: {result['note']}")
    elif kind == "status":
        pending = result.get("portals_pending")
        print(f"portals: {', '.join(result['portals'])}"
              + (f" (after a reload or restart: {', '.join(pending)})" if pending else "")
              + f"   sessions: {result['iscsi'].get('sessions', 0)}")
        print("\nvolumes:")
        _print_table(_vol_rows(result["volumes"]), VOL_COLS)
        print("\npairs:")
        _print_table([_pair_row(p) for p in result["pairs"]], PAIR_COLS)
        _print_pair_notes(result["pairs"])
        _print_rollback(result.get("rollback"))
        _print_drift(result["iscsi"].get("drift"))
        print("\nexports:")
        _print_table(_export_rows(result["exports"]), EXPORT_COLS)
    else:
        print(json.dumps(result, indent=2, default=str))


def _created_text(made: dict[str, list[str]]) -> str:
    """restoreconfig: 'created 2 volumes (db1, db1-clone), 1 pair (db1-clone)'."""
    parts = [f"{plural(len(names), kind.rstrip('s'))} ({', '.join(names)})"
             for kind, names in made.items() if names]
    return ("created " + ", ".join(parts)) if parts else \
        "nothing to create: everything in it is already there"


def _deleted_text(r: dict[str, Any]) -> str:
    """'deleted target X (cut off 1 session: iqn...)' and the like."""
    text = f"deleted {r['deleted']}"
    if r.get("path"):
        text += f"; its image {r['path']} was left in place"
    if r.get("cut_off"):
        names = ", ".join(sorted({s["initiator"] for s in r["cut_off"]}))
        text += f" (cut off {plural(len(r['cut_off']), 'session')}: {names})"
    return text


# -- commands -------------------------------------------------------------------------
def cmd_client(args: argparse.Namespace) -> int:
    with Client(args.socket) as c:
        op, kw, kind = args.op(args)
        result = c.call(op, **kw)
        if getattr(args, "wait", False) and op.startswith("pair.") and isinstance(result, dict):
            return _followed(args, wait_job(c, result, args.json), kind)
        _show(args, result, kind)
    return 0


def _followed(args: argparse.Namespace, f: Followed, kind: str) -> int:
    """The end of --wait / pair wait: how the job ended (a line; on stderr
    unless it finished), the pair, and the exit status of that outcome."""
    if f.outcome is Outcome.FINISHED:
        if not args.json:
            print(f.message)
    else:
        print(f"liverestore: {f.message}", file=sys.stderr)
    _show(args, f.pair, kind)
    return f.exit_status


# The server side (target.daemon, target.service, target.portals) and the
# shell (configshell) are imported by the subcommands that run them: every
# client command would otherwise pay about half a second to load the engine,
# SQLite and the iSCSI target it does not use (tests/test_imports.py lists
# these lazy imports; none of them may close an import cycle).
def cmd_init(args: argparse.Namespace) -> int:
    """Create the state directory and database once (systemd, Ansible)."""
    from .service import init_state
    try:
        made = init_state(args.state_dir)
    except ServiceError as e:
        raise ControlError(str(e)) from None
    where = os.path.abspath(args.state_dir)
    print(f"initialised {where}" if made else f"{where} is already initialised")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    from .shell import run
    return run(args.socket, args.line)


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import serve
    _logging(args.verbose)
    portals = [_portal(p) for p in args.portal] if args.portal else None
    metrics = _metrics_address(args.metrics) if args.metrics else None
    try:
        asyncio.run(serve(args.state_dir, args.socket, init=args.init, portals=portals,
                          backend=args.backend, volume_dirs=args.volume_dir,
                          group=args.group, memory_limit=args.memory_limit,
                          on_event=args.on_event, metrics=metrics))
    except ServiceError as e:
        print(f"liverestore: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up a demo source + clone, export both, and serve in the foreground;
    with --tour, run the whole story unattended instead."""
    if args.tour:
        from .tour import run_tour
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return run_tour(args.size, args.tour_state_dir)
    from .daemon import serve
    _logging(args.verbose)
    state = args.state_dir
    init = not os.path.exists(os.path.join(state, "liverestore.db"))
    portal = _portal(args.portal) if args.portal else ("127.0.0.1", 3260)

    def ready(service) -> None:
        asyncio.get_running_loop().create_task(_demo_setup(service, args, portal))

    try:
        asyncio.run(serve(state, args.socket, init=init, portals=[portal], ready=ready))
    except ServiceError as e:
        print(f"liverestore: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


async def _demo_setup(service, args: argparse.Namespace, portal: tuple[str, int]) -> None:
    try:
        if service.config.volume("demo-src") is None:
            await service.volume_create("demo-src", size=args.size or "1G")
        if service.config.volume("demo-clone") is None:
            await service.volume_create("demo-clone", size=args.size or "1G")
        if "demo-clone" not in service.engine.pairs:
            await service.pair_create("demo-src", "demo-clone")
            await service.pair_wait("demo-clone", 600)
            await service.pair_fracture("demo-clone")
        if DEMO_IQN not in service.config.targets():
            await service.export_create(DEMO_IQN, {"0": "demo-src", "1": "demo-clone"})
    except Exception as e:  # noqa: BLE001 - tell the operator, then stop cleanly
        print(f"liverestore demo: setup failed: {e}", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    h, p = service.portals()[0]
    url_host = f"[{h}]" if ":" in h else h
    sock = args.socket
    print(f"""
liverestore demo is serving (state in {service.state_dir}).
  target {DEMO_IQN}
    LUN 0  demo-src    (the source, {_human(service.volume_show('demo-src')['size'])})
    LUN 1  demo-clone  (its fractured clone)
  portal {h}:{p}

Connect:
  iscsi-ls -s iscsi://{url_host}:{p}
  qemu-io -c 'write -P 0x5a 0 1M' iscsi://{url_host}:{p}/{DEMO_IQN}/0
  iscsiadm -m discovery -t st -p {url_host}:{p} && iscsiadm -m node -T {DEMO_IQN} --login

Restore the source from its clone while you keep using it (another terminal):
  liverestore --socket {sock} pair restore demo-clone --wait
  liverestore --socket {sock} status

Ctrl-C stops the daemon (drains I/O, flushes, persists).
""", flush=True)


def _portal(text: str) -> tuple[str, int]:
    # (lazy: it loads the iSCSI package, which only `serve` and `demo` need)
    from .portals import PortalError, parse_portal
    try:
        return parse_portal(text)
    except PortalError as e:
        raise SystemExit(f"liverestore: {e}") from None


def _metrics_address(text: str) -> tuple[str, int]:
    """serve --metrics: HOST:PORT, or a bare PORT on loopback (metrics name
    volumes and initiators: off the network unless the admin says so)."""
    return _portal(f"127.0.0.1:{text}" if text.isdigit() else text)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _throttle_kw(a: argparse.Namespace) -> dict[str, Any]:
    return {k.name: getattr(a, k.name) for k in KNOBS if getattr(a, k.name, None) is not None}


def _version() -> str:
    try:
        return importlib.metadata.version("liverestore")
    except importlib.metadata.PackageNotFoundError:       # run from a source tree
        return "(not installed)"


def _leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run a command (no sub-commands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for a in subs:
        for child in dict.fromkeys(a.choices.values()):
            yield from _leaves(child)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="liverestore",
                                 description="restore a LUN from its clone while hosts use it",
                                 epilog=f"The control socket is --socket (before or after the "
                                 f"command), else ${SOCKET_ENV}, else {DEFAULT_SOCKET}. Bash "
                                 "completion: eval \"$(register-python-argcomplete "
                                 "liverestore)\".")
    ap.add_argument("--socket", default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
                    help=f"control socket (default ${SOCKET_ENV}, else {DEFAULT_SOCKET})")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def client_cmd(parent, name, help_, op, kind="raw", build=None):
        p = parent.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_client,
                       op=lambda a, op=op, build=build, kind=kind: (op, build(a) if build else {}, kind))
        return p

    s = sub.add_parser("serve", help="run the daemon (iSCSI target + control socket)")
    s.add_argument("--state-dir", default=DEFAULT_STATE,
                   help=f"database, lock and default images (default {DEFAULT_STATE})")
    s.add_argument("--init", action="store_true", help="create the state directory and database")
    s.add_argument("--portal", action="append", help="HOST:PORT to listen on (repeatable)")
    s.add_argument("--group", help="group allowed to use the control socket")
    s.add_argument("--volume-dir", action="append", metavar="DIR",
                   help="directory where users other than root may create or adopt images "
                        "(repeatable; default: STATE_DIR/volumes)")
    s.add_argument("--backend", choices=("auto", "embedded", "lio"), default="auto",
                   help="who speaks iSCSI: the embedded target, or the kernel's LIO with "
                        "our TCMU handler (auto: LIO when configfs has a target)")
    s.add_argument("--memory-limit", metavar="SIZE",
                   help="RSS the iSCSI target keeps the daemon under, e.g. 512M (default 512M)")
    s.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default off; "
                        "a bare PORT listens on 127.0.0.1 only)")
    s.add_argument("--on-event", metavar="CMD",
                   help="run CMD (with /bin/sh) for every event, the event as JSON on its "
                        "stdin; at most 4 at once, each killed after 10 s")
    s.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    s.set_defaults(func=cmd_serve)
    add_events_parser(sub)

    i = sub.add_parser("init", help="create the state directory (0700) and database, once")
    i.add_argument("--state-dir", default=DEFAULT_STATE,
                   help=f"the directory to create (default {DEFAULT_STATE})")
    i.set_defaults(func=cmd_init)

    sh = sub.add_parser("shell", help="targetcli-style configuration shell",
                        description="Interactive without arguments; otherwise runs one "
                        "command line, e.g. 'liverestore shell /pairs/db1/db1-clone restore'.")
    sh.add_argument("line", nargs=argparse.REMAINDER, help="[PATH] COMMAND [ARGS]")
    sh.set_defaults(func=cmd_shell)

    d = sub.add_parser("demo", help="serve a demo source + clone pair, exported over iSCSI")
    d.add_argument("--state-dir", default=os.path.join(DEFAULT_STATE, "demo"),
                   help="where the demo keeps its database and images "
                   f"(default {DEFAULT_STATE}/demo)")
    d.add_argument("--portal", help="HOST:PORT (default 127.0.0.1:3260)")
    d.add_argument("--size", help="size of the demo volumes (default 1G; with --tour 64M)")
    d.add_argument("--tour", action="store_true",
                   help="run the whole story unattended and narrate it: write, fracture, "
                        "damage, restore while reading, verify (needs no client tools)")
    d.add_argument("--tour-state-dir", metavar="DIR",
                   help="keep the tour's state here (default: a temporary directory)")
    d.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    d.set_defaults(func=cmd_demo)

    # volumes
    v = sub.add_parser("volume", help="image files, block devices and Ceph RBD images"
                       ).add_subparsers(dest="sub", metavar="ACTION", required=True)
    p = client_cmd(v, "create", "create (or adopt) a volume", "volume.create", "volume",
                   lambda a: {"name": a.name, "path": client_path(a.path), "size": a.size,
                              "extent_size": a.extent_size, **_rbd_args(a)})
    p.add_argument("name", help="the volume's name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--path", help="image file or block device (default: in the state dir); "
                       "an existing one is adopted as it is")
    where.add_argument("--rbd", metavar="POOL/IMAGE", help="a Ceph RBD image (created with "
                       "--size if missing; an existing one is adopted at its own size)")
    p.add_argument("--size", help="size for a new image, e.g. 10G (for an existing one: "
                   "leave out, or its exact size)")
    p.add_argument("--extent-size", default="64K", help="default extent size of its pairs")
    _ceph_options(p)
    p = client_cmd(v, "delete", "forget a volume (the file stays)", "volume.delete", "deleted",
                   lambda a: {"name": a.name})
    p.add_argument("name", help="the volume's name")
    p = client_cmd(v, "resize", "grow a volume (never shrinks)", "volume.resize", "volume",
                   lambda a: {"name": a.name, "size": a.size})
    p.add_argument("name", help="the volume's name")
    p.add_argument("size", help="the new size, e.g. 20G (a block device: grow it first)")
    p = client_cmd(v, "relink", "point an offline volume at its image's new place (an RBD "
                   "volume: reopen it)", "volume.relink", "volume",
                   lambda a: {"name": a.name, "path": client_path(a.path), **_rbd_args(a)})
    p.add_argument("name", help="the volume's name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--path", help="the image (same size as the volume)")
    where.add_argument("--rbd", metavar="POOL/IMAGE", help="an RBD image (same size); "
                       "an RBD volume without it reopens its own image")
    _ceph_options(p)
    client_cmd(v, "list", "list volumes", "volume.list", "volumes")
    p = client_cmd(v, "show", "one volume in detail", "volume.show", "volume_detail",
                   lambda a: {"name": a.name})
    p.add_argument("name", help="the volume's name")

    # pairs
    pr = sub.add_parser("pair", help="source/clone pairs").add_subparsers(
        dest="sub", metavar="ACTION", required=True)

    def with_wait(p):
        p.add_argument("--wait", action="store_true",
                       help="follow the job to its end (a live bar on a terminal; "
                       "exit status below)")
        p.epilog = EXIT_HELP[0].upper() + EXIT_HELP[1:] + "."
        return p

    p = with_wait(client_cmd(pr, "create", "pair a clone with a source (full sync)", "pair.create",
                             "pair", lambda a: {"source": a.source, "clone": a.clone,
                                                "extent_size": a.extent_size,
                                                "sync": not a.no_sync, **_throttle_kw(a)}))
    p.add_argument("source", help="the volume hosts use")
    p.add_argument("clone", help="its clone, the same size (also the pair's name)")
    p.add_argument("--extent-size", help="unit of tracking and copying, e.g. 64K "
                   "(default: the source volume's)")
    p.add_argument("--no-sync", action="store_true",
                   help="start fractured with every extent marked different")
    for name, op, h in (("fracture", "pair.fracture", "split the clone off"),
                        ("pause", "pair.pause", "hold the background copy"),
                        ("resume", "pair.resume", "continue the background copy")):
        p = client_cmd(pr, name, h, op, "pair", lambda a: {"pair": a.pair})
        p.add_argument("pair", help=PAIR_HELP)
    p = with_wait(client_cmd(pr, "sync", "copy source -> clone (delta extents)", "pair.sync", "pair",
                             lambda a: {"pair": a.pair, "full": a.full}))
    p.add_argument("pair", help=PAIR_HELP)
    p.add_argument("--full", action="store_true", help="copy every extent")
    p = with_wait(client_cmd(pr, "restore", "copy clone -> source while hosts use it",
                             "pair.restore", "pair",
                             lambda a: {"pair": a.pair, "protected": not a.unprotected,
                                        "keep_undo": a.keep_undo,
                                        "undo_volume": a.undo_volume}))
    p.add_argument("pair", help=PAIR_HELP)
    p.add_argument("--unprotected", action="store_true",
                   help="mirror host writes to the clone; the pair ends synchronized")
    p.add_argument("--keep-undo", action="store_true",
                   help="save what the restore overwrites, so that 'pair abort' can put it "
                   "back (until 'pair commit'); costs about half the restore's speed")
    p.add_argument("--undo-volume", metavar="VOLUME",
                   help="with --keep-undo: save into this volume (in no pair, at least as "
                   "big; NOT READY to hosts meanwhile) instead of a sparse image the daemon "
                   "makes beside the source")
    p = with_wait(client_cmd(pr, "abort", "undo a --keep-undo restore (running or finished): "
                             "put back what it overwrote, except what hosts wrote since",
                             "pair.abort", "pair", lambda a: {"pair": a.pair}))
    p.add_argument("pair", help=PAIR_HELP)
    p = client_cmd(pr, "commit", "keep a finished --keep-undo restore: discard its undo image",
                   "pair.commit", "pair", lambda a: {"pair": a.pair})
    p.add_argument("pair", help=PAIR_HELP)
    p = client_cmd(pr, "throttle", "background copy knobs", "pair.throttle", "throttle",
                   lambda a: {"pair": a.pair, **_throttle_kw(a)})
    p.add_argument("pair", help=PAIR_HELP)
    for k in KNOBS:
        p.add_argument("--" + k.name.replace("_", "-"), type=None if k.size else int,
                       help=k.help.replace("%", "%%"))
    p = client_cmd(pr, "delete", "remove the pairing (volumes stay)", "pair.delete", "deleted",
                   lambda a: {"pair": a.pair, "force": a.force})
    p.add_argument("pair", help=PAIR_HELP)
    p.add_argument("--force", action="store_true", help="even during a restore")
    p = client_cmd(pr, "wait", "follow a pair's job to its end (live progress)", "pair.show",
                   "pair", lambda a: {"pair": a.pair})
    p.epilog = EXIT_HELP[0].upper() + EXIT_HELP[1:] + "."
    p.add_argument("pair", help=PAIR_HELP)
    p.set_defaults(wait=True)
    p = client_cmd(pr, "acknowledge", "serve a held pair again (every extent then differs)",
                   "pair.acknowledge", "acknowledged", lambda a: {"pair": a.pair})
    p.add_argument("pair", help=PAIR_HELP)
    client_cmd(pr, "list", "list pairs", "pair.list", "pairs")
    p = client_cmd(pr, "show", "one pair in detail", "pair.show", "pair_detail",
                   lambda a: {"pair": a.pair})
    p.add_argument("pair", help=PAIR_HELP)

    add_group_parser(sub, _print_table)
    add_export_commands(sub, client_cmd)

    client_cmd(sub, "status", "volumes, pairs, restores and exports", "status", "status")
    p = sub.add_parser("saveconfig", help="write the configuration as JSON")
    p.add_argument("file", nargs="?", default="-",
                   help="where to write it, mode 0600 (default: standard output)")
    p.set_defaults(func=cmd_saveconfig, json=True)
    p = sub.add_parser("restoreconfig", help="create what a saved configuration has")
    p.add_argument("file", help="a file written by saveconfig")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_restoreconfig)
    for leaf in _leaves(ap):
        # After the command too (`liverestore status --socket S`); SUPPRESS
        # keeps the top-level value when it is not given here.
        leaf.add_argument("--socket", default=argparse.SUPPRESS,
                          help=f"control socket (default ${SOCKET_ENV}, else {DEFAULT_SOCKET})")
    return ap


def cmd_saveconfig(args: argparse.Namespace) -> int:
    with Client(args.socket) as c:
        cfg = c.call("saveconfig")
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    if args.file == "-":
        sys.stdout.write(text)
    else:
        write_private(args.file, text)
        print(f"saved to {args.file}")
    return 0


def cmd_restoreconfig(args: argparse.Namespace) -> int:
    try:
        with open(args.file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ControlError(f"cannot read {args.file}: {e}") from None
    with Client(args.socket) as c:
        _show(args, c.call("restoreconfig", config=cfg), "created")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    # Tab completion: answers and exits only when bash's completion hook
    # runs us (_ARGCOMPLETE set); otherwise it returns at once.
    argcomplete.autocomplete(ap)
    args = ap.parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()        # inside the try: a closed pipe is noticed here
        return status
    except BrokenPipeError:
        # `liverestore status | head`: the reader has what it wanted. Say
        # nothing, and keep the interpreter's last flush from complaining.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except ControlError as e:
        print(f"liverestore: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"liverestore: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
