"""Apply or remove a LIO description (JSON) through rtslib-fb.

    python -m target.lio plan|apply|teardown DESCRIPTION.json [--prune]

``plan`` shows what ``apply`` would change; both are idempotent. Prints one
line per change ("no changes" when there is nothing to do).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .rts import LioConfigurator
from .spec import Description


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m target.lio")
    ap.add_argument("action", choices=["plan", "apply", "teardown"])
    ap.add_argument("description", help="JSON file ('-' for stdin)")
    ap.add_argument("--prune", action="store_true",
                    help="also remove user:liverestore backstores not in the description")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    f = sys.stdin if args.description == "-" else open(args.description)
    desc = Description.from_dict(json.load(f))
    lio = LioConfigurator()
    if args.action == "teardown":
        rep = lio.teardown(desc)
    else:
        rep = lio.apply(desc, prune=args.prune, dry_run=args.action == "plan")
    for line in rep.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
