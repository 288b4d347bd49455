"""The daemon's local control API: JSON lines over a Unix socket.

Request  {"op": "pair.restore", "args": {"pair": "db1-clone"}}
Reply    {"ok": true, "result": ...} | {"ok": false, "error": "one line"}

The socket is created with mode 0600 (0660 with a configured group) and
every connection is checked with SO_PEERCRED: root, the daemon's own user,
or a member of the configured group; anyone else is refused before a
request is read.

Every operation is audited (target.events): its caller's uid/pid, its
arguments without secrets, and its result. ``events`` is answered here,
not by the service: {"op": "events", "args": {"limit": N, "follow": true}}
replies with the recent events and then, with follow, writes one line
{"event": {...}} per new event until the client closes the connection (or
falls so far behind that it is cut off, with a last line saying so).
"""
from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
from typing import Any, Iterator

from .errors import ServiceError, clip, one_line
from .events import EventBus
from .peer import Peer

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/liverestore/control.sock"
MAX_REQUEST = 1 << 20
#: Deepest nesting a request may have; real ones nest at most 6 (restoreconfig).
MAX_DEPTH = 32


class ControlServer:
    def __init__(self, service: Any, path: str, *, group: str | None = None,
                 events: EventBus | None = None) -> None:
        self.service = service
        self.events = events or EventBus()
        self._streams: set[asyncio.StreamWriter] = set()    # open event streams
        self.path = path
        self.group = group
        self._gid: int | None = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            # A live daemon answers; a stale socket file from a crash does not.
            if await _alive(self.path):
                raise OSError(f"another liverestore daemon is listening on {self.path}")
            os.unlink(self.path)
        if self.group:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise OSError(f"no group named {self.group}") from None
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path,
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        if self._gid is not None:
            os.chown(self.path, -1, self._gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        self.events.close()             # followers' streams end, so their connections close
        for w in list(self._streams):
            w.transport.abort()         # one that stopped reading would never drain
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _allowed(self, peer: Peer) -> bool:
        if peer.uid == 0 or peer.uid == os.getuid():
            return True
        if self._gid is not None and (peer.gid == self._gid or self._gid in peer.groups):
            return True
        log.warning("control: refused pid %d uid %d", peer.pid, peer.uid)
        return False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Who asks decides which paths the daemon may open for them (target.peer).
        peer = Peer.of_socket(writer.get_extra_info("socket"))
        try:
            if not self._allowed(peer):
                writer.write(_reply(False, error="permission denied: not root, not the daemon's "
                                    "user and not in its control group"))
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_reply(False, error="request too large"))
                    await writer.drain()
                    return
                if not line:
                    return
                out = await self._handle(line, peer, reader, writer)
                if out is None:
                    return                  # an event stream ended
                writer.write(out)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _handle(self, line: bytes, peer: Peer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bytes | None:
        """The reply line; None when the request was an event stream that
        has ended (the connection is then closed)."""
        try:
            op, args = parse_request(line)
        except MalformedRequest as e:
            return _reply(False, error=str(e))
        if op == "events":
            return await self._events(args, peer, reader, writer)
        try:
            result = await self.service.call(op, args, peer=peer)
            self.events.control(op, args, peer.pid, peer.uid, None)
            return _reply(True, result=result)
        except ServiceError as e:
            error = one_line(str(e))
        except Exception as e:  # noqa: BLE001 - a bug, not bad input: keep serving, keep the trace
            log.exception("control: %s failed", op)
            error = one_line(f"internal error in {op}: {type(e).__name__}: {e}")
        self.events.control(op, args, peer.pid, peer.uid, error)
        return _reply(False, error=error)

    async def _events(self, args: dict[str, Any], peer: Peer, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bytes | None:
        follow, limit = args.get("follow", False), args.get("limit")
        unknown = set(args) - {"follow", "limit"}
        if unknown or not isinstance(follow, bool) or not (
                limit is None or (isinstance(limit, int) and not isinstance(limit, bool))):
            return _reply(False, error="events takes follow (true/false) and limit (a number)")
        self.events.control("events", args, peer.pid, peer.uid, None)
        # subscribe before the backlog is taken: nothing falls between the two
        sub = self.events.follow() if follow else None
        backlog = _reply(True, result=self.events.recent(limit))
        if sub is None:
            return backlog
        # the client sends nothing more: anything it does send, or its
        # hanging up, ends the stream at once (not at the next event)
        self._streams.add(writer)
        gone = asyncio.ensure_future(reader.read(1))
        gone.add_done_callback(lambda _: sub.end())
        try:
            writer.write(backlog)
            await writer.drain()
            while (ev := await sub.next()) is not None:
                writer.write((json.dumps({"event": ev}, default=str) + "\n").encode())
                await writer.drain()
            if sub.overflowed:
                # no drain: a client that stopped reading would hold us here
                writer.write(_reply(False, error="this client fell too far behind the events "
                                    "and was cut off; run 'liverestore events --follow' again"))
            return None
        finally:
            gone.cancel()
            self.events.unfollow(sub)
            self._streams.discard(writer)


class MalformedRequest(ValueError):
    """The line is not a request at all; the message is the whole reply."""


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's parser accepts them by default.
    raise ValueError(f"{name} is not JSON")


def _depth_ok(value: Any, limit: int) -> bool:
    """Iterative, so a hostile document cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """One request line -> (op, args), or MalformedRequest with a one-line reason."""
    want = 'want {"op": "<operation>", "args": {...}}'
    try:
        req = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedRequest(f"malformed request: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:            # includes UnicodeDecodeError (not UTF-8)
        kind = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON"
        raise MalformedRequest(f"malformed request: {kind}; {want}") from None
    if not isinstance(req, dict):
        raise MalformedRequest(f"malformed request: not a JSON object; {want}")
    if not _depth_ok(req, MAX_DEPTH):
        raise MalformedRequest(f"malformed request: nested deeper than {MAX_DEPTH} levels")
    unknown = set(req) - {"op", "args"}
    if unknown:
        raise MalformedRequest(f"malformed request: unknown key(s) {clip(sorted(unknown))}; {want}")
    op = req.get("op")
    args = req.get("args", {})
    if not isinstance(op, str):
        raise MalformedRequest(f"malformed request: op must be a string; {want}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise MalformedRequest(f"malformed request: args must be an object; {want}")
    return op, args


def _reply(ok: bool, **kw: Any) -> bytes:
    return (json.dumps({"ok": ok, **kw}, default=str) + "\n").encode()


async def _alive(path: str) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_unix_connection(path), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    return True


class ControlError(Exception):
    """The daemon refused or could not be reached; the message is for the operator."""


def _result(reply: dict[str, Any]) -> Any:
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")


class Client:
    """Blocking client of the control API (CLI, shell, Ansible)."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = 600) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except FileNotFoundError:
                s.close()
                raise ControlError(f"no liverestore daemon at {self.path} "
                                   "(start it with 'liverestore serve')") from None
            except PermissionError:
                s.close()
                raise ControlError(f"permission denied on {self.path}: run as root or as a "
                                   "member of the daemon's control group") from None
            except OSError as e:
                s.close()
                raise ControlError(f"cannot reach the daemon at {self.path}: {e.strerror or e}") from None
            self._sock = s
        return self._sock

    def call(self, op: str, **args: Any) -> Any:
        s = self._connect()
        try:
            s.sendall((json.dumps({"op": op, "args": args}) + "\n").encode())
        except OSError as e:
            self.close()
            raise ControlError(f"lost the daemon: {e.strerror or e}") from None
        return _result(self._line(op))

    def _line(self, op: str) -> dict[str, Any]:
        s = self._connect()
        try:
            while b"\n" not in self._buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ControlError("the daemon closed the connection")
                self._buf += chunk
        except socket.timeout:
            self.close()
            raise ControlError(f"the daemon did not answer {op} within {self.timeout}s") from None
        except OSError as e:
            self.close()
            raise ControlError(f"lost the daemon: {e.strerror or e}") from None
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def events(self, limit: int | None = None, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The daemon's recent events, then (``follow``) each new one as it
        happens, until the daemon stops or the caller stops iterating."""
        yield from self.call("events", limit=limit, follow=follow)
        if not follow:
            return
        self._connect().settimeout(None)        # events come when they come
        while True:
            msg = self._line("events")
            if "event" not in msg:
                _result(msg)                    # the daemon's last word: why it ended
                return
            yield msg["event"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
