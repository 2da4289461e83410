"""The job store of the embedded default, which runs every job in its own process."""

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from cachetools import TTLCache

from services.jobs.records import JobRecord, JobStatus
from services.jobs.store import JobLease, JobStore
from storage.integrity import Records


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
        self._queued_again: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def save(self, record: JobRecord) -> None:
        with self._lock:
            self._records[record.id] = self._sealed(record)
            if record.status is not JobStatus.QUEUED:
                self._queued_again.pop(record.id, None)
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
            record = self._live(job_id)
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

    def queued_before(self, moment: datetime) -> list[str]:
        def waiting(record: JobRecord) -> bool:
            queued = self._queued_again.get(record.id, record.created_at)
            return record.status is JobStatus.QUEUED and queued < moment

        return [r.id for r in self._records_where(waiting)]

    def queued_again(self, job_id: str, moment: datetime) -> None:
        with self._lock:
            self._queued_again[job_id] = moment

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
        self._store._release(self._job_id)  # noqa: SLF001 (its store's lease, in its module)
