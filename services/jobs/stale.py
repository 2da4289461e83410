"""Jobs whose worker was lost: a running job that stops reporting is failed, when it is
read and by the periodic sweep, so that no job stays running forever."""

from datetime import UTC, datetime, timedelta

from services.jobs.records import JobRecord, JobStatus
from services.jobs.store import JobStore


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
