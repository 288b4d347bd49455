"""The control API answers every request with one line, whatever is sent:
argument types are checked against the service method's signature before
it runs, malformed lines are refused, no answer is the control's "internal
error" (an exception the op did not turn into a ServiceError) and nothing
reaches the log as a traceback."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.control import MAX_DEPTH, MAX_REQUEST
from target.service import Service
from tests.support import Daemon


@pytest.mark.parametrize("op", sorted(Service.OPS))
def test_every_op_has_a_checkable_signature(op) -> None:
    """A new op whose hints the checker cannot read fails here, not on a request."""
    sig = Service.signature(op)
    assert "peer" not in sig.params and "self" not in sig.params


class Raw:
    """A control-socket client that sends bytes as they are."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def ask(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the connection without a reply"
            self.buf += chunk
        reply, self.buf = self.buf.split(b"\n", 1)
        out = json.loads(reply)
        assert isinstance(out, dict) and isinstance(out.get("ok"), bool), out
        if not out["ok"]:
            assert isinstance(out["error"], str) and "\n" not in out["error"]
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("control")
    # The daemon's working directory is the temporary dir: a fuzzed relative
    # path must never create files in the source tree.
    d = Daemon(tmp, cwd=str(tmp)).start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.stop(signal.SIGKILL)


#: What logging writes for log.exception: a line that *starts* with this.
#: Client text reaches the log escaped onto one line (logsafe.clip, the
#: events' JSON), so an argument that contains these words cannot start a
#: line: searching the whole text instead failed whenever Hypothesis drew a
#: string constant of the source ("internal error") as an argument and the
#: audit event echoed it.
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.M)


def _clean_log(d: Daemon) -> None:
    text = open(d.log).read()
    m = _TRACEBACK.search(text)
    assert m is None, text[max(0, m.start() - 2000):m.start() + 2000]


def _no_internal_error(op: str, reply: dict[str, Any]) -> None:
    """The control's answer to an exception its op let through begins with
    this (target/control.py); a ServiceError's text never does."""
    assert reply["ok"] or not reply["error"].startswith(f"internal error in {op}: "), reply


def ask(d: Daemon, obj: Any) -> dict[str, Any]:
    c = Raw(d.sock)
    try:
        reply = c.ask(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
    finally:
        c.close()
    if isinstance(obj, dict) and isinstance(obj.get("op"), str):
        _no_internal_error(obj["op"], reply)
    return reply


@pytest.mark.parametrize("args, expect", [
    ({"name": 5}, "volume.create: name must be a string"),
    ({"name": "v", "size": [1]}, "volume.create: size"),
    ({"name": "v", "path": {}}, "volume.create: path must be a string or null"),
    ({"name": "v", "colour": "red"}, "volume.create: unknown argument 'colour'"),
    ({"name": "v", "peer": "root"}, "volume.create: unknown argument 'peer'"),
    ({}, "volume.create: missing argument name"),
    ({"name": "v\x00"}, "volume.create: name contains a NUL character"),
])
def test_wrong_argument_types_get_one_line(live, args, expect) -> None:
    r = ask(live, {"op": "volume.create", "args": args})
    assert r["ok"] is False and expect in r["error"], r
    _clean_log(live)


@pytest.mark.parametrize("line, expect", [
    (b"[" * 100_000 + b"]" * 100_000, "malformed request"),
    (b'{"op": "status", "args": ' + b'[' * (MAX_DEPTH + 1) + b']' * (MAX_DEPTH + 1) + b'}',
     "nested deeper"),
    (b"\xff\xfe\x00garbage", "malformed request"),
    (b"[1, 2]", "not a JSON object"),
    (b'"status"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"op": 5}', "op must be a string"),
    (b'{"op": "status", "args": []}', "args must be an object"),
    (b'{"op": "status", "args": 0}', "args must be an object"),
    (b'{"op": "status", "extra": 1}', "unknown key"),
    (b'{"op": "pair.wait", "args": {"pair": "p", "timeout": NaN}}', "not JSON"),
    (b'{"op": "no.such"}', "unknown operation"),
    (b'{"op": "status", "args": {"x": 1' + b"0" * 5000 + b'}}', "not JSON"),   # int > 4300 digits
    (b'{"op": "status", "args": {"x": "' + b"a" * 10_000 + b'"}}', "unknown argument"),
])
def test_malformed_requests_get_one_line(live, line, expect) -> None:
    r = ask(live, line)
    assert r["ok"] is False and expect in r["error"], r
    assert len(r["error"]) < 1200
    _clean_log(live)


def test_oversized_request_gets_one_line(live) -> None:
    r = ask(live, b'{"op": "status", "args": {"x": "' + b"a" * MAX_REQUEST + b'"}}')
    assert r == {"ok": False, "error": "request too large"}
    _clean_log(live)


@pytest.mark.parametrize("text", [
    "internal error",
    "internal error in volume.create: KeyError: 'x'",
    "Traceback (most recent call last):",
    "\nTraceback (most recent call last):\n  File \"x\", line 1\n",
])
def test_words_of_a_failure_in_arguments_are_not_one(live, text) -> None:
    """The audit event echoes a refused request's arguments (escaped onto
    its line): a client's text that looks like a failure does not make one,
    so the fuzz below cannot fail on a string it drew."""
    r = ask(live, {"op": "volume.create", "args": {"name": "v", "path": text}})
    assert r["ok"] is False, r
    words = text.strip().split("\n")[0]
    assert words in open(live.log).read(), "the log no longer echoes the argument: test moot"
    _clean_log(live)


# -- fuzz: random JSON values of every type to every operation ---------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
    | st.sampled_from(["", "0", "v1", "512", "1M", "iqn.2026-11.io.test:t", "v1/v2", "lun0",
                       "127.0.0.1:3260", "\n", "v\n", "\u2028"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@st.composite
def requests(draw) -> tuple[str, dict[str, Any]]:
    op = draw(st.sampled_from(sorted(Service.OPS)))
    names = list(Service.signature(op).params)
    keys = draw(st.lists(st.sampled_from(names) if names else st.nothing(), unique=True,
                         max_size=len(names)) if names else st.just([]))
    args = {k: draw(json_values) for k in keys}
    if op == "restoreconfig" and draw(st.booleans()):
        # Mostly well-formed documents, so the fuzz reaches past the version check.
        sections = st.sampled_from(["portals", "volumes", "pairs", "targets", "extra"])
        doc = {"version": 1}
        doc.update(draw(st.dictionaries(sections, json_values, max_size=3)))
        args = {"config": doc}
    if draw(st.booleans()):
        args.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return op, args


@settings(max_examples=int(os.environ.get("LR_FUZZ_EXAMPLES", "600")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests())
def test_fuzz_every_op_answers_one_line(live, req) -> None:
    op, args = req
    r = ask(live, {"op": op, "args": args})
    assert r["ok"] in (True, False)
    assert live.proc.poll() is None, "the daemon died"
    _clean_log(live)


# -- names: refused where they enter ----------------------------------------------------------
@pytest.mark.parametrize("op, args, expect", [
    ("volume.create", {"name": "v\n", "size": "1M"}, "invalid volume name"),
    ("volume.create", {"name": "v\u2028", "size": "1M"}, "invalid volume name"),
    ("export.create", {"iqn": "iqn.2026-11.io.test:t\n"}, "not an iSCSI name"),
    ("export.create", {"iqn": "iqn.2026-11.io.test:t\r"}, "not an iSCSI name"),
    ("export.create", {"iqn": "iqn.2026-11.io.test:t", "acl": ["iqn.2026-11.io.h:x\n"]},
     "not an initiator iSCSI name"),
    ("export.create", {"iqn": "iqn.2026-11.io.test:t2", "chap_user": "u\n",
                       "chap_secret": "s3cret-s3cret"}, "CHAP user"),
    ("export.create", {"iqn": "iqn.2026-11.io.test:t3", "chap_user": "u",
                       "chap_secret": "s3cret-s3cret\t"}, "printable"),
    ("pair.create", {"source": "v\n", "clone": "w"}, "no volume"),
])
def test_names_with_control_characters_are_refused(live, op, args, expect) -> None:
    r = ask(live, {"op": op, "args": args})
    assert r["ok"] is False and expect in r["error"], r
    listed = json.dumps(ask(live, {"op": "status"})["result"])
    assert "\\n" not in listed and "\\r" not in listed and "\\u2028" not in listed
    _clean_log(live)
