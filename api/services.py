"""The long-lived parts a running API holds, built once at startup and shared by requests:
the service's parts, plus tokens, the job runner and the API's own thread pools; and
starting a job through them."""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from anyio import CapacityLimiter
from fastapi import Request
from redis.exceptions import RedisError

from api.admission import Streams
from api.keygen import KeyWork
from api.problems import Problem, not_replicated
from api.tokens import TokenStore
from sealstream.wiring import Parts
from services.jobs import (
    AnyParams,
    JobKind,
    JobRecord,
    JobRunner,
    JobStatus,
    QueueUnavailable,
    TaskNotReplicated,
    VerifyParams,
    queue_or_park,
)
from services.placement import Placement
from services.replicas import NotReplicated
from storage import StorageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services(Parts):
    tokens: TokenStore
    runner: JobRunner
    # The worker threads of streams into and out of storage, apart from the default pool:
    # a stream can hold its thread for as long as the store makes it wait.
    transfers: CapacityLimiter
    # The streams served at once, by the memory each holds (`SEALSTREAM_MAX_STREAMS`).
    streams: Streams
    # RSA generation and import, apart from the default pool, rate-limited per tenant.
    key_work: KeyWork

    def start_job(self, kind: JobKind, tenant: str, params: AnyParams) -> JobRecord:
        """Save a new job record and hand the job to the runner, each confirmed by the
        Redis replicas the settings ask for; 503 if either cannot be reached or is not
        confirmed in time, and then the job never runs."""
        record = JobRecord.new(kind, tenant, params)
        try:
            self.jobs.create(record)
            self.runner.submit(record)
        except (NotReplicated, TaskNotReplicated) as error:
            logger.warning("answering 503 redis-not-replicated: %s", error)
            self._withdraw(record)
            raise not_replicated("the job was not started; start it again") from None
        except (RedisError, QueueUnavailable) as error:
            logger.warning("answering 503 job-queue-unavailable: %s", error)  # names its host
            self._withdraw(record)
            raise Problem(503, "job-queue-unavailable", "the job queue is not reachable") from None
        return record

    def _withdraw(self, record: JobRecord) -> None:
        """Fail a job its client is told was not started, so that it never runs: first
        in its final report in the bucket, which a failover cannot take back (a replica
        that had the queued record may be promoted, and a worker reads the report before
        running a job), then in Redis as far as it takes the write, so that a task of it
        already sent finds it finished and the sweep does not queue it again."""
        now = datetime.now(UTC)
        detail = "the job could not be queued, and its client was told it was not started"
        failed = record.model_copy(
            update={
                "status": JobStatus.FAILED,
                "finished_at": now,
                "updated_at": now,
                "error": {"code": "job-not-started", "detail": detail},
            }
        )
        try:
            self.jobs.write_report(failed)
        except StorageError as error:
            logger.warning("job %s: could not report it as not started: %s", record.id, error)
        try:
            self.jobs.save(failed)
        except RedisError as error:
            logger.warning("job %s: could not record it as not started: %s", record.id, error)

    def start_verify(self, tenant: str, placement: Placement) -> JobRecord:
        """Start verifying the object stored at `placement`."""
        return self.start_job(JobKind.VERIFY, tenant, VerifyParams.of(placement))

    def verify_stored(self, tenant: str, placement: Placement) -> tuple[JobRecord, bool]:
        """Start verifying an object just stored, and whether its job was queued. The
        object is stored whatever the queue does: a job that cannot be queued is parked
        in storage, and the sweep queues it once the queue is back."""
        record = JobRecord.new(JobKind.VERIFY, tenant, VerifyParams.of(placement))
        return record, queue_or_park(self.jobs, self.runner.submit, record)


def services(request: Request) -> Services:
    """The services of the app serving `request`."""
    found: Services = request.app.state.services
    return found
