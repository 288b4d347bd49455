"""Serve ``user:liverestore`` TCMU devices from image files.

    python -m target.tcmu --backing CONFIG=PATH [--backing ...] [--rescan S]

For a uio device whose config is CONFIG, PATH is opened as a
FileBlockStore of the device's size (created sparse if missing) and served
through PlainLunIO and the SCSI layer (ScsiDevice in a LunSet, LUN 0).
Runs until SIGTERM/SIGINT. The liverestore daemon does the same with
restore-aware LunIO objects instead of PlainLunIO.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from restore_core.stores.file import FileBlockStore
from restore_core.plain_lunio import PlainLunIO

from .handler import TcmuHandler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m target.tcmu")
    ap.add_argument("--backing", action="append", default=[], metavar="CONFIG=PATH")
    ap.add_argument("--subtype", default="liverestore")
    ap.add_argument("--rescan", type=float, default=5.0, help="seconds between safety rescans")
    ap.add_argument("--no-netlink", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tcmu %(levelname)s %(message)s")
    backing = dict(b.split("=", 1) for b in args.backing)
    stores: dict[str, FileBlockStore] = {}

    def open_device(config: str, size: int, block_size: int):
        if config not in backing:
            raise LookupError(f"no backing file for config {config!r}")
        store = FileBlockStore(backing[config], size, create=True)
        stores[config] = store
        return PlainLunIO(store)

    def close_device(config: str, _obj) -> None:
        store = stores.pop(config, None)
        if store is not None:
            store.close()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        handler = TcmuHandler(open_device, close_device=close_device, subtype=args.subtype,
                              use_netlink=not args.no_netlink, rescan_interval=args.rescan)
        await handler.start()
        logging.info("handler ready: %d device(s): %s", len(handler.devices), sorted(handler.devices))
        await stop.wait()
        await handler.stop()
        logging.info("handler stopped")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
