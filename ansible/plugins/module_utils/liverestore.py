# -*- coding: utf-8 -*-
# Copyright: liverestore contributors
# Apache License 2.0 (see the liverestore repository)
"""Talk to the liverestore daemon's control socket from Ansible modules.

Why the protocol is spoken here with the standard library (socket + json)
rather than by importing ``target.control``: liverestore is installed in its
own virtualenv (``/opt/liverestore/.venv`` by the ``liverestore`` role),
while modules run under the managed host's ``ansible_python_interpreter``,
which normally cannot import it. The protocol is one JSON object per line
each way (``{"op", "args"}`` -> ``{"ok", "result"|"error"}``) and is the
stable API of the daemon, so about forty lines here avoid requiring
liverestore (and its compiled dependencies) in the system Python, and the
modules work the same whichever Python Ansible picks. Authorisation is the
daemon's: SO_PEERCRED on the socket (root, the daemon's user, or its
control group), so ``become`` is usually needed.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import re
import socket
import time
from fractions import Fraction

DEFAULT_SOCKET = "/run/liverestore/control.sock"
MAX_REPLY = 64 << 20


class LiverestoreError(Exception):
    """The daemon refused, or could not be reached; the message is one line.

    ``outcome`` is set when a followed job did not finish: paused, failed,
    aborted or waiting (a volume offline), the words and the order in which
    `liverestore ... --wait` decides them (its exit status 3, 4, 5, 6)."""

    def __init__(self, msg, outcome=None):
        super(LiverestoreError, self).__init__(msg)
        self.outcome = outcome


def common_argument_spec():
    return dict(
        socket=dict(type="path", default=DEFAULT_SOCKET),
        timeout=dict(type="int", default=3600),
    )


class Client(object):
    def __init__(self, path=DEFAULT_SOCKET, timeout=600):
        self.path = path
        self.timeout = timeout
        self._sock = None
        self._buf = b""

    def _connect(self):
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except (OSError, IOError) as e:
                s.close()
                why = getattr(e, "strerror", None) or str(e)
                if getattr(e, "errno", None) in (2, 111):
                    why = "no liverestore daemon listening (is the service running?)"
                elif getattr(e, "errno", None) in (1, 13):
                    why = "permission denied (use become, or the daemon's control group)"
                raise LiverestoreError("cannot reach %s: %s" % (self.path, why))
            self._sock = s
        return self._sock

    def call(self, op, **args):
        s = self._connect()
        try:
            s.sendall((json.dumps({"op": op, "args": args}) + "\n").encode("utf-8"))
            while b"\n" not in self._buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise LiverestoreError("the daemon closed the connection during %s" % op)
                self._buf += chunk
                if len(self._buf) > MAX_REPLY:
                    raise LiverestoreError("reply to %s is too large" % op)
        except socket.timeout:
            self.close()
            raise LiverestoreError("the daemon did not answer %s within %ss" % (op, self.timeout))
        except (OSError, IOError) as e:
            self.close()
            raise LiverestoreError("lost the daemon during %s: %s" % (op, e))
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line.decode("utf-8"))
        if not reply.get("ok"):
            raise LiverestoreError(reply.get("error") or "unknown error")
        return reply.get("result")

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text):
    """Bytes from 1048576, '512M', '1.5G', '2TiB' (the daemon's rules)."""
    if isinstance(text, int):
        return text
    m = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTPkmgtp]?)(i?[Bb])?\s*$", str(text))
    if not m:
        raise ValueError("bad size %r: use a number of bytes or e.g. 512M, 1.5G, 2T" % (text,))
    n = Fraction(m.group(1)) * _UNITS[m.group(2).upper()]
    if n.denominator != 1:
        raise ValueError("size %r is not a whole number of bytes" % (text,))
    return int(n)


def find(items, key, value):
    for item in items:
        if item.get(key) == value:
            return item
    return None


def exit_absent(module, client, current, before, op, **key):
    """state=absent: delete the object through ``op`` (not in check mode)
    and exit; unchanged if it did not exist."""
    if current is None:
        module.exit_json(changed=False)
    if not module.check_mode:
        client.call(op, **key)
    module.exit_json(changed=True, diff=dict(before=before, after={}))


class ActionRunner(object):
    """What the modules' Runners share: the module, its client and
    parameters, the control operations taken so far (in check mode only
    recorded) and the object they act on, kept under ``subject``."""

    subject = "object"

    def __init__(self, module, client):
        self.m = module
        self.c = client
        self.p = module.params
        self.actions = []
        setattr(self, self.subject, None)

    def act(self, op):
        """Record ``op``; whether to carry it out (not in check mode)."""
        self.actions.append(op)
        return not self.m.check_mode

    def fail(self, msg):
        self.m.fail_json(msg=msg, actions=self.actions,
                         **{self.subject: getattr(self, self.subject)})


def run_runner(module, make_runner, subject):
    """Drive a module's Runner (``run()``, ``actions`` and the object under
    ``subject``) against the daemon: exit with its result, or fail with the
    daemon's one-line refusal, the actions run so far, the object and the
    outcome of a followed job that did not finish."""
    client = Client(module.params["socket"], module.params["timeout"])
    runner = make_runner(module, client)
    try:
        module.exit_json(**runner.run())
    except LiverestoreError as e:
        module.fail_json(msg=str(e), actions=runner.actions, outcome=e.outcome,
                         **{subject: getattr(runner, subject)})
    finally:
        client.close()


def wait_job(client, pair, timeout, poll=0.5):
    """Follow a pair's job until it ends; bounded by timeout (seconds).

    Returns the pair; raises LiverestoreError if the job fails, is paused
    (it would never end) or outlives the timeout."""
    deadline = time.time() + timeout
    following = None
    while True:
        p = client.call("pair.show", pair=pair)
        pr = p["progress"]
        if following is None:
            following = pr["job"] or ""
        if pr.get("aborted") and following == "restore":
            raise LiverestoreError("%s: the restore was aborted (pair abort)" % pair, "aborted")
        if pr["job"] is None:
            return p
        if pr["error"]:
            raise LiverestoreError("%s: %s failed: %s (fix the cause, then resume the pair)"
                                   % (pair, pr["job"], pr["error"]), "failed")
        if pr["paused"]:
            raise LiverestoreError("%s: the %s is paused; resume it (liverestore pair resume %s)"
                                   % (pair, pr["job"], pair), "paused")
        if p.get("offline"):
            raise LiverestoreError("%s: the %s waits: %s (it resumes after liverestore volume "
                                   "relink)" % (pair, pr["job"], p["offline"]), "waiting")
        if time.time() > deadline:
            raise LiverestoreError("%s: %s not finished after %ss (%d/%d extents); it keeps "
                                   "running in the daemon" % (pair, pr["job"], timeout,
                                                              pr["extents_done"],
                                                              pr["extents_total"]))
        time.sleep(poll)
