"""Events and audit: what happened in the daemon, for logs, `liverestore
events` and the `serve --on-event` hook.

An event is a flat JSON object: ``seq`` (1, 2, ... per daemon run), ``time``
(Unix seconds), ``kind`` and the fields of that kind:

  control            a control operation that changes something: op, its
                     arguments (secrets and whole documents left out), the
                     caller's uid/pid (SO_PEERCRED) and ok / error
  pair.<event>       the engine's pair and job events (pair.restore-started,
                     pair.restore-finished, pair.paused, pair.job-failed,
                     ...): pair, source, clone, job, progress, error
  iscsi.login-failed a rejected iSCSI login: target, initiator, peer, reason
                     (rate-limited: a flood becomes one event per interval
                     with a count)
  daemon.started, daemon.stopping, daemon.reloaded (changes),
  daemon.reload-failed (error)

Every event is also one INFO line on the ``liverestore.events`` logger
("event {json}"), so the journal carries the audit trail without a client.

Memory is bounded whatever the clients do: the daemon keeps the last
RING_SIZE events; each follower has a queue of at most QUEUE_SIZE events,
and one that falls that far behind (it stopped reading) is cut off with a
note rather than buffered for.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any, Callable

from .logsafe import MESSAGE_CLIP, NAME_CLIP, RateLimitedLog, clip

log = logging.getLogger("liverestore.events")

RING_SIZE = 1000            # recent events kept for `events` (no --follow) and new followers
QUEUE_SIZE = 256            # events a follower may be behind before it is cut off
LOGIN_FAILURE_INTERVAL = 10.0   # seconds one burst of login-failure events is summed over
#: Argument names whose values never reach an event or a log line.
SECRET_ARGS = ("secret", "password", "config")
#: Control operations that only read: logged at DEBUG, not events.
READ_ONLY_OPS = frozenset({"volume.list", "volume.show", "pair.list", "pair.show", "pair.wait",
                           "export.list", "export.show", "status", "saveconfig", "events",
                           "group.list", "group.show", "group.wait"})

Event = dict[str, Any]


def audit_args(args: dict[str, Any]) -> dict[str, Any]:
    """A control request's arguments as an event may show them: secrets
    and whole documents (restoreconfig) replaced, every value clipped."""
    out: dict[str, Any] = {}
    for k, v in list(args.items())[:16]:
        key = clip(k, 40, quote=False)
        if any(s in key for s in SECRET_ARGS):
            out[key] = None if v is None else "(not shown)"
        elif v is None or isinstance(v, (bool, int, float)):
            out[key] = v
        elif isinstance(v, str):
            out[key] = clip(v, NAME_CLIP, quote=False)
        else:
            out[key] = clip(json.dumps(v, default=str), MESSAGE_CLIP, quote=False)
    return out


class Follower:
    """One `events --follow` client: a bounded queue the bus fills."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self.overflowed = False
        self.ended = False
        self._wake = asyncio.Event()

    def offer(self, ev: Event) -> bool:
        """Queue ``ev``; False (and cut off) when the client is too far behind."""
        try:
            self.queue.put_nowait(ev)
            return True
        except asyncio.QueueFull:
            self.overflowed = True
            self.end()
            return False

    def end(self) -> None:
        """No more events for this follower (it left, or the daemon stops)."""
        self.ended = True
        self._wake.set()

    async def next(self) -> Event | None:
        """The next event, or None once ended."""
        if self.ended:
            return None
        get = asyncio.ensure_future(self.queue.get())
        cut = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait((get, cut), return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()
            cut.cancel()
        if get in done and not get.cancelled():
            return get.result()
        return None


class EventBus:
    def __init__(self, ring_size: int = RING_SIZE, clock: Callable[[], float] = time.time) -> None:
        self.ring: collections.deque[Event] = collections.deque(maxlen=ring_size)
        self.followers: set[Follower] = set()
        self.sinks: list[Callable[[Event], None]] = []     # e.g. the --on-event hook
        self.clock = clock
        self.seq = 0
        self._ratelog = RateLimitedLog(log)
        self._login_burst_until = 0.0
        self._login_suppressed = 0

    def publish(self, kind: str, **fields: Any) -> Event:
        self.seq += 1
        ev: Event = {"seq": self.seq, "time": round(self.clock(), 3), "kind": kind, **fields}
        self.ring.append(ev)
        log.info("event %s", json.dumps(ev, sort_keys=True, default=str))
        for f in list(self.followers):
            if not f.offer(ev):
                self.followers.discard(f)
                self._ratelog.warning("follower-behind", "events: a follower fell %d events "
                                      "behind and was cut off", QUEUE_SIZE)
        for sink in self.sinks:
            try:
                sink(ev)
            except Exception:  # noqa: BLE001 - a sink must not stop the others or the caller
                log.exception("event sink failed on %s", kind)
        return ev

    def recent(self, limit: int | None = None) -> list[Event]:
        evs = list(self.ring)
        return evs if limit is None else evs[-limit:] if limit > 0 else []

    def follow(self) -> Follower:
        f = Follower()
        self.followers.add(f)
        return f

    def unfollow(self, f: Follower) -> None:
        self.followers.discard(f)

    def close(self) -> None:
        """End every follow (the daemon stops)."""
        for f in list(self.followers):
            f.end()
        self.followers.clear()

    # -- sources -----------------------------------------------------------------------
    def control(self, op: str, args: dict[str, Any], pid: int, uid: int,
                error: str | None) -> None:
        """One control operation and its result (the audit trail): changes
        are events, reads are DEBUG lines only."""
        if op in READ_ONLY_OPS:
            log.debug("control %s by uid %d pid %d: %s", clip(op, 40), uid, pid,
                      "ok" if error is None else clip(error, MESSAGE_CLIP, quote=False))
            return
        self.publish("control", op=clip(op, 40, quote=False), args=audit_args(args),
                     uid=uid, pid=pid, ok=error is None,
                     **({"error": clip(error, MESSAGE_CLIP, quote=False)} if error else {}))

    def login_failed(self, target: str | None, initiator: str | None, peer: str,
                     reason: str) -> None:
        """A rejected login: an event at the first of a burst, then one per
        interval that says how many more there were (a guessing client
        must not flood the ring, the followers or the hook)."""
        now = time.monotonic()
        if now < self._login_burst_until:
            self._login_suppressed += 1
            return
        more, self._login_suppressed = self._login_suppressed, 0
        self._login_burst_until = now + LOGIN_FAILURE_INTERVAL
        self.publish("iscsi.login-failed", target=clip(target, NAME_CLIP, quote=False)
                     if target else None,
                     initiator=clip(initiator, NAME_CLIP, quote=False) if initiator else None,
                     peer=clip(peer, NAME_CLIP, quote=False),
                     reason=clip(reason, MESSAGE_CLIP, quote=False),
                     **({"more_since_last": more} if more else {}))


def pair_event(bus: EventBus, engine: Any) -> Callable[[str, str], None]:
    """An engine listener that publishes its (event, pair id) calls with
    what a reader needs to act on them: the pair, its job and progress."""
    def on_event(event: str, pair_id: str) -> None:
        fields: dict[str, Any] = {"pair": pair_id}
        pair = engine.pairs.get(pair_id)
        if pair is not None:
            pr = pair.progress()
            fields.update(source=pair.source, clone=pair.clone, state=pr.state, job=pr.job,
                          extents_done=pr.extents_done, extents_total=pr.extents_total,
                          bytes_copied=pr.bytes_copied)
            if pr.error:
                fields["error"] = clip(pr.error, MESSAGE_CLIP, quote=False)
        bus.publish(f"pair.{event}", **fields)
    return on_event


def format_event(ev: Event) -> str:
    """One human line: time, kind, then key=value for the rest."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.get("time", 0)))
    rest = " ".join(f"{k}={_fmt(v)}" for k, v in ev.items() if k not in ("seq", "time", "kind"))
    return f"{when} {ev.get('kind')} {rest}".rstrip()


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
    return json.dumps(v) if isinstance(v, str) and (" " in v or not v) else str(v)
