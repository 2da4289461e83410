"""Prometheus metrics: what the API serves and how the process fares, at `GET /metrics`.

`MetricsMiddleware` counts and times requests and counts body bytes both ways while they
flow, so a long stream's throughput shows as it runs, not only once it ends. Labels are
the method, the route's template and the status: never a raw path, tenant, kid or token,
so their values stay few and say nothing confidential. A response that never reached
its end (a stream aborted part-way, see `api.duplex`, or one that never started) counts
with status "aborted". It is a plain ASGI middleware that only passes messages through:
Starlette's `BaseHTTPMiddleware` would buffer and reorder the duplex streams.

When several processes serve (`sealstream serve --workers N`), each writes its counts to
files in a directory they share (prometheus_client's multiprocess mode) and a scrape of
any of them answers for the whole server: counters and histograms summed over every
process that has served since the start, the requests in progress over the live ones.
`process_resident_memory_bytes` and `process_cpu_seconds_total` then come with a `pid`
label, one series for each live server process, read from /proc at the scrape; the
other `process_*` metrics (open files, virtual memory) are left out.

At each scrape the job store is asked how many jobs are running (a count over all
tenants); the jobs' own work happens in worker processes, which Celery's monitoring
covers.
"""

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audit.alarms import AUDIT_ALARMS
from keystore.usage_redis import IMPLAUSIBLE_COUNTS
from services.jobs import JobStore
from storage.integrity import REFUSED_RECORDS

UNMATCHED = "unmatched"  # the route label of a request no route took (a 404)
ABORTED = "aborted"  # the status label of a response that started and was cut off
# Request durations run from milliseconds (key routes) to hours (streams of many GiB).
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600, 3600, float("inf"))


@dataclass
class Metrics:
    """The API's metrics, in a registry of the app's own (several apps may share a process).

    With `shared_dir`, the directory prometheus_client's multiprocess mode writes to (its
    `PROMETHEUS_MULTIPROC_DIR`, set before this process imported it), a scrape reads every
    process's files there instead of this process's registry.
    """

    shared_dir: Path | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        if self.shared_dir is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            self.registry.register(REFUSED_RECORDS)
            self.registry.register(IMPLAUSIBLE_COUNTS)
            self.registry.register(AUDIT_ALARMS)
            self._scraped = self.registry
        else:
            self._scraped = CollectorRegistry()
            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                self._scraped, path=str(self.shared_dir)
            )
            self._scraped.register(_ServerProcessesCollector(self.shared_dir))
            # Its file in the shared directory is how a scrape finds this process.
            Gauge(
                "sealstream_process_start_time_seconds",
                "When each live server process started (Unix time)",
                registry=self.registry,
                multiprocess_mode="liveall",
            ).set_to_current_time()
        self.requests = Counter(
            "sealstream_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sealstream_http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte",
            ["method", "route"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "sealstream_http_requests_in_progress",
            "Requests being served now (streams included)",
            ["method"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.received = Counter(
            "sealstream_http_request_body_bytes",
            "Request body bytes received, counted as they arrive",
            ["route"],
            registry=self.registry,
        )
        self.sent = Counter(
            "sealstream_http_response_body_bytes",
            "Response body bytes sent, counted as they leave",
            ["route"],
            registry=self.registry,
        )

    def watch_jobs(self, jobs: JobStore) -> None:
        """Report the jobs running now (all tenants: a count, no ids) at each scrape."""
        self._scraped.register(_JobsCollector(jobs))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper's `Accept` header asks for (Prometheus
        or OpenMetrics text, the older text format without one), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self._scraped), content_type


class _JobsCollector(Collector):
    """Asks the job store at scrape time; a store that cannot answer shows as down."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[Metric]:
        try:
            running = len(self._jobs.running_ids())
            finished = self._jobs.finished_counts()
        except RedisError:
            yield _job_store_up(False)
            return
        yield _job_store_up(True)
        yield GaugeMetricFamily(
            "sealstream_jobs_running", "Jobs running now, in all tenants", value=running
        )
        counts = CounterMetricFamily(
            "sealstream_jobs_finished",
            "Jobs finished, in all tenants, by kind and outcome (counted in the job store, "
            "so every API process shows the same totals)",
            labels=["kind", "status"],
        )
        for (kind, status), count in sorted(finished.items()):
            counts.add_metric([kind, status], count)
        yield counts


class _ServerProcessesCollector(Collector):
    """The memory and CPU time of each live server process, found by the file its start
    time gauge keeps in the shared directory (prometheus_client names those of a
    "liveall" gauge `gauge_liveall_<pid>.db`, and removes them when the process dies)."""

    def __init__(self, shared_dir: Path) -> None:
        self._shared_dir = shared_dir

    def collect(self) -> Iterator[Metric]:
        memory = GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory of each server process, in bytes",
            labels=["pid"],
        )
        cpu = CounterMetricFamily(
            "process_cpu_seconds",
            "User and system CPU time of each server process, in seconds",
            labels=["pid"],
        )
        for file in sorted(self._shared_dir.glob("gauge_liveall_*.db")):
            pid = file.stem.rsplit("_", 1)[1]
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone since: the supervisor removes its file shortly
            cpu.add_metric([pid], (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS)
            memory.add_metric([pid], int(stat[21]) * _PAGE_BYTES)
        yield memory
        yield cpu


def _job_store_up(up: bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "sealstream_job_store_up",
        "Whether the job store (Redis, or memory) answered this scrape",
        value=int(up),
    )


def route_of(scope: Scope) -> str:
    """The template of the route that took the request (known once routing has run)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics, method = self.metrics, scope["method"]
        status: str | None = None
        ended = False
        # The route's byte counters, looked up once: a stream calls these per chunk.
        received: Counter | None = None
        sent: Counter | None = None

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                if received is None:
                    received = metrics.received.labels(route_of(scope))
                received.inc(len(message["body"]))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, ended, sent
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    if sent is None:
                        sent = metrics.sent.labels(route_of(scope))
                    sent.inc(len(message["body"]))
                ended = not message.get("more_body", False)
            await send(message)

        start = time.perf_counter()
        metrics.in_progress.labels(method).inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            metrics.in_progress.labels(method).dec()
            route = route_of(scope)
            outcome = status if status is not None and ended else ABORTED
            metrics.requests.labels(method, route, outcome).inc()
            metrics.duration.labels(method, route).observe(time.perf_counter() - start)
