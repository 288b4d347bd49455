# -*- coding: utf-8 -*-
# Options and attributes every liverestore.storage module shares: they all
# talk to the daemon's control socket and support check and diff mode.
from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  socket:
    description: The daemon's control socket.
    type: path
    default: /run/liverestore/control.sock
  timeout:
    description: Seconds to wait for the daemon's answer.
    type: int
    default: 3600
notes:
  - Talks to the daemon only; liverestore need not be importable by the Python running the module.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
"""
