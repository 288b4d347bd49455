"""`liverestore events`: the daemon's recent events, and with --follow each
new one as it happens (target.events says what they are)."""
from __future__ import annotations

import argparse
import json
import sys

from .control import Client
from .events import format_event


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="the daemon's recent events and audit trail",
                       description="Control operations (with the caller's uid/pid and "
                       "result), job start/pause/resume/finish/fail and rejected iSCSI "
                       "logins, oldest first.")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print each new event as it happens, until Ctrl-C")
    p.add_argument("-n", "--limit", type=int, default=None, metavar="N",
                   help="only the last N recent events (default: all the daemon keeps)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace) -> int:
    with Client(args.socket) as c:
        try:
            for ev in c.events(limit=args.limit, follow=args.follow):
                print(json.dumps(ev, sort_keys=True) if args.json else format_event(ev),
                      flush=True)
        except KeyboardInterrupt:
            pass            # the normal end of --follow
        except BrokenPipeError:
            sys.stderr.close()      # piped into head: not an error
    return 0
