"""Running one job: status transitions, progress reports, cancellation, final report.

`run_job` is what a Celery task (or the embedded default's thread pool) calls with a job
id. It is safe to call twice for the same job — a task redelivered after its worker died
runs it again: a finished job is left alone, and the job bodies themselves overwrite or
resume rather than duplicate. But a job is run at most `MAX_RUNS` times: one whose
process died during each run (killed by the kernel's OOM killer, say, or crashed) would
otherwise be handed out again for ever, taking down a process each time, so the next
delivery fails it (`job-killed-repeatedly`). A job that runs out of memory fails at
once (`job-out-of-memory`): the process that raised the MemoryError lives on.
"""

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

from redis.exceptions import RedisError
from tenacity import retry, stop_after_delay, wait_exponential

from sealstream.wiring import Parts
from services.errors import error_code, public_detail
from services.jobs import JobKind, JobLease, JobParams, JobRecord, JobStatus, JobStore, Progress
from storage.integrity import RecordTampered

logger = logging.getLogger(__name__)
P = TypeVar("P", bound=JobParams)

REPORT_INTERVAL = 0.5  # seconds between progress writes (and cancel checks)
MAX_RUNS = 2  # runs of a job whose process dies each time


class JobCancelled(Exception):
    """Raised inside a job body at its next checkpoint after a cancel request."""


class LeaseLost(Exception):
    """Another worker took over this job (after this one stalled past its lease)."""


class JobFailed(Exception):
    """A job body's own verdict of failure, with a stable code (e.g. a verify mismatch)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class JobContext:
    """What a running job body reports through; it also stops the body on cancel."""

    def __init__(self, store: JobStore, record: JobRecord, keeper: "LeaseKeeper") -> None:
        self._store = store
        self.record = record
        self._keeper = keeper
        self._last_report = 0.0

    def params(self, model: type[P]) -> P:
        """The job's parameters, as the model its body runs them with."""
        return self.record.params_as(model)

    def progress(self, *, force: bool = False, **changes: int | None) -> None:
        """Update progress (bytes_done, items_total, ...); written at most every half
        second, when a cancel request is also noticed (`JobCancelled`)."""
        progress = self.record.progress.model_copy(update=changes)
        self.record = self.record.model_copy(update={"progress": progress})
        if force or time.monotonic() - self._last_report >= REPORT_INTERVAL:
            self.checkpoint()

    def add_bytes(self, count: int) -> None:
        self.progress(bytes_done=self.record.progress.bytes_done + count)

    def save_partial(self, result: dict[str, Any]) -> None:
        """Keep work done so far in the record, so a rerun can resume after it."""
        self.record = self.record.model_copy(update={"result": result})
        self.checkpoint()

    def checkpoint(self) -> None:
        """Heartbeat and write the record; raise `JobCancelled` if a cancel was asked."""
        if self._keeper.lost.is_set():
            raise LeaseLost(self.record.id)
        now = datetime.now(UTC)
        self.record = self.record.model_copy(update={"heartbeat_at": now, "updated_at": now})
        self._last_report = time.monotonic()
        try:
            self._store.save(self.record)
            cancelled = self._store.cancel_requested(self.record.id)
        except RedisError as error:
            # Redis away (restarting): keep working; the next write puts the record back.
            logger.warning("job %s: cannot reach the job store: %s", self.record.id, error)
            return
        if cancelled:
            raise JobCancelled(self.record.id)


JobBody = Callable[[JobContext, Parts], dict[str, Any]]


class JobOutcome(Enum):
    DONE = "done"  # ran to a final status, or had one already
    BUSY = "busy"  # another worker holds the job's lease: try again later


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


def run_job(job_id: str, services: Parts, bodies: dict[JobKind, JobBody]) -> JobOutcome:
    """Run the job `job_id` to a final status, unless it already has one or another
    worker is running it (a task Redis handed out again after a broker hiccup)."""
    store = services.jobs
    try:
        record = store.load(job_id)
    except RecordTampered:
        # Whoever wrote it could name any tenant, kind or parameters: never run it.
        logger.error("job %s: its record failed authentication; not running it", job_id)
        return JobOutcome.DONE
    if record is None:
        logger.warning("job %s: no record (expired or unknown); nothing to do", job_id)
        return JobOutcome.DONE
    if record.status.finished:
        return JobOutcome.DONE
    ttl = services.settings.job_lease_ttl
    lease = store.lease(job_id, ttl)
    if lease is None:
        return JobOutcome.BUSY
    keeper = LeaseKeeper(lease, ttl)
    keeper.start()
    try:
        _run(store, record, services, bodies, keeper)
    finally:
        keeper.stop()
    return JobOutcome.DONE


def _run(
    store: JobStore,
    record: JobRecord,
    services: Parts,
    bodies: dict[JobKind, JobBody],
    keeper: LeaseKeeper,
) -> None:
    if store.cancel_requested(record.id):
        _finish(services, record, JobStatus.CANCELLED)
        return
    if _died_in_every_run(record):
        detail = (
            f"the process running the job died during each of its {record.attempts} runs "
            "(killed, or crashed); it is not run again"
        )
        _finish(services, record, JobStatus.FAILED, error=_error("job-killed-repeatedly", detail))
        return
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
    context = JobContext(store, record, keeper)
    services.audit.job("job-started", tenant=record.tenant, job=record.id, kind=record.kind.value)
    try:
        context.checkpoint()
        result = bodies[record.kind](context, services)
    except LeaseLost:
        logger.warning("job %s: another worker took it over; leaving it to that one", record.id)
        services.audit.job("job-left", tenant=record.tenant, job=record.id, kind=record.kind.value)
    except JobCancelled:
        _finish(services, context.record, JobStatus.CANCELLED)
    except JobFailed as failure:
        _finish(services, context.record, JobStatus.FAILED, error=_problem(failure.code, failure))
    except MemoryError:
        logger.error("job %s ran out of memory", record.id)
        detail = "the job needed more memory than its process may use"
        _finish(
            services, context.record, JobStatus.FAILED, error=_error("job-out-of-memory", detail)
        )
    except Exception as error:
        logger.exception("job %s failed", record.id)
        _finish(
            services, context.record, JobStatus.FAILED, error=_problem(error_code(error), error)
        )
    else:
        _finish(services, context.record, JobStatus.SUCCEEDED, result=result)


def _died_in_every_run(record: JobRecord) -> bool:
    """Started `MAX_RUNS` times and never finished: this worker holds the job's lease, so
    no other is running it now, and each run before ended with its process."""
    return record.status is JobStatus.RUNNING and record.attempts >= MAX_RUNS


def _problem(code: str, error: Exception) -> dict[str, str]:
    return _error(code, public_detail(error))


def _error(code: str, detail: str) -> dict[str, str]:
    return {"code": code, "detail": detail}


def _finish(
    services: Parts,
    record: JobRecord,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> None:
    now = datetime.now(UTC)
    final = record.model_copy(
        update={
            "status": status,
            "result": result if result is not None else record.result,
            "error": error,
            "finished_at": now,
            "updated_at": now,
        }
    )
    _write_final(services.jobs, final)
    services.audit.job(
        "job-ended",
        tenant=record.tenant,
        job=record.id,
        kind=record.kind.value,
        outcome=status.value,
        code=None if error is None else error["code"],
    )


@retry(stop=stop_after_delay(60), wait=wait_exponential(max=5), reraise=True)
def _write_final(store: JobStore, record: JobRecord) -> None:
    # The report in object storage outlives Redis; the record is what clients poll first.
    store.write_report(record)
    store.save(record)
