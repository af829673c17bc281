"""Prometheus metrics of a daemon, served over HTTP by the standard client library.

Each daemon has its own registry (not the library's global one), so two daemons in one
process, as in tests, never share counters.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import prometheus_client
import structlog

from orchestrator.engine.stats import MigrationStats, Status

log = structlog.get_logger(__name__)


class Metrics:
    """The counters and gauges of one daemon; the service feeds them."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.started = prometheus_client.Counter(
            "livemig_migrations_started", "Outgoing migrations started", registry=r
        )
        self.finished = prometheus_client.Counter(
            "livemig_migrations_finished",
            "Outgoing migrations ended, by outcome",
            ["status"],
            registry=r,
        )
        self.incoming = prometheus_client.Counter(
            "livemig_incoming_migrations", "Incoming migrations, by outcome", ["status"], registry=r
        )
        self.last_downtime = prometheus_client.Gauge(
            "livemig_last_downtime_seconds",
            "Downtime of the last completed outgoing migration",
            registry=r,
        )
        self.bytes_sent = prometheus_client.Counter(
            "livemig_sent_bytes", "Device state bytes sent by outgoing migrations", registry=r
        )
        self.bandwidth = prometheus_client.Gauge(
            "livemig_bandwidth_bytes_per_second",
            "Measured bandwidth of the outgoing migrations in flight",
            registry=r,
        )
        self.in_flight = prometheus_client.Gauge(
            "livemig_migrations_in_flight", "Outgoing migrations running now", registry=r
        )
        self._sent: dict[str, int] = {}
        self._bandwidth: dict[str, float] = {}

    def migration_started(self, migration_id: str) -> None:
        """Count a new outgoing migration."""
        self.started.inc()
        self.in_flight.inc()
        self._sent[migration_id] = 0

    def observe(self, stats: MigrationStats) -> None:
        """Account the bytes sent since the last look, and the bandwidth now."""
        sent = stats.transferred_bytes
        previous = self._sent.get(stats.migration_id, 0)
        if sent > previous:
            self.bytes_sent.inc(sent - previous)
            self._sent[stats.migration_id] = sent
        self._bandwidth[stats.migration_id] = stats.bandwidth
        self.bandwidth.set(sum(self._bandwidth.values()))

    def migration_finished(self, stats: MigrationStats) -> None:
        """Count the outcome; remember the downtime of a completed migration."""
        self.observe(stats)
        self.finished.labels(status=stats.status.value).inc()
        if stats.status is Status.COMPLETED and stats.downtime_ms is not None:
            self.last_downtime.set(stats.downtime_ms / 1e3)
        self.in_flight.dec()
        self._sent.pop(stats.migration_id, None)
        self._bandwidth.pop(stats.migration_id, None)
        self.bandwidth.set(sum(self._bandwidth.values()))


class MetricsListener:
    """The HTTP endpoint (``/metrics``), served by the client library in its own thread."""

    name = "metrics"

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """Where the endpoint listens (the real port when 0 was asked for)."""
        port = self._server.server_port if self._server is not None else self.port
        return f"http://{self.host}:{port}/metrics"

    async def start(self) -> None:
        """Bind and serve; OSError (say, the port is in use) when it cannot."""
        self._server, self._thread = prometheus_client.start_http_server(
            self.port, addr=self.host, registry=self.metrics.registry
        )
        log.info("metrics_listening", address=self.address)

    async def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
