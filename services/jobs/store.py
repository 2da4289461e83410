"""Where job records live while jobs run and for a while after: the store's interface,
and the lease that lets one worker at a time run a job.

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

import heapq
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from services.jobs.records import (
    REPORT_KIND,
    REPORT_SUFFIX,
    JobKind,
    JobRecord,
    JobStatus,
    report_key,
)
from storage import InvalidObjectKey, ObjectNotFound
from storage.documents import FrozenCamelModel
from storage.integrity import Records, RecordTampered, note_refusal, seal, unseal

logger = logging.getLogger(__name__)

RECORD_KIND = "job"
TASK_COPY_KIND = "job-task-copy"  # apart from live records: neither passes for the other
PARKED_KIND = "parked-job"
PARKED_PREFIX = "sealstream/parked-jobs/"

# The most jobs one page of a listing reads, matching its filter or not.
SCAN_PER_PAGE = 1000


class TaskCopy(FrozenCamelModel):
    """A job's record as its task carries it, and until when it may stand in for the
    live record: a copy lives a bounded time after it was issued."""

    record: JobRecord
    issued_at: datetime
    expires_at: datetime


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

    def create(self, record: JobRecord) -> None:
        """Save a new job's record before its client is told of it: confirmed by the
        Redis replicas the store waits for, if it has any (`NotReplicated` if they do not
        confirm)."""
        self.save(record)

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

    def stop_requested(self, record: JobRecord) -> bool:
        """Whether the job was asked to stop: itself, or the batch job it is a chunk of."""
        return any(self.cancel_requested(job_id) for job_id in record.stopped_by)

    @abstractmethod
    def running_ids(self) -> list[str]: ...

    @abstractmethod
    def queued_before(self, moment: datetime) -> list[str]:
        """The jobs still queued that were queued (or queued again) before `moment`."""

    @abstractmethod
    def queued_again(self, job_id: str, moment: datetime) -> None:
        """Note that a queued job was queued again at `moment`; nothing if it has started
        meanwhile."""

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
        """A page of the tenant's jobs, newest first, and the cursor of the next page.

        Jobs come from the live records and from the final reports in storage, so a
        finished job stays listed after its record expired or the server restarted. A
        page reads at most `SCAN_PER_PAGE` jobs: one whose filter matches few jobs may
        hold fewer than `limit`, or none, and still have a next cursor.
        """
        page: list[JobRecord] = []
        last: str | None = None
        for scanned, job_id in enumerate(self._ids_after(tenant, after)):
            if scanned == SCAN_PER_PAGE:
                return page, last
            last = job_id
            record = self._listable(tenant, job_id)
            if record is None or (status and record.status != status):
                continue
            if kind and record.kind != kind:
                continue
            if record.kind is JobKind.BATCH_CHUNK and kind is not JobKind.BATCH_CHUNK:
                continue  # a share of a job listed itself; asked for by kind only
            if len(page) == limit:
                return page, page[-1].id
            page.append(record)
        return page, None

    def _ids_after(self, tenant: str, after: str | None) -> Iterator[str]:
        """The tenant's job ids after the cursor, in id order (newest first for every id
        made by `new_job_id`), each once: live records and final reports merged."""
        live = sorted(i for i in self._tenant_ids(tenant) if after is None or i > after)
        previous = None
        for job_id in heapq.merge(live, self._reported_ids(tenant, after)):
            if job_id != previous:
                yield job_id
            previous = job_id

    def _reported_ids(self, tenant: str, after: str | None) -> Iterator[str]:
        prefix = report_key(tenant, "")[: -len(REPORT_SUFFIX)]
        start = report_key(tenant, after) if after is not None else ""
        for info in self._reports.store.list(prefix, start_after=start):
            name = info.key[len(prefix) :]
            if name.endswith(REPORT_SUFFIX) and "/" not in name:
                yield name[: -len(REPORT_SUFFIX)]

    def park(self, record: JobRecord) -> None:
        """Keep a new job that could not be queued in storage, for the sweep to queue once
        the queue is back (`parked`); its client can poll it meanwhile, as queued."""
        self.write_report(record)
        self._reports.put(PARKED_KIND, f"{PARKED_PREFIX}{record.id}.json", record)

    def parked(self) -> Iterator[JobRecord]:
        """The parked jobs; one that fails authentication is passed over (and counted)."""
        for info in self._reports.store.list(PARKED_PREFIX):
            try:
                yield self._reports.get(PARKED_KIND, info.key, JobRecord)
            except (ObjectNotFound, RecordTampered):
                continue

    def unpark(self, job_id: str) -> None:
        self._reports.store.delete(f"{PARKED_PREFIX}{job_id}.json")

    def sealed(self, record: JobRecord, lifetime: timedelta) -> str:
        """The record sealed for a job's task to carry, valid for `lifetime` from now: a
        worker puts it back (`restore`) if Redis has lost the record meanwhile."""
        now = datetime.now(UTC)
        copy = TaskCopy(record=record, issued_at=now, expires_at=now + lifetime)
        return seal(self._reports.key, TASK_COPY_KIND, record.id, copy).decode()

    def restore(self, job_id: str, sealed: str) -> JobRecord | None:
        """Save again the queued record a job's task carried (`sealed`), now that the live
        one is gone: written to a Redis primary that a failover replaced before its
        replica had it. Nothing is saved, and None returned, if the copy is not authentic
        for `job_id`, has expired, or is not queued, or the job has a final report (ended,
        and expired since): a task carries only what the API or the sweep sealed, and a
        job runs once. The expiry is what stops an old task sent again, once its job's
        report is deleted from the bucket, from running an ended job a second time.
        """
        try:
            copy = unseal(self._reports.key, TASK_COPY_KIND, job_id, sealed.encode(), TaskCopy)
        except RecordTampered as refusal:
            note_refusal(TASK_COPY_KIND, refusal)
            return None
        record = copy.record
        if datetime.now(UTC) >= copy.expires_at:
            logger.warning(
                "job %s: its task's copy of the record expired at %s; not put back",
                job_id,
                copy.expires_at.isoformat(),
            )
            return None
        try:
            report = self._report(record.tenant, job_id)
        except RecordTampered:
            return None
        if record.status is not JobStatus.QUEUED or (report and report.status.finished):
            return None
        self.save(record)
        return record

    def reported_ended(self, record: JobRecord) -> bool:
        """Whether the job has a final report of its end: a job withdrawn (its client told
        it was not started) has one though a failover may have brought back its record
        as queued. A report that is not authentic counts as an end: never run on it."""
        try:
            report = self._report(record.tenant, record.id)
        except RecordTampered as refusal:
            note_refusal(REPORT_KIND, refusal)
            return True
        return report is not None and report.status.finished

    def write_report(self, record: JobRecord) -> None:
        self._reports.put(REPORT_KIND, report_key(record.tenant, record.id), record)

    def _report(self, tenant: str, job_id: str) -> JobRecord | None:
        try:
            return self._reports.get(REPORT_KIND, report_key(tenant, job_id), JobRecord)
        except (ObjectNotFound, InvalidObjectKey):
            return None

    def _listable(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job, live or else reported, or None if it is gone or refused: one
        bad record must not hide a tenant's other jobs, and a refused live record is not
        papered over by its report (reading the job answers `record-tampered`)."""
        try:
            record = self.load(job_id) or self._report(tenant, job_id)
        except RecordTampered:
            return None
        return record if record is not None and record.tenant == tenant else None

    def _live(self, job_id: str) -> JobRecord | None:
        """The live record, or None if it is gone or refused."""
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
