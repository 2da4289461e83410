"""Costly key material work off the shared thread pool, with a per-tenant rate limit.

Generating an RSA key (to create or rotate one) or checking an imported one takes a good
part of a second of CPU. On anyio's default pool, which authentication and key lookups
share, a burst of them would take every thread and every core. Here such work runs on a
capacity of its own, `keygen_threads` at once (more wait their turn), and each tenant may
start at most `keygen_rate` of it (per process, over a moving window); past that it is
refused at once with `429 rate-limited` and a `Retry-After`. Cheap key types (AES,
ML-KEM) take the default pool and are not counted.
"""

import math
import time
from collections.abc import Callable
from typing import TypeVar

from anyio import CapacityLimiter, to_thread
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from api.problems import Problem
from keystore import costly_material

T = TypeVar("T")


class KeyWork:
    """Where a tenant's key material work runs, and whether it may start now."""

    def __init__(self, threads: int, rate: str) -> None:
        self.threads = CapacityLimiter(threads)
        self.rate = parse(rate)
        self._window = MovingWindowRateLimiter(MemoryStorage())

    async def run(self, tenant: str, kty: str, work: Callable[[], T]) -> T:
        """`work()` on a thread: its own capacity and the tenant's rate if material of
        type `kty` is costly, else the default pool."""
        if not costly_material(kty):
            return await to_thread.run_sync(work)
        self._admit(tenant)
        return await to_thread.run_sync(work, limiter=self.threads)

    def _admit(self, tenant: str) -> None:
        if self._window.hit(self.rate, tenant):
            return
        reset = self._window.get_window_stats(self.rate, tenant).reset_time
        wait = max(1, math.ceil(reset - time.time()))
        raise Problem(
            429,
            "rate-limited",
            f"this tenant has generated or imported as many RSA keys as it may ({self.rate}); "
            f"try again in {wait} seconds",
            headers={"Retry-After": str(wait)},
        )
