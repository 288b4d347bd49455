"""`liverestore serve`: one process serving iSCSI, resuming restores and
answering the control socket, until SIGTERM/SIGINT (graceful: drain, flush,
persist). SIGHUP reloads (Service.reload says what it re-reads); under
systemd (Type=notify) it reports READY/RELOADING/STOPPING and a STATUS=
line with the running jobs."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Callable

from .control import ControlServer
from .errors import ServiceError, one_line
from .eventhook import EventHook
from .events import EventBus, pair_event
from .frontends import EmbeddedFrontend
from .heap import give_back_every, keep_warm_heap
from .metrics import MetricsServer, registry_for
from .portals import format_portal
from .sdnotify import Notifier
from .service import Service

log = logging.getLogger("liverestore")

STATUS_EVERY = 2.0      # seconds between looks at the jobs for systemd's STATUS= line


async def serve(state_dir: str, socket_path: str, *, init: bool = False,
                portals: list[tuple[str, int]] | None = None, group: str | None = None,
                backend: str = "auto", volume_dirs: list[str] | None = None,
                memory_limit: str | None = None, on_event: str | None = None,
                metrics: tuple[str, int] | None = None,
                ready: Callable[[Service], None] | None = None) -> None:
    warm_heap = keep_warm_heap()
    # start() locks the state directory before anything else it does
    service = Service(state_dir, init=init, portals=portals, backend=backend,
                      volume_dirs=volume_dirs, memory_limit=memory_limit)
    await service.start()
    events = EventBus()
    hook = EventHook(on_event) if on_event else None
    if hook is not None:
        hook.start()
        events.sinks.append(hook)
    _connect_events(service, events)
    control = ControlServer(service, socket_path, group=group, events=events)
    try:
        await control.start()
    except OSError as e:
        await service.stop()
        raise ServiceError(str(e)) from e
    exporter = MetricsServer(registry_for(service), *metrics) if metrics else None
    if exporter is not None:
        try:
            await exporter.start()
        except OSError as e:
            await control.stop()
            await service.stop()
            raise ServiceError(f"cannot serve metrics on {format_portal(metrics)}: "
                               f"{e.strerror or e}") from e
        log.info("metrics at http://%s/metrics", format_portal(exporter.address))
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, _start_reload, service, events, notifier, reloads)
    log.info("serving: portals %s, control socket %s",
             ", ".join(f"{h}:{p}" for h, p in service.portals()), socket_path)
    events.publish("daemon.started", portals=[format_portal(p) for p in service.portals()])
    # What start-up built (modules, maps, config) lives as long as the
    # daemon: out of the collector's sight, the full collections that the
    # per-command objects of busy LUs trigger stay short (measured: 14% of
    # the loop's time at 4 KiB reads from an RBD LU before).
    gc.freeze()
    notifier.ready(status_text(service))
    status = loop.create_task(_report_status(service, notifier), name="sd-status")
    # the warm heap's bound: what it keeps free goes back every TRIM_EVERY s
    trims = [loop.create_task(give_back_every(), name="heap-trim")] if warm_heap else []
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        events.publish("daemon.stopping")
        log.info("stopping: draining I/O, flushing, persisting")
        loop.remove_signal_handler(signal.SIGHUP)
        for t in (status, *trims, *reloads):
            t.cancel()
        await asyncio.gather(status, *trims, *reloads, return_exceptions=True)
        if exporter is not None:
            await exporter.stop()
        await control.stop()
        await service.stop()
        if hook is not None:
            await hook.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        notifier.close()
        log.info("stopped")


def _connect_events(service: Service, events: EventBus) -> None:
    """The engine's pair and job events and the iSCSI target's rejected
    logins go to the event bus."""
    service.eng.listeners.append(pair_event(events, service.eng))
    if isinstance(service.frontend, EmbeddedFrontend) and service.frontend.server is not None:
        service.frontend.server.on_login_rejected = events.login_failed


def _start_reload(service: Service, events: EventBus, notifier: Notifier,
                  reloads: set[asyncio.Task[None]]) -> None:
    """SIGHUP: reload in a task (a signal handler must not wait); a second
    SIGHUP while one runs is folded into it."""
    if reloads:
        return
    t = asyncio.get_running_loop().create_task(_reload(service, events, notifier), name="reload")
    reloads.add(t)
    t.add_done_callback(reloads.discard)


async def _reload(service: Service, events: EventBus, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        changes = await service.reload()
    except Exception as e:  # noqa: BLE001 - a failed reload leaves the daemon serving as it was
        log.error("reload failed: %s", one_line(str(e)))
        events.publish("daemon.reload-failed", error=one_line(str(e)))
    else:
        log.info("reloaded: %s", "; ".join(changes) or "nothing changed")
        events.publish("daemon.reloaded", changes=changes)
    notifier.ready(status_text(service))


async def _report_status(service: Service, notifier: Notifier) -> None:
    """Keep systemd's STATUS= line current (sent only when it changes)."""
    if not notifier.enabled:
        return
    while True:
        await asyncio.sleep(STATUS_EVERY)
        notifier.status(status_text(service))


def status_text(service: Service) -> str:
    """One line for `systemctl status`: the jobs and how far they are, or
    what is served when no job runs."""
    jobs = []
    for pid, pair in sorted(service.eng.pairs.items()):
        pr = pair.progress()
        if pr.job is None:
            continue
        pct = 100 * pr.extents_done // pr.extents_total if pr.extents_total else 100
        verb = {"restore": "restoring", "sync": "syncing"}.get(pr.job, pr.job)
        how = " FAILED" if pr.error else " paused" if pr.paused else ""
        jobs.append(f"{verb} {pid} {pct}%{how}")
    if jobs:
        return "; ".join(jobs)
    sessions = service.frontend.stats().get("sessions") if service.frontend else None
    served = f"{len(service.cfg.targets())} exports"
    if sessions is not None:
        served += f", {sessions} iSCSI sessions"
    return f"serving {served}; no restore or sync running"
