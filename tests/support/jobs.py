"""Helpers for the job tests: a whole job stack (a redis-server, an API server and Celery
worker processes on one moto bucket and KEK), an S3 proxy that slows and holds what a
worker reads, polling of job records, and data and archives made in memory.

The proxy is what makes the fault tests deterministic without huge objects: it paces the
worker's S3 downloads so that a verify job reports progress for a few seconds, and it can
hold them, so that a worker is killed, a Redis restarted or a job cancelled at a point the
test has seen (a running job with some bytes done), never at a point it hopes for.
"""

import io
import json
import random
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from api import create_app
from api.services import Services
from keystore import LocalKek
from sealstream.settings import Settings
from storage import MIN_PART_SIZE
from tests.conftest import ADMIN_TOKEN, Api
from tests.support.http import ENCRYPT, FORM_TYPE, form
from tests.support.services import LOCALHOST, CeleryWorker, RedisServer, api_server, celery_worker
from tests.support.services import redis_server as start_redis

KiB = 1024
MiB = 1024 * KiB

JOBS = "/api/jobs"
FINAL = frozenset({"succeeded", "failed", "cancelled"})

# Short, so that a killed worker's job is handed out again within seconds and its lease
# lapses as quickly; the stale limit is longer than both together, so that a redelivered
# job is not failed as stale while it waits for the lease.
VISIBILITY_TIMEOUT = 4
LEASE_TTL = 3.0
STALE_AFTER = 20


# A job stack


@dataclass
class JobStack:
    """A redis-server, an API server (jobs go to Celery) and Celery worker processes,
    all on the same bucket, KEK and Redis."""

    redis: RedisServer
    api: Api
    services: Services  # the API's
    worker_env: dict[str, str]
    directory: Path
    proxy: "SlowS3Proxy | None"
    exits: ExitStack
    workers: list[CeleryWorker] = field(default_factory=list)

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        return self.api.client(token)

    def start_worker(self, loglevel: str = "INFO") -> CeleryWorker:
        """One more worker process, killed with the stack (its Redis and bucket go too)."""
        log = self.directory / f"worker-{len(self.workers) + 1}.log"
        worker = self.exits.enter_context(
            celery_worker(self.worker_env, log, loglevel=loglevel, stop_grace=0)
        )
        self.workers.append(worker)
        return worker


def worker_environment(settings: Settings, s3_endpoint: str) -> dict[str, str]:
    """The `SEALSTREAM_*` variables of a worker serving the same stack as `settings`."""
    assert settings.redis_url is not None and settings.kek_file is not None
    return {
        "SEALSTREAM_STORAGE_URL": settings.storage_url,
        "SEALSTREAM_S3_ENDPOINT_URL": s3_endpoint,
        "SEALSTREAM_KEK_FILE": str(settings.kek_file),
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_JOB_VISIBILITY_TIMEOUT": str(settings.job_visibility_timeout),
        "SEALSTREAM_JOB_STALE_AFTER": str(settings.job_stale_after),
        "SEALSTREAM_JOB_LEASE_TTL": str(settings.job_lease_ttl),
        "SEALSTREAM_S3_PART_SIZE": str(settings.s3_part_size),
        "SEALSTREAM_KEY_CACHE_TTL": str(settings.key_cache_ttl),
    }


@contextmanager
def job_stack(
    directory: Path,
    moto_endpoint: str,
    bucket: str,
    *,
    proxied: bool = False,
    stale_after: int = STALE_AFTER,
    workers: int = 1,
    worker_loglevel: str = "INFO",
) -> Iterator[JobStack]:
    """A job stack with `workers` workers started; with `proxied`, the workers reach S3
    through a `SlowS3Proxy`, unpaced to begin with (the API does not)."""
    with ExitStack() as exits:
        redis = exits.enter_context(start_redis(directory / "redis"))
        kek_file = directory / "kek"
        LocalKek.load_or_create(kek_file)  # mode 0600
        settings = Settings(
            storage_url=f"s3://{bucket}",
            s3_endpoint_url=moto_endpoint,
            kek_file=kek_file,
            s3_part_size=MIN_PART_SIZE,
            admin_token=ADMIN_TOKEN,
            key_cache_ttl=0.5,
            redis_url=redis.url,
            job_visibility_timeout=VISIBILITY_TIMEOUT,
            job_lease_ttl=LEASE_TTL,
            job_stale_after=stale_after,
        )
        app = create_app(settings)
        url = exits.enter_context(api_server(app))
        proxy = exits.enter_context(slow_s3_proxy(moto_endpoint, None)) if proxied else None
        stack = JobStack(
            redis=redis,
            api=Api.of(url, settings, app),
            services=app.state.services,
            worker_env=worker_environment(settings, proxy.url if proxy else moto_endpoint),
            directory=directory,
            proxy=proxy,
            exits=exits,
        )
        for _ in range(workers):
            stack.start_worker(loglevel=worker_loglevel)
        yield stack


# Job records


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"{JOBS}/{job_id}")
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    condition: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 30,
) -> dict[str, Any]:
    """Poll the job until `condition` holds for its record; fail, showing the last record,
    if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        record = get_job(client, job_id)
        if condition(record):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last record:\n{show(record)}")
        time.sleep(0.05)


def finished_job(client: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for_job(client, job_id, lambda r: r["status"] in FINAL, "a final status", timeout)


def running_with_progress(record: dict[str, Any]) -> bool:
    """Running, with some bytes reported done and some still to do."""
    progress = record["progress"]
    total = progress["bytesTotal"]
    return record["status"] == "running" and total is not None and 0 < progress["bytesDone"] < total


def timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def seconds_since(value: str) -> float:
    return (datetime.now(UTC) - timestamp(value)).total_seconds()


def show(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1, sort_keys=True)


def start_verify(client: httpx.Client, key: str) -> dict[str, Any]:
    response = client.post(f"{JOBS}/verify", json={"key": key})
    assert response.status_code == 202, response.text
    record: dict[str, Any] = response.json()
    return record


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# Data


def random_chunks(size: int, seed: int = 0, chunk_size: int = MiB) -> Iterator[bytes]:
    """`size` reproducible pseudo-random bytes, generated a chunk at a time."""
    rng = random.Random(seed)
    left = size
    while left:
        chunk = rng.randbytes(min(chunk_size, left))
        left -= len(chunk)
        yield chunk


def store_object(
    client: httpx.Client, key: str, data: Iterable[bytes] | bytes, **metadata: Any
) -> dict[str, Any]:
    """Encrypt `data` under `mySymKey` into the object `key` (destination mode); the 201
    body (object info and the verify job's id)."""
    meta = {"kid": "mySymKey", "destination": {"key": key}, **metadata}
    response = client.post(
        ENCRYPT, content=form(meta, data), headers={"Content-Type": FORM_TYPE}, timeout=120
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def tar_archive(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar archive of `members`, made in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# An S3 proxy that paces and holds downloads

SLICE = 16 * KiB


class SlowS3Proxy:
    """A TCP proxy in front of an S3 server. Requests pass untouched; response bytes are
    paced at `rate` bytes a second (None: as fast as they come) and stop altogether while
    the proxy is held. `held_streams` counts responses waiting at the hold."""

    def __init__(self, upstream: str, rate: float | None = 8 * MiB) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self._upstream = (parts.hostname, parts.port)
        self.rate = rate
        self._gate = threading.Condition()
        self._held = False
        self._closed = False
        self._next_slot = 0.0
        self.held_streams = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((LOCALHOST, 0))
        self.url = f"http://{LOCALHOST}:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name="s3-proxy", daemon=True)
        self._acceptor.start()

    def pace(self, rate: float | None) -> None:
        with self._gate:
            self.rate = rate

    def hold(self) -> None:
        with self._gate:
            self._held = True

    def release(self, rate: float | None = None) -> None:
        """Let responses flow again, at `rate` (None: unpaced)."""
        with self._gate:
            self._held = False
            self.rate = rate
            self._gate.notify_all()

    def holding(self) -> bool:
        """Held, with a response waiting at the hold."""
        with self._gate:
            return self._held and self.held_streams > 0

    def close(self) -> None:
        with self._gate:
            self._closed = True
            self._gate.notify_all()
            sockets, self._sockets = self._sockets, []
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for sock in sockets:
            with suppress(OSError):
                sock.close()
        self._acceptor.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=30)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._gate:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for source, sink, paced in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, paced), name="s3-proxy-pump", daemon=True
                ).start()

    def _admit(self, size: int) -> bool:
        """Wait while held, then for a slot at the pace; False once the proxy is closed."""
        with self._gate:
            while self._held and not self._closed:
                self.held_streams += 1
                self._gate.wait()
                self.held_streams -= 1
            if self._closed:
                return False
            if self.rate is None:
                return True
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + size / self.rate
        time.sleep(max(0.0, start - now))  # pacing a simulated slow link, not timing a test
        return True

    def _pump(self, source: socket.socket, sink: socket.socket, paced: bool) -> None:
        try:
            while data := source.recv(64 * KiB):
                for offset in range(0, len(data), SLICE):
                    piece = data[offset : offset + SLICE]
                    if paced and not self._admit(len(piece)):
                        return
                    sink.sendall(piece)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def slow_s3_proxy(upstream: str, rate: float | None = 8 * MiB) -> Iterator[SlowS3Proxy]:
    proxy = SlowS3Proxy(upstream, rate)
    try:
        yield proxy
    finally:
        proxy.close()
