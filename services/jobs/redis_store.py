"""The job store on Redis: what Celery workers and the API share. Redis is one server
(`redis://`, `rediss://`) or a primary that Redis Sentinel watches and replaces
(`sentinel://host:port;sentinel://host:port/db`, as Celery's broker takes it)."""

from contextlib import suppress
from datetime import datetime, timedelta
from functools import partial
from typing import cast
from urllib.parse import unquote, urlsplit

import redis
from redis.client import Pipeline
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock
from redis.sentinel import Sentinel

from services.jobs.records import JobRecord, JobStatus
from services.jobs.store import JobLease, JobStore
from services.replicas import UNCONFIRMED, Replicas
from storage.integrity import Records

# Counts a finished job once: a flag per job (kept as long as its record) guards the
# counter, both in one step so that a crash cannot leave one without the other.
_COUNT_FINISHED = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
"""
_RUNNING = "sealstream:jobs:running"
_QUEUED = "sealstream:jobs:queued"  # scored by when each was (last) queued
TIMEOUT = 5  # seconds, to connect and for each answer
SENTINEL_PORT = 26379
_FINISHED_COUNTS = "sealstream:jobs:finished"  # fields "<kind>/<status>"


def _kind_and_status(field: str) -> tuple[str, str]:
    kind, _, status = field.partition("/")
    return kind, status


class RedisJobStore(JobStore):
    """Records as JSON strings with an expiry; a sorted set per tenant for listing; a hash
    of finished-job counts, by kind and status. What the API answers for (a job created,
    a cancel request) is confirmed by `replicas`."""

    def __init__(
        self,
        client: redis.Redis,
        records: Records,
        ttl: timedelta,
        replicas: Replicas = UNCONFIRMED,
    ) -> None:
        super().__init__(records, ttl)
        self._redis = client
        self._replicas = replicas
        self._count_finished = client.register_script(_COUNT_FINISHED)

    @classmethod
    def from_url(
        cls,
        url: str,
        records: Records,
        ttl: timedelta,
        sentinel_master: str,
        replicas: Replicas = UNCONFIRMED,
    ) -> "RedisJobStore":
        """A store on the Redis at `url`; with a `sentinel://` URL, on the primary named
        `sentinel_master` that the sentinels listed in it answer for."""
        return cls(redis_client(url, sentinel_master), records, ttl, replicas)

    def save(self, record: JobRecord) -> None:
        UNCONFIRMED.write(self._redis, partial(self._queue_save, record))

    def create(self, record: JobRecord) -> None:
        self._replicas.write(self._redis, partial(self._queue_save, record))

    def _queue_save(self, record: JobRecord, pipe: Pipeline) -> None:
        seconds = int(self.ttl.total_seconds())
        pipe.set(f"sealstream:job:{record.id}", self._sealed(record), ex=seconds)
        pipe.zadd(f"sealstream:jobs:{record.tenant}", {record.id: record.created_at.timestamp()})
        pipe.expire(f"sealstream:jobs:{record.tenant}", seconds)
        if record.status is JobStatus.RUNNING:
            pipe.sadd(_RUNNING, record.id)
        else:
            pipe.srem(_RUNNING, record.id)
        if record.status is JobStatus.QUEUED:
            pipe.zadd(_QUEUED, {record.id: record.created_at.timestamp()}, nx=True)
        else:
            pipe.zrem(_QUEUED, record.id)
        if record.status.finished:
            self._count_finished(
                keys=[f"sealstream:job:{record.id}:counted", _FINISHED_COUNTS],
                args=[seconds, f"{record.kind}/{record.status}"],
                client=pipe,
            )

    def _load(self, job_id: str) -> str | None:
        raw = self._redis.get(f"sealstream:job:{job_id}")
        return None if raw is None else str(raw)

    def _tenant_ids(self, tenant: str) -> list[str]:
        ids = self._redis.zrevrange(f"sealstream:jobs:{tenant}", 0, -1)
        return [str(job_id) for job_id in cast(list[str], ids)]

    def request_cancel(self, job_id: str) -> None:
        seconds = int(self.ttl.total_seconds())
        self._replicas.write(
            self._redis, lambda pipe: pipe.set(f"sealstream:job:{job_id}:cancel", "1", ex=seconds)
        )

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.exists(f"sealstream:job:{job_id}:cancel"))

    def running_ids(self) -> list[str]:
        ids = [str(job_id) for job_id in cast(set[str], self._redis.smembers(_RUNNING))]
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(f"sealstream:job:{job_id}")
            live = pipe.execute()
        # A record that expired while its job ran (a worker lost, no sweep since) leaves
        # its id here; it is running nowhere, so it is dropped. A worker that is in fact
        # alive adds it back with its next progress update, as it does after a Redis restart.
        running = [job_id for job_id, exists in zip(ids, live, strict=True) if exists]
        if len(running) < len(ids):
            self._redis.srem(_RUNNING, *(set(ids) - set(running)))
        return running

    def queued_before(self, moment: datetime) -> list[str]:
        ids = self._redis.zrangebyscore(_QUEUED, "-inf", moment.timestamp())
        queued = [str(job_id) for job_id in cast(list[str], ids)]
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in queued:
                pipe.exists(f"sealstream:job:{job_id}")
            live = pipe.execute()
        expired = [job_id for job_id, exists in zip(queued, live, strict=True) if not exists]
        if expired:  # a record that expired while queued: no job left to run
            self._redis.zrem(_QUEUED, *expired)
        return [job_id for job_id in queued if job_id not in expired]

    def queued_again(self, job_id: str, moment: datetime) -> None:
        # XX: a job that started meanwhile has left the set, and stays out of it.
        self._redis.zadd(_QUEUED, {job_id: moment.timestamp()}, xx=True)

    def finished_counts(self) -> dict[tuple[str, str], int]:
        counts = cast(dict[str, str], self._redis.hgetall(_FINISHED_COUNTS))
        return {_kind_and_status(field): int(count) for field, count in counts.items()}

    def ping(self) -> None:
        self._redis.ping()

    def lease(self, job_id: str, ttl: float) -> JobLease | None:
        lock = self._redis.lock(
            f"sealstream:job:{job_id}:lease", timeout=ttl, blocking=False, thread_local=False
        )
        return _RedisLease(lock) if lock.acquire(blocking=False) else None


class _RedisLease(JobLease):
    def __init__(self, lock: Lock) -> None:
        self._lock = lock
        self._token = lock.local.token

    def renew(self) -> bool:
        try:
            self._lock.reacquire()
        except LockNotOwnedError:
            # Gone from Redis (restarted empty), or taken after it expired: take it back
            # if it is free, under the same token.
            return bool(self._lock.acquire(blocking=False, token=self._token))
        except RedisError:
            pass  # Redis away: nobody else can take the lease meanwhile either
        return True

    def release(self) -> None:
        with suppress(LockError, RedisError):
            self._lock.release()


def redis_client(url: str, sentinel_master: str) -> redis.Redis:
    """A client of the Redis at `url`. A `sentinel://` URL lists the sentinels, separated
    by `;`, with the primary's password and database number: the client asks them which
    server is the primary named `sentinel_master` whenever it connects, so that it
    follows a failover."""
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
        )
    parts = [urlsplit(part) for part in url.split(";") if part]
    if any(part.scheme != "sentinel" or not part.hostname for part in parts):
        raise ValueError("a sentinel URL lists sentinel://host:port parts, separated by ';'")
    passwords = {unquote(part.password) for part in parts if part.password}
    databases = {part.path.strip("/") for part in parts if part.path.strip("/")}
    if len(passwords) > 1 or len(databases) > 1 or not databases <= {str(n) for n in range(16)}:
        raise ValueError("the parts of a sentinel URL must agree on one password and one db")
    sentinels = [(str(part.hostname), part.port or SENTINEL_PORT) for part in parts]
    sentinel = Sentinel(sentinels, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    client = sentinel.master_for(
        sentinel_master,
        decode_responses=True,
        password=next(iter(passwords), None),
        db=int(next(iter(databases), "0")),
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
    )
    return cast(redis.Redis, client)
