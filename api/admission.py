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
makes (`api.routes.uploads`). A stream never counts as more than the cap, so that one can
always run alone.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import Problem

STREAM_ROUTES = "/api/crypto/stream/"
ARCHIVE_ROUTE = "/api/crypto/stream/encrypt-archive"
RETRY_AFTER_SECONDS = 1


class Streams:
    """The streams a process serves, each counted by its weight, at most `limit` in all;
    a weight of 1 is `unit` bytes of memory. Taken and given back from the event loop and
    from worker threads, under a lock."""

    def __init__(self, limit: int, unit: int) -> None:
        self.limit = limit
        self.unit = unit
        self.active = 0
        self._lock = threading.Lock()

    def weight(self, memory: int) -> int:
        """The streams a request holding up to `memory` bytes counts as."""
        return max(1, -(-memory // self.unit))

    def take(self, weight: int) -> int:
        """Count a stream of `weight` in (at most the limit); the weight to `give_back`.
        A 503 too-many-streams problem past the limit."""
        weight = min(weight, self.limit)
        with self._lock:
            if self.active + weight > self.limit:
                raise Problem(
                    503,
                    "too-many-streams",
                    f"the server is serving as many streams as it may ({self.limit}); "
                    "try again shortly",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.active += weight
        return weight

    def give_back(self, weight: int) -> None:
        with self._lock:
            self.active -= weight

    @contextmanager
    def holding(self) -> Iterator["Holding"]:
        """What a request takes while it runs (once it knows how much), given back when
        it ends, however it ends."""
        holding = Holding(self)
        try:
            yield holding
        finally:
            self.give_back(holding.weight)


class Holding:
    """The streams one request counts as: none until it `take`s them."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.weight = 0

    def take(self, memory: int) -> None:
        """Count the request as the streams that `memory` bytes make (503 past the cap)."""
        self.weight += self.streams.take(self.streams.weight(memory))


class StreamLimit:
    """ASGI middleware: the requests under `STREAM_ROUTES` counted in `streams`; a request
    leaves them when its response has ended or failed."""

    def __init__(self, app: ASGIApp, streams: Streams, archive_weight: int = 1) -> None:
        self.app = app
        self.streams = streams
        self.archive_weight = archive_weight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(STREAM_ROUTES):
            await self.app(scope, receive, send)
            return
        weight = self.archive_weight if scope["path"].startswith(ARCHIVE_ROUTE) else 1
        try:
            weight = self.streams.take(weight)
        except Problem as busy:
            await busy.response(scope["path"])(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams.give_back(weight)
