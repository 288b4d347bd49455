"""`serve --metrics HOST:PORT`: Prometheus metrics over HTTP (GET /metrics).

Everything is read from the daemon's own state when a scrape comes (a
custom Collector): the per-LU counters the SCSI devices keep
(target.scsi.lustats), the pairs' progress and copy-on-demand counters,
the iSCSI target's sessions and logins, the memory budget. Nothing is
updated on the I/O path for the metrics' sake beyond those counters.

The HTTP server runs on the daemon's event loop, so a scrape reads that
state between two I/O events and never races it; a scrape costs a few
milliseconds of the loop. It answers one request per connection, at most
MAX_CLIENTS at once, each within CLIENT_TIMEOUT: a slow or hostile client
cannot hold memory or the loop.

Metric names (prefix liverestore_):
  lu_commands_total{volume,kind}            kind: read, write, other
  lu_bytes_total{volume,kind}               data moved by GOOD reads / writes
  lu_command_duration_seconds{volume,kind}  histogram
  pair_info{pair,source,clone,state}        1
  pair_job{pair,job,status}                 1 while a job exists; status:
                                            running, paused, failed, waiting
  pair_job_extents{pair} / pair_job_extents_done{pair}
  pair_job_copied_bytes{pair}, pair_job_rate_bytes_per_second{pair},
  pair_job_eta_seconds{pair} (while known), pair_delta_extents{pair}
  pair_cod_extents_total{pair}              extents copied on demand for host I/O
  pair_cod_wait_seconds_total{pair}         host I/O time spent waiting on them
  iscsi_sessions{target}, iscsi_logins_total{target,result}   result: ok, failed
  memory_limit_bytes                        serve --memory-limit
  iscsi_command_memory_bytes / iscsi_command_memory_limit_bytes
plus the library's process_* metrics (process_resident_memory_bytes: the
daemon's RSS, to compare with memory_limit_bytes).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.process_collector import ProcessCollector

from .frontends import EmbeddedFrontend
from .logsafe import RateLimitedLog
from .scsi.lustats import KINDS, LATENCY_BUCKETS, READ, WRITE

if TYPE_CHECKING:  # pragma: no cover
    from .service import Service

log = logging.getLogger(__name__)
ratelog = RateLimitedLog(log)

MAX_CLIENTS = 16
CLIENT_TIMEOUT = 10.0       # seconds to send the request head
MAX_HEAD = 8192             # bytes of request line and headers

_BOUNDS = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]


class LiverestoreCollector:
    def __init__(self, service: "Service") -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield from self._lus()
        yield from self._pairs()
        yield from self._iscsi()

    def _lus(self) -> Iterator[Metric]:
        cmds = CounterMetricFamily("liverestore_lu_commands", "SCSI commands completed, per LU",
                                   labels=["volume", "kind"])
        nbytes = CounterMetricFamily("liverestore_lu_bytes", "data moved by commands that "
                                     "completed with GOOD", labels=["volume", "kind"], unit="bytes")
        lat = HistogramMetricFamily("liverestore_lu_command_duration_seconds",
                                    "time from command arrival at the SCSI layer to its status",
                                    labels=["volume", "kind"])
        for name, dev in sorted(self.service.devices.items()):
            st = dev.stats
            for k, kind in enumerate(KINDS):
                cmds.add_metric([name, kind], st.commands[k])
                if k in (READ, WRITE):
                    nbytes.add_metric([name, kind], st.bytes[k])
                running = 0
                buckets = []
                for bound, n in zip(_BOUNDS, st.buckets[k]):
                    running += n
                    buckets.append((bound, running))
                lat.add_metric([name, kind], buckets, st.seconds[k])
        yield from (cmds, nbytes, lat)

    def _pairs(self) -> Iterator[Metric]:
        g = {n: GaugeMetricFamily(f"liverestore_{n}", h, labels=["pair"]) for n, h in (
            ("pair_job_extents", "extents the current job copies"),
            ("pair_job_extents_done", "extents the current job has copied"),
            ("pair_job_copied_bytes", "bytes the current job has copied"),
            ("pair_job_rate_bytes_per_second", "the current job's recent copy rate"),
            ("pair_job_eta_seconds", "the current job's estimated time to finish"),
            ("pair_delta_extents", "extents that differ between source and clone"))}
        info = GaugeMetricFamily("liverestore_pair_info", "a pair and its state",
                                 labels=["pair", "source", "clone", "state"])
        job = GaugeMetricFamily("liverestore_pair_job", "the pair's job (1 while it exists)",
                                labels=["pair", "job", "status"])
        cod = CounterMetricFamily("liverestore_pair_cod_extents", "extents copied on demand "
                                  "because host I/O touched them first", labels=["pair"])
        codw = CounterMetricFamily("liverestore_pair_cod_wait_seconds", "host I/O time spent "
                                   "waiting on copy-on-demand", labels=["pair"])
        eng = self.service.eng
        for pid, pair in sorted(eng.pairs.items()):
            pr = pair.progress()
            info.add_metric([pid, pair.source, pair.clone, pr.state], 1)
            cod.add_metric([pid], pair.cod_extents)
            codw.add_metric([pid], pair.cod_wait_seconds)
            g["pair_delta_extents"].add_metric([pid], pr.delta_extents)
            if pr.job is None:
                continue
            status = ("failed" if pr.error else "paused" if pr.paused
                      else "waiting" if eng.offline_reasons(pair) else "running")
            job.add_metric([pid, pr.job, status], 1)
            g["pair_job_extents"].add_metric([pid], pr.extents_total)
            g["pair_job_extents_done"].add_metric([pid], pr.extents_done)
            g["pair_job_copied_bytes"].add_metric([pid], pr.bytes_copied)
            g["pair_job_rate_bytes_per_second"].add_metric([pid], pr.rate)
            if pr.eta is not None:
                g["pair_job_eta_seconds"].add_metric([pid], pr.eta)
        yield from (info, job, cod, codw, *g.values())

    def _iscsi(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily("liverestore_memory_limit_bytes", "the RSS the daemon keeps "
                                  "under (serve --memory-limit)")
        limit.add_metric([], self.service.memory_limit)
        yield limit
        fe = self.service.frontend
        if not isinstance(fe, EmbeddedFrontend) or fe.server is None:
            return                  # LIO: the kernel has the sessions
        srv = fe.server
        sessions = GaugeMetricFamily("liverestore_iscsi_sessions", "logged-in sessions",
                                     labels=["target"])
        per: dict[str, int] = {iqn: 0 for iqn in srv.targets}
        for s in srv.sessions.values():
            if s.target is not None:
                per[s.target.iqn] = per.get(s.target.iqn, 0) + 1
        for iqn, n in sorted(per.items()):
            sessions.add_metric([iqn], n)
        logins = CounterMetricFamily("liverestore_iscsi_logins", "login attempts by result",
                                     labels=["target", "result"])
        for result, counts in (("ok", srv.logins_ok), ("failed", srv.logins_failed)):
            for key, n in sorted(counts.items()):
                logins.add_metric([key, result], n)
        mem = srv.memory.stats()
        used = GaugeMetricFamily("liverestore_iscsi_command_memory_bytes",
                                 "command data the iSCSI target holds")
        used.add_metric([], mem["used"])
        cap = GaugeMetricFamily("liverestore_iscsi_command_memory_limit_bytes",
                                "the share of the memory limit command data may use")
        cap.add_metric([], mem["budget"])
        yield from (sessions, logins, used, cap)


def registry_for(service: "Service") -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LiverestoreCollector(service))
    ProcessCollector(registry=reg)
    return reg


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self._server: asyncio.base_events.Server | None = None
        self._clients = 0
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  limit=MAX_HEAD)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self._clients += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT)
            status, ctype, body = self._answer(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status, ctype, len(body)) + body)
            await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass                # gone, slow or oversized: nothing to tell it
        finally:
            self._clients -= 1
            # one that did not take its answer is dropped, not waited for
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    def _answer(self, request_line: bytes) -> tuple[bytes, bytes, bytes]:
        parts = request_line.split()
        if len(parts) != 3 or parts[0] != b"GET":
            return b"405 Method Not Allowed", b"text/plain", b"GET /metrics\n"
        if parts[1].split(b"?", 1)[0] != b"/metrics":
            return b"404 Not Found", b"text/plain", b"liverestore: metrics are at /metrics\n"
        try:
            body = generate_latest(self.registry)
        except Exception as e:  # noqa: BLE001 - a bug in a collector: say so, keep serving
            ratelog.warning("scrape", "metrics scrape failed: %s: %s", type(e).__name__, e)
            return b"500 Internal Server Error", b"text/plain", b"scrape failed; see the log\n"
        return b"200 OK", CONTENT_TYPE_LATEST.encode(), body
