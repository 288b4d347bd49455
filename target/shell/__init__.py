"""`liverestore shell`: a targetcli-style tree over the control socket.

The shell holds no state of its own and makes no decisions: every command
is one call of the control API (the same one the CLI and Ansible use), and
before each command line the tree is rebuilt from one `status` call, so what
`ls` shows is what the daemon has now.
"""
from __future__ import annotations

import os
import sys

from ..control import DEFAULT_SOCKET, Client, ControlError


def run(socket_path: str = DEFAULT_SOCKET, line: list[str] | None = None) -> int:
    """Interactive without `line`; otherwise run that one command line.

    Returns the exit status: 0, or 1 after an error (printed as one line)."""
    # configshell decides at import time whether it talks to a terminal.
    from .tree import LiverestoreShell

    client = Client(socket_path)
    try:
        client.call("status")          # fail early, in one line, if nobody is there
    except ControlError as e:
        print(f"liverestore: {e}", file=sys.stderr)
        return 1
    prefs = None
    if not line:   # history and preferences, owner-only; without them if that fails
        prefs = os.environ.get("LIVERESTORE_SHELL_PREFS") or os.path.expanduser("~/.liverestore")
        try:
            os.makedirs(prefs, mode=0o700, exist_ok=True)
            if not os.access(prefs, os.W_OK):
                prefs = None
        except OSError:
            prefs = None
    shell = LiverestoreShell(client, prefs)
    try:
        if line:
            shell.run_line(" ".join(line))
            return 1 if shell.failed else 0
        print("liverestore shell: 'help' for commands, 'ls' for the tree, "
              "'exit' or Ctrl-D to leave.")
        shell.run_interactive()
        return 0
    finally:
        client.close()
