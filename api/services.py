"""The long-lived parts a running API holds, built once at startup and shared by requests:
everything a job needs (the API runs jobs itself when there is no Redis), plus tokens and
the job runner."""

from dataclasses import dataclass

from anyio import CapacityLimiter
from fastapi import Request

from api.keygen import KeyWork
from api.tokens import TokenStore
from workers.runner import JobRunner
from workers.services import WorkerServices


@dataclass(frozen=True)
class Services(WorkerServices):
    tokens: TokenStore
    runner: JobRunner
    # The worker threads of streams into and out of storage, apart from the default pool:
    # a stream can hold its thread for as long as the store makes it wait.
    transfers: CapacityLimiter
    # RSA generation and import, apart from the default pool, rate-limited per tenant.
    key_work: KeyWork


def services(request: Request) -> Services:
    """The services of the app serving `request`."""
    found: Services = request.app.state.services
    return found
