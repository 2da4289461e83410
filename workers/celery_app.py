"""The Celery application: a Redis broker, and tasks that survive a worker killed mid-task.

Run a worker with `celery -A workers.celery_app worker` and the periodic sweeps with
`celery -A workers.celery_app beat` (on two hosts if you like: one schedules, the other
stands by, `workers.beat`); both read the same `SEALSTREAM_*` settings as the API.

Delivery: a task is acknowledged only when it ends (`task_acks_late`), and put back when
its worker process dies (`task_reject_on_worker_lost`); a worker takes one task at a
time (prefetch 1); and Redis hands an unacknowledged task to another worker after the
visibility timeout, which must exceed the longest job. Job bodies are idempotent, so a
redelivered job is finished, not duplicated; one whose process died during two runs is
failed rather than run a third time (`workers.execution`). Each pool process is held to
a memory limit (`workers.memory_limit`), so a job that would need more fails alone.
"""

import os
from datetime import timedelta
from functools import cache, partial
from typing import Any

from celery import Celery, Task
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from celery.worker import WorkController
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from sealstream.memory import keep_freed_buffers
from sealstream.settings import Settings
from sealstream.wiring import Parts, build_parts, redis_replicas
from services.jobs import JobRecord, JobStore, QueueUnavailable, Submit, TaskNotReplicated
from services.replicas import NotReplicated, Replicas
from workers.execution import AUDIT_RETRY_AFTER, JobOutcome, run_job
from workers.lifecycle import run_sweeps
from workers.memory_limit import limit_address_space, memory_limit
from workers.registry import JOB_BODIES

RUN_JOB = "sealstream.run_job"
SWEEPS = "sealstream.sweeps"


def make_celery(settings: Settings) -> Celery:
    app = Celery("sealstream", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.job_visibility_timeout,
            # Look for a dead worker's unacknowledged tasks every 10 s rather than every
            # 100 s (kombu's default throttles the scan to every tenth 10-s tick).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # Used by the sentinel:// transport only: the primary the sentinels name.
            "master_name": settings.redis_sentinel_master,
        },
        broker_connection_retry_on_startup=True,
        # A Redis that refuses writes (NOREPLICAS: its replica is away or still syncing,
        # under min-replicas-to-write) answers with an error, not a lost connection:
        # retried too, with the same backoff, and for as long as it lasts.
        broker_channel_error_retry=True,
        broker_connection_max_retries=None,
        worker_consumer="workers.consumer:PatientConsumer",
        # A job running when the broker goes away runs on: its lease and record, not its
        # task, say who runs it, and a redelivered task finds it finished.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        beat_scheduler="workers.beat:LockedScheduler",
        beat_schedule={
            "sweeps": {"task": SWEEPS, "schedule": settings.lifecycle_interval},
        },
    )
    return app


def queue_job(
    app: Celery, store: JobStore, lifetime: timedelta, replicas: Replicas, record: JobRecord
) -> None:
    """Send a saved job's task, carrying the record as `store` seals it for a task, valid
    for `lifetime`, confirmed by `replicas`; `QueueUnavailable` if the broker cannot take
    it, `TaskNotReplicated` if its replicas do not confirm it in time."""
    carried = store.sealed(record, lifetime)
    try:
        with app.producer_or_acquire() as producer:
            kwargs = {"record": carried}
            app.send_task(RUN_JOB, args=[record.id], kwargs=kwargs, producer=producer)
            # Through the producer's channel, which it holds alone meanwhile: its pool's
            # connections reach the primary that took the task.
            with producer.channel.conn_or_acquire() as client:
                replicas.confirm(client)
    except NotReplicated as error:
        raise TaskNotReplicated(str(error)) from error
    except (OperationalError, RedisError) as error:  # its words name the broker's host
        raise QueueUnavailable(str(error)) from error


app = make_celery(Settings())


# Worked out once in the worker's main process, which knows how many pool processes it
# starts; they are forked from it, and each applies it to itself.
_pool_memory_limit: int | None = None


@worker_init.connect
def _start_worker(sender: WorkController, **_: object) -> None:
    global _pool_memory_limit
    keep_freed_buffers()
    concurrency = getattr(sender, "concurrency", None)  # untyped; "auto" until resolved
    processes = concurrency if isinstance(concurrency, int) else os.cpu_count() or 1
    _pool_memory_limit = memory_limit(Settings(), processes)


@worker_process_init.connect
def _start_pool_process(**_: object) -> None:
    keep_freed_buffers()
    if _pool_memory_limit is not None:
        limit_address_space(_pool_memory_limit)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop_pool_process(**_: object) -> None:
    """Add the key uses the process counted to the shared count, and close its audit
    chain, if it opened one (a clean end, not a crash): a prefork pool process's as it
    exits, or a solo or threaded worker's."""
    if worker_services.cache_info().currsize:
        worker_services().keys.close()  # adds the key uses it counted to the shared count
        worker_services().audit.close()


@cache
def worker_services() -> Parts:
    """Built once per worker process, on its first task (after the pool has forked)."""
    return build_parts(Settings(), role="worker")


@app.task(name=RUN_JOB, bind=True, max_retries=None)
def run_job_task(
    self: Task[[str, str | None], None], job_id: str, record: str | None = None
) -> None:
    """Run the job; `record`, its record as the API sealed it, is put back if Redis lost
    the live one (tasks queued before records were carried have none)."""
    services = worker_services()
    submit = _submit(services)
    outcome = run_job(job_id, services, JOB_BODIES, record, submit)
    if outcome is JobOutcome.BUSY:
        # Another worker is running it: come back once its lease could have lapsed.
        raise self.retry(countdown=services.settings.job_lease_ttl)
    if outcome is JobOutcome.UNAUDITED:
        raise self.retry(countdown=AUDIT_RETRY_AFTER)


@app.task(name=SWEEPS)
def sweeps_task() -> dict[str, Any]:
    services = worker_services()
    return run_sweeps(services, _submit(services))


def _submit(services: Parts) -> Submit:
    """How this worker queues jobs: as the API does."""
    lifetime = timedelta(seconds=services.settings.job_task_copy_ttl)
    return partial(queue_job, app, services.jobs, lifetime, redis_replicas(services.settings))
