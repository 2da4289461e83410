"""The long-lived parts a running API holds, built once at startup and shared by requests:
the service's parts, plus tokens, the job runner and the API's own thread pools; and
starting a job through them."""

import logging
from dataclasses import dataclass

from anyio import CapacityLimiter
from fastapi import Request
from redis.exceptions import RedisError

from api.keygen import KeyWork
from api.problems import Problem
from api.tokens import TokenStore
from sealstream.wiring import Parts
from services.jobs import AnyParams, JobKind, JobRecord, JobRunner, QueueUnavailable, VerifyParams
from services.placement import Placement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services(Parts):
    tokens: TokenStore
    runner: JobRunner
    # The worker threads of streams into and out of storage, apart from the default pool:
    # a stream can hold its thread for as long as the store makes it wait.
    transfers: CapacityLimiter
    # RSA generation and import, apart from the default pool, rate-limited per tenant.
    key_work: KeyWork

    def start_job(self, kind: JobKind, tenant: str, params: AnyParams) -> JobRecord:
        """Save a new job record and hand the job to the runner; 503 if either cannot be
        reached."""
        record = JobRecord.new(kind, tenant, params)
        try:
            self.jobs.save(record)
            self.runner.submit(record)
        except (RedisError, QueueUnavailable) as error:
            logger.warning("answering 503 job-queue-unavailable: %s", error)  # names its host
            raise Problem(503, "job-queue-unavailable", "the job queue is not reachable") from None
        return record

    def start_verify(self, tenant: str, placement: Placement) -> JobRecord:
        """Start verifying the object stored at `placement`."""
        params = VerifyParams(
            bucket=placement.bucket, key=placement.key, storage_key=placement.storage_key
        )
        return self.start_job(JobKind.VERIFY, tenant, params)


def services(request: Request) -> Services:
    """The services of the app serving `request`."""
    found: Services = request.app.state.services
    return found
