"""The `liverestore` command line.

Every subcommand but `serve` and `demo` is a client of the daemon's control
socket (the same API the shell and Ansible use). Errors are one line on
stderr and a non-zero exit status; --json prints machine-readable output.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from .cli_shared import client_path, wait_job, write_private
from .control import DEFAULT_SOCKET, Client, ControlError
from .errors import ServiceError
from .fmt import eta as _eta, human as _human

DEFAULT_STATE = "/var/lib/liverestore"
DEMO_IQN = "iqn.2026-11.io.liverestore:demo"

EXIT_ERROR = 1
EXIT_USAGE = 2


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
            ("exported_by", "EXPORT"), ("path", "PATH")]


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


def _vol_rows(vols: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**v, "size_h": _human(v["size"]),
             "access": f"OFFLINE: {v['offline']}" if v.get("offline") else v["access"]}
            for v in vols]


def _export_rows(exports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"iqn": e["iqn"], "luns": ", ".join(f"{k}:{v}" for k, v in sorted(
        e["luns"].items(), key=lambda kv: int(kv[0]))),
        "acl": ", ".join(e["acl"]) if e["acl"] else "any",
        "auth": "mutual CHAP" if e["mutual_chap"] else ("CHAP" if e["chap"] else "none")}
        for e in exports]


EXPORT_COLS = [("iqn", "TARGET"), ("luns", "LUNS"), ("acl", "ACL"), ("auth", "AUTH")]


def _show(args: argparse.Namespace, result: Any, kind: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    if kind == "pairs":
        _print_table([_pair_row(p) for p in result], PAIR_COLS)
        _print_pair_notes(result)
    elif kind == "pair":
        _print_table([_pair_row(result)], PAIR_COLS)
        _print_pair_notes([result])
    elif kind == "acknowledged":
        print(result["message"])
    elif kind == "volumes":
        _print_table(_vol_rows(result), VOL_COLS)
    elif kind == "volume":
        _print_table(_vol_rows([result]), VOL_COLS)
    elif kind == "exports":
        _print_table(_export_rows(result), EXPORT_COLS)
    elif kind == "export":
        _print_table(_export_rows([result]), EXPORT_COLS)
    elif kind == "status":
        print(f"portals: {', '.join(result['portals'])}   sessions: "
              f"{result['iscsi'].get('sessions', 0)}")
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


# -- commands -------------------------------------------------------------------------
def cmd_client(args: argparse.Namespace) -> int:
    with Client(args.socket) as c:
        op, kw, kind = args.op(args)
        result = c.call(op, **kw)
        if getattr(args, "wait", False) and op.startswith("pair.") and isinstance(result, dict):
            result = wait_job(c, result["id"], args.json)
        _show(args, result, kind)
    return 0


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
    try:
        asyncio.run(serve(args.state_dir, args.socket, init=args.init, portals=portals,
                          backend=args.backend, volume_dirs=args.volume_dir,
                          group=args.group, memory_limit=args.memory_limit))
    except ServiceError as e:
        print(f"liverestore: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up a demo source + clone, export both, and serve in the foreground."""
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
            await service.volume_create("demo-src", size=args.size)
        if service.config.volume("demo-clone") is None:
            await service.volume_create("demo-clone", size=args.size)
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


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _throttle_kw(a: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(a, k) for k in ("rate", "batch_extents", "depth", "host_yield_ms",
                                 "host_pause_us")
            if getattr(a, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="liverestore",
                                 description="restore a LUN from its clone while hosts use it")
    ap.add_argument("--socket", default=os.environ.get("LIVERESTORE_SOCKET", DEFAULT_SOCKET),
                    help=f"control socket (default {DEFAULT_SOCKET})")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def client_cmd(parent, name, help_, op, kind="raw", build=None):
        p = parent.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_client,
                       op=lambda a, op=op, build=build, kind=kind: (op, build(a) if build else {}, kind))
        return p

    s = sub.add_parser("serve", help="run the daemon (iSCSI target + control socket)")
    s.add_argument("--state-dir", default=DEFAULT_STATE)
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
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("init", help="create the state directory (0700) and database, once")
    i.add_argument("--state-dir", default=DEFAULT_STATE)
    i.set_defaults(func=cmd_init)

    sh = sub.add_parser("shell", help="targetcli-style configuration shell",
                        description="Interactive without arguments; otherwise runs one "
                        "command line, e.g. 'liverestore shell /pairs/db1/db1-clone restore'.")
    sh.add_argument("line", nargs=argparse.REMAINDER, help="[PATH] COMMAND [ARGS]")
    sh.set_defaults(func=cmd_shell)

    d = sub.add_parser("demo", help="serve a demo source + clone pair, exported over iSCSI")
    d.add_argument("--state-dir", default=os.path.join(DEFAULT_STATE, "demo"))
    d.add_argument("--portal", help="HOST:PORT (default 127.0.0.1:3260)")
    d.add_argument("--size", default="1G", help="size of the demo volumes (default 1G)")
    d.add_argument("-v", "--verbose", action="store_true")
    d.set_defaults(func=cmd_demo)

    # volumes
    v = sub.add_parser("volume", help="image files and block devices").add_subparsers(
        dest="sub", metavar="ACTION", required=True)
    p = client_cmd(v, "create", "create (or adopt) a volume", "volume.create", "volume",
                   lambda a: {"name": a.name, "path": client_path(a.path), "size": a.size,
                              "extent_size": a.extent_size})
    p.add_argument("name")
    p.add_argument("--path", help="image file or block device (default: in the state dir); "
                   "an existing one is adopted as it is")
    p.add_argument("--size", help="size for a new image file, e.g. 10G (for an existing one: "
                   "leave out, or its exact size)")
    p.add_argument("--extent-size", default="64K", help="default extent size of its pairs")
    p = client_cmd(v, "delete", "forget a volume (the file stays)", "volume.delete", "raw",
                   lambda a: {"name": a.name})
    p.add_argument("name")
    p = client_cmd(v, "resize", "grow a volume (never shrinks)", "volume.resize", "volume",
                   lambda a: {"name": a.name, "size": a.size})
    p.add_argument("name")
    p.add_argument("size", help="the new size, e.g. 20G (a block device: grow it first)")
    p = client_cmd(v, "relink", "point an offline volume at its image's new place",
                   "volume.relink", "volume",
                   lambda a: {"name": a.name, "path": client_path(a.path)})
    p.add_argument("name")
    p.add_argument("--path", required=True, help="the image (same size as the volume)")
    client_cmd(v, "list", "list volumes", "volume.list", "volumes")
    p = client_cmd(v, "show", "one volume", "volume.show", "volume", lambda a: {"name": a.name})
    p.add_argument("name")

    # pairs
    pr = sub.add_parser("pair", help="source/clone pairs").add_subparsers(
        dest="sub", metavar="ACTION", required=True)

    def with_wait(p):
        p.add_argument("--wait", action="store_true", help="follow the job to its end")
        return p

    p = with_wait(client_cmd(pr, "create", "pair a clone with a source (full sync)", "pair.create",
                             "pair", lambda a: {"source": a.source, "clone": a.clone,
                                                "extent_size": a.extent_size,
                                                "sync": not a.no_sync, **_throttle_kw(a)}))
    p.add_argument("source")
    p.add_argument("clone")
    p.add_argument("--extent-size")
    p.add_argument("--no-sync", action="store_true",
                   help="start fractured with every extent marked different")
    for name, op, h in (("fracture", "pair.fracture", "split the clone off"),
                        ("pause", "pair.pause", "hold the background copy"),
                        ("resume", "pair.resume", "continue the background copy")):
        p = client_cmd(pr, name, h, op, "pair", lambda a: {"pair": a.pair})
        p.add_argument("pair", help="the clone's name, or SOURCE/CLONE")
    p = with_wait(client_cmd(pr, "sync", "copy source -> clone (delta extents)", "pair.sync", "pair",
                             lambda a: {"pair": a.pair, "full": a.full}))
    p.add_argument("pair")
    p.add_argument("--full", action="store_true", help="copy every extent")
    p = with_wait(client_cmd(pr, "restore", "copy clone -> source while hosts use it",
                             "pair.restore", "pair",
                             lambda a: {"pair": a.pair, "protected": not a.unprotected}))
    p.add_argument("pair")
    p.add_argument("--unprotected", action="store_true",
                   help="mirror host writes to the clone; the pair ends synchronized")
    p = client_cmd(pr, "throttle", "background copy knobs", "pair.throttle", "pair",
                   lambda a: {"pair": a.pair, **_throttle_kw(a)})
    p.add_argument("pair")
    for sp in (p,):
        sp.add_argument("--rate", help="bytes/s, e.g. 200M (0: unlimited)")
        sp.add_argument("--batch-extents", type=int)
        sp.add_argument("--depth", type=int)
        sp.add_argument("--host-yield-ms", type=int)
        sp.add_argument("--host-pause-us", type=int,
                        help="pause between copies while hosts are active (0: none)")
    p = client_cmd(pr, "delete", "remove the pairing (volumes stay)", "pair.delete", "raw",
                   lambda a: {"pair": a.pair, "force": a.force})
    p.add_argument("pair")
    p.add_argument("--force", action="store_true", help="even during a restore")
    p = client_cmd(pr, "wait", "follow a pair's job to its end (live progress)", "pair.show",
                   "pair", lambda a: {"pair": a.pair})
    p.add_argument("pair")
    p.set_defaults(wait=True)
    p = client_cmd(pr, "acknowledge", "serve a held pair again (every extent then differs)",
                   "pair.acknowledge", "acknowledged", lambda a: {"pair": a.pair})
    p.add_argument("pair")
    client_cmd(pr, "list", "list pairs", "pair.list", "pairs")
    p = client_cmd(pr, "show", "one pair", "pair.show", "pair", lambda a: {"pair": a.pair})
    p.add_argument("pair")

    # exports
    ex = sub.add_parser("export", help="iSCSI targets").add_subparsers(
        dest="sub", metavar="ACTION", required=True)
    p = client_cmd(ex, "create", "export volumes as LUNs of an iSCSI target", "export.create",
                   "export", lambda a: {"iqn": a.iqn, "luns": dict(_lun(x) for x in a.lun),
                                        "acl": a.acl, "chap_user": a.chap_user,
                                        "chap_secret": _secret(a.chap_secret),
                                        "mutual_user": a.mutual_user,
                                        "mutual_secret": _secret(a.mutual_secret)})
    p.add_argument("iqn")
    p.add_argument("--lun", action="append", default=[], metavar="N=VOLUME")
    p.add_argument("--acl", action="append", metavar="INITIATOR_IQN")
    p.add_argument("--chap-user")
    p.add_argument("--chap-secret", help="or @FILE to read it from a file")
    p.add_argument("--mutual-user")
    p.add_argument("--mutual-secret", help="or @FILE")
    p = client_cmd(ex, "delete", "remove an iSCSI target", "export.delete", "raw",
                   lambda a: {"iqn": a.iqn})
    p.add_argument("iqn")
    client_cmd(ex, "list", "list iSCSI targets", "export.list", "exports")
    p = client_cmd(ex, "show", "one iSCSI target", "export.show", "export",
                   lambda a: {"iqn": a.iqn})
    p.add_argument("iqn")
    p = client_cmd(ex, "portal", "set the listening portals (applied at restart)", "portal.set",
                   "raw", lambda a: {"portals": a.portals})
    p.add_argument("portals", nargs="+", metavar="HOST:PORT")

    client_cmd(sub, "status", "volumes, pairs, restores and exports", "status", "status")
    p = sub.add_parser("saveconfig", help="write the configuration as JSON")
    p.add_argument("file", nargs="?", default="-")
    p.set_defaults(func=cmd_saveconfig, json=True)
    p = sub.add_parser("restoreconfig", help="create what a saved configuration has")
    p.add_argument("file")
    p.set_defaults(func=cmd_restoreconfig, json=True)
    return ap


def _lun(text: str) -> tuple[str, str]:
    n, sep, vol = text.partition("=")
    if not sep or not n.isdigit() or not vol:
        raise ControlError(f"--lun wants N=VOLUME, not {text!r}")
    return n, vol


def _secret(text: str | None) -> str | None:
    if text and text.startswith("@"):
        try:
            with open(text[1:]) as f:
                return f.read().strip()
        except OSError as e:
            raise ControlError(f"cannot read secret file {text[1:]}: {e.strerror}") from None
    return text


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
        print(json.dumps(c.call("restoreconfig", config=cfg), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
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
