"""What a running job body reports through, wherever it runs (a worker, or the API
process for a job fed by an upload): progress, written at most every half second, and
the checkpoints where a cancel request, or the loss of the job to another worker, stops
the body."""

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from redis.exceptions import RedisError
from tenacity import retry, stop_after_delay, wait_exponential

from audit import AuditTrail
from services.errors import error_code, public_detail
from services.jobs.params import JobParams
from services.jobs.records import JobRecord, JobStatus
from services.jobs.requeue import Submit
from services.jobs.store import JobStore

logger = logging.getLogger(__name__)
P = TypeVar("P", bound=JobParams)

REPORT_INTERVAL = 0.5  # seconds between progress writes (and cancel checks)


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
    """What a running job body reports through; it also stops the body on cancel, and
    once `lost` is set (another worker holds the job now). `submit` queues the jobs it
    starts, for every worker to take (None: the body runs them itself)."""

    def __init__(
        self,
        store: JobStore,
        record: JobRecord,
        lost: threading.Event,
        submit: Submit | None = None,
    ) -> None:
        self._store = store
        self.record = record
        self._lost = lost
        self.submit = submit
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
        if self._lost.is_set():
            raise LeaseLost(self.record.id)
        now = datetime.now(UTC)
        self.record = self.record.model_copy(update={"heartbeat_at": now, "updated_at": now})
        self._last_report = time.monotonic()
        try:
            self._store.save(self.record)
            cancelled = self._store.stop_requested(self.record)
        except RedisError as error:
            # Redis away (restarting): keep working; the next write puts the record back.
            logger.warning("job %s: cannot reach the job store: %s", self.record.id, error)
            return
        if cancelled:
            raise JobCancelled(self.record.id)


def run_body(
    store: JobStore, audit: AuditTrail, context: JobContext, body: Callable[[], dict[str, Any]]
) -> JobRecord | None:
    """Run a job's body, which reports through `context`, to a final status; the final
    record (None if another worker took the job over)."""
    record = context.record
    audit.job("job-started", tenant=record.tenant, job=record.id, kind=record.kind.value)
    try:
        context.checkpoint()
        result = body()
    except LeaseLost:
        logger.warning("job %s: another worker took it over; leaving it to that one", record.id)
        audit.job("job-left", tenant=record.tenant, job=record.id, kind=record.kind.value)
        return None
    except JobCancelled:
        return finish_job(store, audit, context.record, JobStatus.CANCELLED)
    except JobFailed as failure:
        error = error_entry(failure.code, public_detail(failure))
        return finish_job(store, audit, context.record, JobStatus.FAILED, error=error)
    except MemoryError:
        logger.error("job %s ran out of memory", record.id)
        detail = "the job needed more memory than its process may use"
        error = error_entry("job-out-of-memory", detail)
        return finish_job(store, audit, context.record, JobStatus.FAILED, error=error)
    except Exception as failure:
        logger.exception("job %s failed", record.id)
        error = error_entry(error_code(failure), public_detail(failure))
        return finish_job(store, audit, context.record, JobStatus.FAILED, error=error)
    return finish_job(store, audit, context.record, JobStatus.SUCCEEDED, result=result)


def error_entry(code: str, detail: str) -> dict[str, str]:
    """A job's `error`: its code, and a detail fit for its client."""
    return {"code": code, "detail": detail}


def finish_job(
    store: JobStore,
    audit: AuditTrail,
    record: JobRecord,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> JobRecord:
    """Give the job its final status (and result or error), in its record and its report,
    and audit its end; the final record."""
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
    _write_final(store, final)
    audit.job(
        "job-ended",
        tenant=record.tenant,
        job=record.id,
        kind=record.kind.value,
        outcome=status.value,
        code=None if error is None else error["code"],
    )
    return final


@retry(stop=stop_after_delay(60), wait=wait_exponential(max=5), reraise=True)
def _write_final(store: JobStore, record: JobRecord) -> None:
    # The report in object storage outlives Redis; the record is what clients poll first.
    store.write_report(record)
    store.save(record)
