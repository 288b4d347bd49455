"""Manual-testing entry point: serve image files as LUNs of one target.

    python -m target.iscsi --lun0 /tmp/disk0.img:1G --lun1 /tmp/disk1.img:64M \\
        --portal 127.0.0.1:3261 --portal [::1]:3261 [--iqn IQN] [--chap USER:SECRET]

Files are created (sparse) if missing. Uses the SCSI emulation in
target.scsi (LunSet/ScsiDevice over PlainLunIO). Ctrl-C stops gracefully.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import re
import signal
import sys

from restore_core.stores.file import FileBlockStore
from restore_core.plain_lunio import PlainLunIO
from target.scsi import DeviceIdentity, LunSet, ScsiDevice

from .server import IscsiServer, IscsiTargetConfig

log = logging.getLogger("target.iscsi")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_portal(text: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"portal must be HOST:PORT or [V6]:PORT, not {text!r}")
    if m.group(1):
        return m.group(1), int(m.group(2))
    return m.group(3), int(m.group(4))


def build_lunset(files: dict[int, tuple[str, int]], iqn: str):
    """A target.scsi LunSet with one ScsiDevice per image file."""
    devices = {}
    for lun, (path, size) in files.items():
        h = hashlib.sha256(f"{iqn}/{lun}/{path}".encode()).hexdigest()
        ident = DeviceIdentity(product_id="liverestore", revision="0001", serial=h[:16],
                               naa="5" + h[:15], t10_vendor_id=h[:32])
        store = FileBlockStore(path, size, create=True)
        devices[lun] = ScsiDevice(PlainLunIO(store), ident)
    return LunSet(devices)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    luns: dict[int, tuple[str, int]] = {}
    rest = []
    i = 0
    while i < len(argv):
        m = re.fullmatch(r"--lun(\d+)(?:=(.*))?", argv[i])
        if m:
            value = m.group(2)
            if value is None:
                i += 1
                value = argv[i] if i < len(argv) else ""
            path, _, size = value.rpartition(":")
            if not path:
                print(f"--lun{m.group(1)} wants FILE:SIZE", file=sys.stderr)
                return 2
            luns[int(m.group(1))] = (path, parse_size(size))
        else:
            rest.append(argv[i])
        i += 1
    ap = argparse.ArgumentParser(prog="python -m target.iscsi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--portal", action="append", type=parse_portal, default=[],
                    help="HOST:PORT to listen on (repeatable; default 127.0.0.1:3261)")
    ap.add_argument("--iqn", default="iqn.2025-01.io.liverestore:test")
    ap.add_argument("--tpgt", type=int, default=1)
    ap.add_argument("--acl", action="append", help="allowed initiator IQN (repeatable)")
    ap.add_argument("--chap", help="USER:SECRET the initiator must present")
    ap.add_argument("--mutual-chap", help="USER:SECRET the target answers mutual CHAP with")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(rest)
    if not luns:
        ap.error("at least one --lunN FILE:SIZE is required")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    chap = tuple(args.chap.split(":", 1)) if args.chap else None
    mutual = tuple(args.mutual_chap.split(":", 1)) if args.mutual_chap else None
    try:
        scsi = build_lunset(luns, args.iqn)
        cfg = IscsiTargetConfig(args.iqn, scsi, tpgt=args.tpgt,
                                acl=set(args.acl) if args.acl else None,
                                chap=chap, mutual_chap=mutual, alias="liverestore")
    except Exception as e:        # OSError, BlockStoreError (size mismatch), bad IQN/CHAP config
        print(f"error: {e}", file=sys.stderr)
        return 1
    portals = args.portal or [("127.0.0.1", 3261)]

    async def serve() -> None:
        server = IscsiServer([cfg], portals)
        try:
            await server.start()
        except OSError as e:
            print(f"error: cannot listen on {portals}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        print(f"serving {args.iqn} LUNs {sorted(luns)} on "
              + ", ".join(f"{h}:{p}" for h, p in server.addresses), flush=True)
        await stop.wait()
        log.info("stopping: %s", server.stats())
        await server.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
