"""A cap on the streams one process serves at once (`SEALSTREAM_MAX_STREAMS`).

Every stream holds memory for as long as it runs: a few MiB streamed back, and most of
all an upload into S3, about (parts in flight + 1) × the part size. The cap bounds their
sum, counting a stream by that upload's memory (`Streams.unit`). A stream past it is
answered at once with `503 too-many-streams` and a `Retry-After`, before its body is read
(curl, which waits for `100-continue`, need not send it). Other routes are not counted,
so keys, jobs and health still answer at the cap.

An archive streamed in uploads up to `SEALSTREAM_BATCH_CONCURRENCY` members at once, each
with an upload of its own, so it counts as that many streams. A resumable upload's PATCH
holds what its upload's part size makes it hold, counted as the streams that memory
makes (`api.routes.uploads`).

Each tenant may hold only its share of the cap (`SEALSTREAM_MAX_STREAMS_PER_TENANT`), so
that one tenant's slow streams, however many, leave the others streams to run: past it,
its next stream is answered `429 too-many-tenant-streams`. A stream is counted server-wide
as it arrives and against its tenant once its token is read (`Holding.claim`, from
`api.auth`), still before its body is.

A stream heavier than the cap or the share would never be admitted if counted in full,
so it counts as at most the whole cap against the cap and at most the whole share against
its tenant's, each apart. One heavier than the cap runs only while the process serves
nothing else (the memory held is then its own: the most one request can hold, a PATCH of
the largest part size, say); one heavier than the share only while the cap has room for
all of it, leaving the other tenants less than the rest of the cap meanwhile. Counting
only the share's worth against the cap would let two tenants' heavy streams hold twice
the memory the cap allows.

A share of half the cap, rounded up (the default), is the whole cap where a process's cap
is 1 (a share of none would admit nothing): there one tenant's stream keeps the others
waiting, as any stream would; with a cap of 2, each tenant has one.
"""

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import Problem

STREAM_ROUTES = "/api/crypto/stream/"
ARCHIVE_ROUTE = "/api/crypto/stream/encrypt-archive"
RETRY_AFTER_SECONDS = 1
HOLDING = "streams"  # the key of a stream's `Holding` in its request's state


class Streams:
    """The streams a process serves, each counted by its weight, at most `limit` in all
    and `tenant_limit` for any one tenant; a weight of 1 is `unit` bytes of memory. Taken
    and given back from the event loop and from worker threads, under a lock."""

    def __init__(self, limit: int, unit: int, tenant_limit: int | None = None) -> None:
        self.limit = limit
        self.tenant_limit = min(limit, tenant_limit or limit)
        self.unit = unit
        self.active = 0
        self.by_tenant: Counter[str] = Counter()
        self._lock = threading.Lock()

    def weight(self, memory: int) -> int:
        """The streams a request holding up to `memory` bytes counts as."""
        return max(1, -(-memory // self.unit))

    def take(self, weight: int, tenant: str | None = None, held: int = 0) -> None:
        """Count `weight` more for a request that counts as `held` already, against the
        cap and, if it is known, against `tenant`'s share: the request's whole weight
        counts as at most all of each. A 503 too-many-streams problem past the cap, else
        a 429 problem past the tenant's share."""
        more = self._of_cap(held + weight) - self._of_cap(held)
        share = self._of_share(held + weight) - self._of_share(held)
        with self._lock:
            if self.active + more > self.limit:
                raise Problem(
                    503,
                    "too-many-streams",
                    f"the server is serving as many streams as it may ({self.limit}); "
                    "try again shortly",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            if tenant is not None:
                self._within_share(tenant, share)
                self.by_tenant[tenant] += share
            self.active += more

    def charge(self, tenant: str, weight: int) -> None:
        """Count a request of `weight`, taken already, against `tenant`'s share (429 past
        it)."""
        with self._lock:
            self._within_share(tenant, self._of_share(weight))
            self.by_tenant[tenant] += self._of_share(weight)

    def give_back(self, weight: int, tenant: str | None = None) -> None:
        """Leave what a request of `weight` counted, against `tenant`'s share too if it
        was charged to it."""
        with self._lock:
            self.active -= self._of_cap(weight)
            if tenant is not None:
                self.by_tenant[tenant] -= self._of_share(weight)
                if not self.by_tenant[tenant]:
                    del self.by_tenant[tenant]

    def _of_cap(self, weight: int) -> int:
        return min(weight, self.limit)

    def _of_share(self, weight: int) -> int:
        return min(weight, self.tenant_limit)

    def _within_share(self, tenant: str, weight: int) -> None:
        if self.by_tenant[tenant] + weight > self.tenant_limit:
            raise Problem(
                429,
                "too-many-tenant-streams",
                f"the tenant holds as many streams as one tenant may ({self.tenant_limit}); "
                "try again once one of its streams has ended",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    @contextmanager
    def holding(self, tenant: str | None = None) -> Iterator["Holding"]:
        """What a request takes while it runs (once it knows how much), counted against
        `tenant` (once known), given back when it ends, however it ends."""
        holding = Holding(self, tenant)
        try:
            yield holding
        finally:
            self.give_back(holding.weight, holding.tenant)


class Holding:
    """The streams one request counts as: none until it `take`s them."""

    def __init__(self, streams: Streams, tenant: str | None) -> None:
        self.streams = streams
        self.tenant = tenant
        self.weight = 0

    def take(self, memory: int) -> None:
        """Count the request as the streams that `memory` bytes make (429 past its
        tenant's share, 503 past the cap)."""
        self.count(self.streams.weight(memory))

    def count(self, weight: int) -> None:
        """Count the request as `weight` streams more."""
        self.streams.take(weight, self.tenant, held=self.weight)
        self.weight += weight

    def claim(self, tenant: str) -> None:
        """Count what the request holds against `tenant`, whose token it carries (429
        past its share); once only."""
        if self.tenant is None:
            self.streams.charge(tenant, self.weight)
            self.tenant = tenant


class StreamLimit:
    """ASGI middleware: the requests under `STREAM_ROUTES` counted in `streams`, their
    `Holding` left in the request's state for `claim`; a request leaves them when its
    response has ended or failed."""

    def __init__(self, app: ASGIApp, streams: Streams, archive_weight: int = 1) -> None:
        self.app = app
        self.streams = streams
        self.archive_weight = archive_weight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(STREAM_ROUTES):
            await self.app(scope, receive, send)
            return
        weight = self.archive_weight if scope["path"].startswith(ARCHIVE_ROUTE) else 1
        with self.streams.holding() as held:
            try:
                held.count(weight)
            except Problem as busy:
                await busy.response(scope["path"])(scope, receive, send)
                return
            scope.setdefault("state", {})[HOLDING] = held
            await self.app(scope, receive, send)


def claim_streams(scope: Scope, tenant: str) -> None:
    """Count the streams a request under `STREAM_ROUTES` holds against `tenant`, whose
    token it carries (429 past its share); nothing for another route."""
    held = scope.get("state", {}).get(HOLDING)
    if held is not None:
        held.claim(tenant)
