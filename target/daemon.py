"""`liverestore serve`: one process serving iSCSI, resuming restores and
answering the control socket, until SIGTERM/SIGINT (graceful: drain, flush,
persist)."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

from .control import ControlServer
from .errors import ServiceError
from .eventhook import EventHook
from .events import EventBus, pair_event
from .frontends import EmbeddedFrontend
from .metrics import MetricsServer, registry_for
from .portals import format_portal
from .service import Service

log = logging.getLogger("liverestore")


async def serve(state_dir: str, socket_path: str, *, init: bool = False,
                portals: list[tuple[str, int]] | None = None, group: str | None = None,
                backend: str = "auto", volume_dirs: list[str] | None = None,
                memory_limit: str | None = None, on_event: str | None = None,
                metrics: tuple[str, int] | None = None,
                ready: Callable[[Service], None] | None = None) -> None:
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
    exporter = MetricsServer(registry_for(service), *metrics) if metrics else None
    try:
        await control.start()
        if exporter is not None:
            await exporter.start()
            log.info("metrics at http://%s/metrics", format_portal(exporter.address))
    except OSError as e:
        await control.stop()
        await service.stop()
        raise ServiceError(f"cannot serve: {e.strerror or e}") from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving: portals %s, control socket %s",
             ", ".join(f"{h}:{p}" for h, p in service.portals()), socket_path)
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining I/O, flushing, persisting")
        if exporter is not None:
            await exporter.stop()
        await control.stop()
        await service.stop()
        if hook is not None:
            await hook.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def _connect_events(service: Service, events: EventBus) -> None:
    """The engine's pair and job events and the iSCSI target's rejected
    logins go to the event bus."""
    service.eng.listeners.append(pair_event(events, service.eng))
    if isinstance(service.frontend, EmbeddedFrontend) and service.frontend.server is not None:
        service.frontend.server.on_login_rejected = events.login_failed
