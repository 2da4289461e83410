"""Running one job: status transitions, progress reports, cancellation, final report.

`run_job` is what a Celery task (or the embedded default's thread pool) calls with a job
id. It is safe to call twice for the same job — a task redelivered after its worker died
runs it again: a finished job is left alone, and the job bodies themselves overwrite or
resume rather than duplicate. But a job is run at most `MAX_RUNS` times: one whose
process died during each run (killed by the kernel's OOM killer, say, or crashed) would
otherwise be handed out again for ever, taking down a process each time, so the next
delivery fails it (`job-killed-repeatedly`). A job that runs out of memory fails at
once (`job-out-of-memory`): the process that raised the MemoryError lives on.

A job starts only once the process's audit trail has been written (`AuditTrail.writable`),
as the API refuses requests it cannot audit: while it cannot be, the job stays queued
and is tried again `AUDIT_RETRY_AFTER` seconds later (unless the audit fails open).
"""

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from sealstream.wiring import Parts
from services.jobs import JobKind, JobLease, JobRecord, JobStatus, JobStore, Progress, Submit
from services.jobs.context import JobContext, error_entry, finish_job, run_body
from storage.integrity import RecordTampered

logger = logging.getLogger(__name__)

MAX_RUNS = 2  # runs of a job whose process dies each time
AUDIT_RETRY_AFTER = 5.0  # seconds before a job held back by the audit is tried again


JobBody = Callable[[JobContext, Parts], dict[str, Any]]


class JobOutcome(Enum):
    DONE = "done"  # ran to a final status, or had one already
    BUSY = "busy"  # another worker holds the job's lease: try again later
    UNAUDITED = "unaudited"  # the audit trail cannot be written: try again later


class LeaseKeeper(threading.Thread):
    """Renews a job's lease in the background, whatever the job body is doing; a renewal
    refused (another worker took the job) sets `lost`, which the next checkpoint raises."""

    def __init__(self, lease: JobLease, ttl: float) -> None:
        super().__init__(name="sealstream-lease", daemon=True)
        self._lease = lease
        self._interval = ttl / 3
        self._done = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self._interval):
            if not self._lease.renew():
                self.lost.set()
                return

    def stop(self) -> None:
        self._done.set()
        self.join()
        self._lease.release()


def run_job(
    job_id: str,
    services: Parts,
    bodies: dict[JobKind, JobBody],
    carried: str | None = None,
    submit: Submit | None = None,
) -> JobOutcome:
    """Run the job `job_id` to a final status, unless it already has one or another
    worker is running it (a task Redis handed out again after a broker hiccup, or a job
    queued again by the sweep). `carried` is the sealed record its task carried, which
    stands in for a live record that Redis lost. The jobs it starts are queued with
    `submit`, if given."""
    store = services.jobs
    found = _unfinished(store, job_id, carried)
    if found is None:
        return JobOutcome.DONE
    if store.reported_ended(found):  # withdrawn, its queued record brought back by a failover
        logger.warning("job %s: its final report says it ended; not running it", job_id)
        return JobOutcome.DONE
    ttl = services.settings.job_lease_ttl
    lease = store.lease(job_id, ttl)
    if lease is None:
        return JobOutcome.BUSY
    keeper = LeaseKeeper(lease, ttl)
    keeper.start()
    try:
        # Read again under the lease: another task of the job may have run it to its end
        # between the first read and the lease.
        record = _unfinished(store, job_id)
        if record is None:
            return JobOutcome.DONE
        return _run(store, record, services, bodies, keeper, submit)
    finally:
        keeper.stop()


def _unfinished(store: JobStore, job_id: str, carried: str | None = None) -> JobRecord | None:
    """The job's record, unless it is finished, gone or not authentic; a record gone is
    put back from the sealed copy its task `carried`, if it has one."""
    try:
        record = store.load(job_id)
    except RecordTampered:
        # Whoever wrote it could name any tenant, kind or parameters: never run it.
        logger.error("job %s: its record failed authentication; not running it", job_id)
        return None
    if record is None and carried is not None:
        record = store.restore(job_id, carried)
        if record is not None:
            logger.warning("job %s: its record was lost; put back from its task", job_id)
    if record is None:
        logger.warning("job %s: no record (expired or unknown); nothing to do", job_id)
        return None
    return None if record.status.finished else record


def _run(
    store: JobStore,
    record: JobRecord,
    services: Parts,
    bodies: dict[JobKind, JobBody],
    keeper: LeaseKeeper,
    submit: Submit | None,
) -> JobOutcome:
    if store.stop_requested(record):
        finish_job(store, services.audit, record, JobStatus.CANCELLED)
        return JobOutcome.DONE
    if _died_in_every_run(record):
        detail = (
            f"the process running the job died during each of its {record.attempts} runs "
            "(killed, or crashed); it is not run again"
        )
        error = error_entry("job-killed-repeatedly", detail)
        finish_job(store, services.audit, record, JobStatus.FAILED, error=error)
        return JobOutcome.DONE
    if not services.audit.writable():
        logger.warning("job %s: the audit trail cannot be written; not starting it yet", record.id)
        return JobOutcome.UNAUDITED
    _start(store, record, services, bodies, keeper, submit)
    return JobOutcome.DONE


def _start(
    store: JobStore,
    record: JobRecord,
    services: Parts,
    bodies: dict[JobKind, JobBody],
    keeper: LeaseKeeper,
    submit: Submit | None,
) -> None:
    now = datetime.now(UTC)
    record = record.model_copy(
        update={
            "status": JobStatus.RUNNING,
            "attempts": record.attempts + 1,
            "started_at": record.started_at or now,
            "heartbeat_at": now,
            "updated_at": now,
            "progress": record.progress if record.attempts else Progress(),
        }
    )
    context = JobContext(store, record, keeper.lost, submit)
    run_body(store, services.audit, context, lambda: bodies[record.kind](context, services))


def _died_in_every_run(record: JobRecord) -> bool:
    """Started `MAX_RUNS` times and never finished: this worker holds the job's lease, so
    no other is running it now, and each run before ended with its process."""
    return record.status is JobStatus.RUNNING and record.attempts >= MAX_RUNS
