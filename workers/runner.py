"""Handing jobs to whoever runs them: Celery workers over Redis, or, for the embedded
default with no Redis, a small thread pool in the API process running the same code."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sealstream.settings import Settings
from sealstream.wiring import Parts, redis_replicas
from services.jobs import JobRecord, JobRunner, JobStore
from workers.celery_app import make_celery, queue_job
from workers.execution import AUDIT_RETRY_AFTER, JobOutcome, run_job
from workers.lifecycle import run_sweeps
from workers.registry import JOB_BODIES

logger = logging.getLogger(__name__)


class CeleryRunner(JobRunner):
    """Sends each job to the Celery workers, by task name, with its record as `store`
    seals it, confirmed by the Redis replicas the settings ask for."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self._app = make_celery(settings)
        self._store = store
        self._lifetime = timedelta(seconds=settings.job_task_copy_ttl)
        self._replicas = redis_replicas(settings)

    def submit(self, record: JobRecord) -> None:
        queue_job(self._app, self._store, self._lifetime, self._replicas, record)

    def close(self) -> None:
        self._app.close()


class InProcessRunner(JobRunner):
    """Jobs on two threads of this process; the periodic sweeps on a third."""

    def __init__(self, services: Parts) -> None:
        self._services = services
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sealstream-job")
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="sealstream-sweeps", daemon=True)
        self._sweeper.start()

    def submit(self, record: JobRecord) -> None:
        self._pool.submit(self._run, record.id)

    def close(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job_id: str) -> None:
        """Run the job, once the audit trail can be written."""
        while True:
            outcome = run_job(job_id, self._services, JOB_BODIES, submit=self.submit)
            if outcome is not JobOutcome.UNAUDITED or self._stopping.wait(AUDIT_RETRY_AFTER):
                return

    def _sweep(self) -> None:
        while not self._stopping.wait(self._services.settings.lifecycle_interval):
            try:
                run_sweeps(self._services, self.submit)
            except Exception:
                logger.exception("periodic sweeps failed; trying again next interval")
