"""Jobs whose task never reached a worker: queued again by the periodic sweep.

Redis replicates asynchronously, so a failover can lose a task the old primary had
acknowledged, and a job created while the queue is unreachable has no task at all (it is
parked in storage instead). Queuing a job more than once is safe: a worker runs a job
only while it holds the job's lease and finds it not yet started (`workers.execution`),
so a job ends once whichever of its tasks comes first.
"""

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError

from services.jobs.records import JobRecord, JobStatus
from services.jobs.runner import QueueUnavailable
from services.jobs.store import JobStore
from storage import StorageError
from storage.integrity import RecordTampered

logger = logging.getLogger(__name__)

Submit = Callable[[JobRecord], None]  # queues a saved job; QueueUnavailable if it cannot


def queue_or_park(store: JobStore, submit: Submit, record: JobRecord) -> bool:
    """Save and queue a new job whose object is made whatever the queue does (a verify
    job of an object just stored), or park it in storage if the queue or its Redis
    refuses it, for `queue_parked` to queue once they are back; whether it was queued."""
    try:
        store.create(record)
        submit(record)
    except (RedisError, QueueUnavailable) as error:
        logger.warning("parking job %s: the queue refused it: %s", record.id, error)
    else:
        return True
    try:
        store.park(record)
    except StorageError:
        logger.exception("job %s could be neither queued nor parked", record.id)
    return False


def requeue_waiting(store: JobStore, requeue_after: timedelta, submit: Submit) -> list[str]:
    """Queue again every job queued (or queued again) longer than `requeue_after` ago; the
    ids of those queued."""
    now = datetime.now(UTC)
    requeued = []
    for job_id in store.queued_before(now - requeue_after):
        record = _queued(store, job_id)
        if record is None:
            continue
        try:
            submit(record)
        except QueueUnavailable as error:
            logger.warning("cannot queue jobs again now: %s", error)
            break
        store.queued_again(job_id, now)
        requeued.append(job_id)
    return requeued


def queue_parked(store: JobStore, submit: Submit) -> list[str]:
    """Save and queue the jobs parked in storage while the queue was unreachable; the ids
    of those queued. One whose record is already live is queued only if still queued."""
    queued = []
    for parked in store.parked():
        live = _live(store, parked.id)
        if live is None:
            store.save(parked)
            live = parked
        if live.status is JobStatus.QUEUED:
            try:
                submit(live)
            except QueueUnavailable as error:
                logger.warning("cannot queue parked jobs now: %s", error)
                break
            store.queued_again(live.id, datetime.now(UTC))
            queued.append(live.id)
        store.unpark(parked.id)
    return queued


def _queued(store: JobStore, job_id: str) -> JobRecord | None:
    record = _live(store, job_id)
    return record if record is not None and record.status is JobStatus.QUEUED else None


def _live(store: JobStore, job_id: str) -> JobRecord | None:
    try:
        return store.load(job_id)
    except RecordTampered:
        return None  # counted as refused; never run
