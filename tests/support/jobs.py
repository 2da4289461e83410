"""Helpers for the job tests: a whole job stack (a redis-server, an API server and Celery
worker processes on one moto bucket and KEK, the workers reaching S3 through a proxy that
can pace and hold what they read), polling of job records, and objects stored through
the API."""

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from api.services import Services
from keystore import LocalKek
from sealstream.server import create_app
from sealstream.settings import Settings
from services.jobs import (
    AnyParams,
    BatchEncryptParams,
    JobKind,
    JobRecord,
    ReencryptParams,
    VerifyParams,
)
from storage import MIN_PART_SIZE
from tests.conftest import ADMIN_TOKEN, Api
from tests.support.http import ENCRYPT, FORM_TYPE, form
from tests.support.s3_proxy import Rule, S3FaultProxy, no_request
from tests.support.services import CeleryWorker, RedisServer, api_server, celery_worker
from tests.support.services import redis_server as start_redis

JOBS = "/api/jobs"
FINAL = frozenset({"succeeded", "failed", "cancelled"})

# Short, so that a killed worker's job is handed out again within seconds and its lease
# lapses as quickly; the stale limit is longer than both together, so that a redelivered
# job is not failed as stale while it waits for the lease.
VISIBILITY_TIMEOUT = 4
LEASE_TTL = 3.0
STALE_AFTER = 20
# The longest the settings allow, so that a replica a test holds back for a moment and
# then lets go confirms in time.
REPLICA_TIMEOUT = 4.0


# A job stack


@dataclass
class JobStack:
    """A redis-server, an API server (jobs go to Celery) and Celery worker processes,
    all on the same bucket, KEK and Redis."""

    redis_server: RedisServer | None  # None on a Redis Sentinel group of the test's
    api: Api
    services: Services  # the API's
    worker_env: dict[str, str]
    directory: Path
    proxy: S3FaultProxy | None
    exits: ExitStack
    workers: list[CeleryWorker] = field(default_factory=list)

    @property
    def redis(self) -> RedisServer:
        assert self.redis_server is not None, "this stack runs on a Redis Sentinel group"
        return self.redis_server

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
        "SEALSTREAM_REDIS_SENTINEL_MASTER": settings.redis_sentinel_master,
        "SEALSTREAM_REDIS_MIN_REPLICAS": str(settings.redis_min_replicas),
        "SEALSTREAM_REDIS_REPLICA_TIMEOUT": str(settings.redis_replica_timeout),
        "SEALSTREAM_JOB_VISIBILITY_TIMEOUT": str(settings.job_visibility_timeout),
        "SEALSTREAM_JOB_STALE_AFTER": str(settings.job_stale_after),
        "SEALSTREAM_JOB_LEASE_TTL": str(settings.job_lease_ttl),
        "SEALSTREAM_JOB_REQUEUE_AFTER": str(settings.job_requeue_after),
        "SEALSTREAM_JOB_TASK_COPY_TTL": str(settings.job_task_copy_ttl),
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
    rule: Rule = no_request,
    stale_after: int = STALE_AFTER,
    workers: int = 1,
    worker_loglevel: str = "INFO",
    requeue_after: int = 300,
    task_copy_ttl: int = 3600,
    sentinel: tuple[str, str] | None = None,
    min_replicas: int = 0,
) -> Iterator[JobStack]:
    """A job stack with `workers` workers started; with `proxied`, the workers reach S3
    through an `S3FaultProxy`, unpaced to begin with, failing or holding what `rule`
    picks (the API does not); with `sentinel`
    (a `sentinel://` URL and the primary's name), on that Redis Sentinel group rather
    than a redis-server of its own, whose `min_replicas` replicas must confirm what the
    service answers for."""
    with ExitStack() as exits:
        redis = None
        if sentinel is None:
            redis = exits.enter_context(start_redis(directory / "redis"))
            sentinel = (redis.url, "mymaster")
        redis_url, master = sentinel
        kek_file = directory / "kek"
        LocalKek.load_or_create(kek_file)  # mode 0600
        settings = Settings(
            storage_url=f"s3://{bucket}",
            s3_endpoint_url=moto_endpoint,
            kek_file=kek_file,
            s3_part_size=MIN_PART_SIZE,
            admin_token=ADMIN_TOKEN,
            key_cache_ttl=0.5,
            redis_url=redis_url,
            redis_sentinel_master=master,
            job_visibility_timeout=VISIBILITY_TIMEOUT,
            job_lease_ttl=LEASE_TTL,
            job_stale_after=stale_after,
            job_requeue_after=requeue_after,
            job_task_copy_ttl=task_copy_ttl,
            redis_min_replicas=min_replicas,
            redis_replica_timeout=REPLICA_TIMEOUT,
        )
        app = create_app(settings)
        url = exits.enter_context(api_server(app))
        proxy = exits.enter_context(S3FaultProxy(moto_endpoint, rule)) if proxied else None
        stack = JobStack(
            redis_server=redis,
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


def placeholder_job(kind: JobKind, tenant: str) -> JobRecord:
    """A new record of `kind`, for tests of where records are kept: its parameters are
    valid, and name nothing that exists."""
    return JobRecord.new(kind, tenant, _placeholder_params(kind))


def _placeholder_params(kind: JobKind) -> AnyParams:
    target = {"bucket": "sealstream", "key": "k", "storage_key": "tenants/default/k"}
    if kind is JobKind.VERIFY:
        return VerifyParams.model_validate(target)
    if kind is JobKind.BATCH_ENCRYPT:
        return BatchEncryptParams.model_validate(
            {
                "kid": "k",
                "mode": "whole",
                "format": "auto",
                "encryption_context": {},
                "frame_length": 4096,
                "overwrite": False,
                "source": target,
                "destination": target,
            }
        )
    return ReencryptParams.model_validate({"kid": "k", **target})


def no_job_queued(record: JobRecord) -> None:
    """The job queue of sweeps that must find no job to queue."""
    raise AssertionError(f"the sweep queued job {record.id} ({record.kind})")


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


# Objects


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
