"""Job records: what a client polls while a worker does the long work.

A record lives in Redis (or, for the embedded default, in memory) under an expiry, and
its final state is also written to object storage, so a finished job stays readable
after the record expires or Redis loses it. Writers always store the whole record: a
worker that finds its record gone (Redis restarted empty) writes it back on its next
progress update. A cancel request is kept apart from the record, so that a worker
rewriting its record can never erase one.

Neither Redis nor the bucket is trusted: a job record is sealed (`storage.integrity`:
an HMAC over the whole record, its id, kind, tenant and parameters included) wherever it
is kept, and one that fails is refused. Whoever can write Redis can therefore neither run
a job as another tenant nor make a failed job read as succeeded; deleting records or
setting cancel flags remains possible, and is a denial of service only.
"""

import math
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Self, cast

import redis
from cachetools import TTLCache
from pydantic import Field
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock

from storage import InvalidObjectKey, ObjectNotFound
from storage.documents import CamelModel
from storage.integrity import Records, RecordTampered, note_refusal, seal, unseal

REPORTS_PREFIX = "sealstream/jobs/"
RECORD_KIND = "job"
REPORT_KIND = "job-report"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobKind(StrEnum):
    VERIFY = "verify"
    BATCH_ENCRYPT = "batch-encrypt"
    REENCRYPT = "reencrypt"
    REWRAP = "rewrap"  # deprecated: the reencrypt job under its former name, for one release


class Progress(CamelModel):
    bytes_done: int = 0
    bytes_total: int | None = None
    items_done: int = 0
    items_total: int | None = None


class JobRecord(CamelModel):
    id: str
    kind: JobKind
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    params: dict[str, Any] = Field(default_factory=dict)
    progress: Progress = Field(default_factory=Progress)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @classmethod
    def new(cls, kind: JobKind, tenant: str, params: dict[str, Any]) -> Self:
        now = datetime.now(UTC)
        return cls(
            id=f"job_{secrets.token_hex(12)}",
            kind=kind,
            tenant=tenant,
            params=params,
            created_at=now,
            updated_at=now,
        )

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def report_key(tenant: str, job_id: str) -> str:
    return f"{REPORTS_PREFIX}{tenant}/{job_id}.json"


class JobLease(ABC):
    """The right to run one job, held by one worker at a time and kept alive by renewal."""

    @abstractmethod
    def renew(self) -> bool:
        """Extend the lease; False if another worker holds it now."""

    @abstractmethod
    def release(self) -> None: ...


class JobStore(ABC):
    """Where job records live while jobs run and for a while after."""

    def __init__(self, records: Records, ttl: timedelta) -> None:
        self._reports = records
        self.ttl = ttl

    @abstractmethod
    def save(self, record: JobRecord) -> None:
        """Store the whole record (create or replace) with a fresh expiry."""

    def load(self, job_id: str) -> JobRecord | None:
        """The live record, if it has not expired or been lost; `RecordTampered` if the
        one stored is not authentic."""
        raw = self._load(job_id)
        return None if raw is None else self._unsealed(job_id, raw)

    @abstractmethod
    def _load(self, job_id: str) -> str | None:
        """The sealed record as stored, if any."""

    @abstractmethod
    def _tenant_ids(self, tenant: str) -> list[str]:
        """The tenant's job ids, newest first (some may have expired)."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    def running_ids(self) -> list[str]: ...

    @abstractmethod
    def finished_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs have finished, by (kind, status), since the store began counting.

        Each job counts once, when a finished record of it is first saved: saving it again
        (a report rewritten, a late worker) does not count it twice.
        """

    @abstractmethod
    def ping(self) -> None:
        """Readiness: raise if the store cannot be reached."""

    @abstractmethod
    def lease(self, job_id: str, ttl: float) -> JobLease | None:
        """The job's lease for `ttl` seconds, or None while another worker holds it."""

    def find(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job: the live record, or its final report once the record is gone."""
        record = self.load(job_id)
        if record is None:
            record = self._report(tenant, job_id)
        return record if record is not None and record.tenant == tenant else None

    def list(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        kind: JobKind | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the tenant's jobs, newest first, and the cursor of the next page."""
        ids = self._tenant_ids(tenant)
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        page: list[JobRecord] = []
        for job_id in ids:
            record = self._listable(job_id)
            if record is None or record.tenant != tenant or (status and record.status != status):
                continue
            if kind and record.kind != kind:
                continue
            if len(page) == limit:
                return page, page[-1].id
            page.append(record)
        return page, None

    def write_report(self, record: JobRecord) -> None:
        self._reports.put(REPORT_KIND, report_key(record.tenant, record.id), record)

    def _report(self, tenant: str, job_id: str) -> JobRecord | None:
        try:
            return self._reports.get(REPORT_KIND, report_key(tenant, job_id), JobRecord)
        except (ObjectNotFound, InvalidObjectKey):
            return None

    def _listable(self, job_id: str) -> JobRecord | None:
        """The record, or None if it is gone or refused: one bad record must not hide a
        tenant's other jobs."""
        try:
            return self.load(job_id)
        except RecordTampered:
            return None

    def _sealed(self, record: JobRecord) -> str:
        return seal(self._reports.key, RECORD_KIND, record.id, record).decode()

    def _unsealed(self, job_id: str, raw: str) -> JobRecord:
        try:
            return unseal(self._reports.key, RECORD_KIND, job_id, raw.encode(), JobRecord)
        except RecordTampered as refusal:
            note_refusal(RECORD_KIND, refusal)
            raise


# Counts a finished job once: a flag per job (kept as long as its record) guards the
# counter, both in one step so that a crash cannot leave one without the other.
_COUNT_FINISHED = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
"""
_RUNNING = "sealstream:jobs:running"
_FINISHED_COUNTS = "sealstream:jobs:finished"  # fields "<kind>/<status>"


def _kind_and_status(field: str) -> tuple[str, str]:
    kind, _, status = field.partition("/")
    return kind, status


class RedisJobStore(JobStore):
    """Records as JSON strings with an expiry; a sorted set per tenant for listing; a hash
    of finished-job counts, by kind and status."""

    def __init__(self, client: redis.Redis, records: Records, ttl: timedelta) -> None:
        super().__init__(records, ttl)
        self._redis = client
        self._count_finished = client.register_script(_COUNT_FINISHED)

    @classmethod
    def from_url(cls, url: str, records: Records, ttl: timedelta) -> "RedisJobStore":
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
        )
        return cls(client, records, ttl)

    def save(self, record: JobRecord) -> None:
        seconds = int(self.ttl.total_seconds())
        with self._redis.pipeline() as pipe:
            pipe.set(f"sealstream:job:{record.id}", self._sealed(record), ex=seconds)
            pipe.zadd(
                f"sealstream:jobs:{record.tenant}", {record.id: record.created_at.timestamp()}
            )
            pipe.expire(f"sealstream:jobs:{record.tenant}", seconds)
            if record.status is JobStatus.RUNNING:
                pipe.sadd(_RUNNING, record.id)
            else:
                pipe.srem(_RUNNING, record.id)
            if record.status.finished:
                self._count_finished(
                    keys=[f"sealstream:job:{record.id}:counted", _FINISHED_COUNTS],
                    args=[seconds, f"{record.kind}/{record.status}"],
                    client=pipe,
                )
            pipe.execute()

    def _load(self, job_id: str) -> str | None:
        raw = self._redis.get(f"sealstream:job:{job_id}")
        return None if raw is None else str(raw)

    def _tenant_ids(self, tenant: str) -> list[str]:
        ids = self._redis.zrevrange(f"sealstream:jobs:{tenant}", 0, -1)
        return [str(job_id) for job_id in cast(list[str], ids)]

    def request_cancel(self, job_id: str) -> None:
        self._redis.set(f"sealstream:job:{job_id}:cancel", "1", ex=int(self.ttl.total_seconds()))

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


class MemoryJobStore(JobStore):
    """The embedded default's store: this process's memory, same expiry rules."""

    def __init__(self, records: Records, ttl: timedelta) -> None:
        super().__init__(records, ttl)
        seconds = ttl.total_seconds()
        # Records, cancel requests and counted flags expire as Redis's keys do, and are
        # dropped once expired: a long-running server does not keep every job it ran.
        self._records: TTLCache[str, str] = TTLCache(math.inf, seconds, time.monotonic)
        self._cancelled: TTLCache[str, bool] = TTLCache(math.inf, seconds, time.monotonic)
        self._counted: TTLCache[str, bool] = TTLCache(math.inf, seconds, time.monotonic)
        self._finished: Counter[tuple[str, str]] = Counter()
        self._leased: set[str] = set()
        self._lock = threading.Lock()

    def save(self, record: JobRecord) -> None:
        with self._lock:
            self._records[record.id] = self._sealed(record)
            if record.status.finished and record.id not in self._counted:
                self._counted[record.id] = True
                self._finished[(record.kind, record.status)] += 1

    def _load(self, job_id: str) -> str | None:
        with self._lock:
            return self._records.get(job_id)

    def _records_where(self, keep: Callable[[JobRecord], bool]) -> Iterator[JobRecord]:
        with self._lock:
            ids = list(self._records)
        for job_id in ids:
            record = self._listable(job_id)
            if record is not None and keep(record):
                yield record

    def _tenant_ids(self, tenant: str) -> list[str]:
        records = sorted(
            self._records_where(lambda r: r.tenant == tenant),
            key=lambda r: r.created_at,
            reverse=True,
        )
        return [r.id for r in records]

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled[job_id] = True

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def running_ids(self) -> list[str]:
        return [r.id for r in self._records_where(lambda r: r.status is JobStatus.RUNNING)]

    def finished_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._finished)

    def ping(self) -> None:
        """Memory is always there."""

    def lease(self, job_id: str, ttl: float) -> JobLease | None:
        with self._lock:
            if job_id in self._leased:
                return None
            self._leased.add(job_id)
        return _MemoryLease(self, job_id)

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._leased.discard(job_id)


class _MemoryLease(JobLease):
    """One process runs every job of a memory store: a lease only guards double submits."""

    def __init__(self, store: MemoryJobStore, job_id: str) -> None:
        self._store = store
        self._job_id = job_id

    def renew(self) -> bool:
        return True

    def release(self) -> None:
        self._store._release(self._job_id)


def stale(record: JobRecord, stale_after: timedelta, now: datetime) -> bool:
    """A running job whose worker has not reported for longer than `stale_after`."""
    last = record.heartbeat_at or record.started_at or record.created_at
    return record.status is JobStatus.RUNNING and now - last > stale_after


def fail_if_stale(store: JobStore, record: JobRecord, stale_after: timedelta) -> JobRecord:
    """Mark a stale running job failed (a lost worker), so no job stays running forever."""
    now = datetime.now(UTC)
    if not stale(record, stale_after, now):
        return record
    failed = record.model_copy(
        update={
            "status": JobStatus.FAILED,
            "finished_at": now,
            "updated_at": now,
            "error": {
                "code": "job-stale",
                "detail": f"no progress reported for over {stale_after}: its worker was lost",
            },
        }
    )
    store.save(failed)
    store.write_report(failed)
    return failed


def sweep_stale(store: JobStore, stale_after: timedelta) -> list[str]:
    """Fail every stale running job; the ids of those failed."""
    swept = []
    for job_id in store.running_ids():
        record = store.load(job_id)
        if (
            record is not None
            and fail_if_stale(store, record, stale_after).status is JobStatus.FAILED
        ):
            swept.append(job_id)
    return swept
