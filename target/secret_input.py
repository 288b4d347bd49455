"""CHAP secrets into the CLI without putting them on its command line,
where every user sees them (ps, /proc/PID/cmdline) and the shell's history
keeps them: from a file ('-' for standard input) or a prompt on the
terminal."""
from __future__ import annotations

import argparse
import getpass
import sys

from .control import ControlError

REFUSED = ("a secret on the command line is visible to every user (ps) and kept in shell "
           "history: use --{opt}-file FILE ('-' for standard input), or leave it out to be "
           "prompted")


def literal_refused(opt: str):
    """argparse type of the old --chap-secret VALUE: '@FILE' still names a
    file; a literal secret is refused with the way to give it instead."""
    def parse(text: str) -> str:
        if text.startswith("@") and len(text) > 1:
            return text[1:]
        raise argparse.ArgumentTypeError(REFUSED.format(opt=opt))
    return parse


def read_secret(path: str | None, what: str) -> str:
    """The secret in ``path`` (its first line; '-': standard input), else
    asked twice on the terminal."""
    if path == "-":
        return sys.stdin.readline().rstrip("\r\n")
    if path:
        try:
            with open(path) as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise ControlError(f"cannot read the {what} from {path}: {e.strerror}") from None
    if not sys.stdin.isatty():
        raise ControlError(f"no {what} given and no terminal to ask on: give it in a file "
                           "(--chap-secret-file FILE, '-' for standard input)")
    first = getpass.getpass(f"{what}: ")
    if getpass.getpass(f"{what} again: ") != first:
        raise ControlError(f"the two {what}s differ; nothing was changed")
    return first
