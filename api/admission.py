"""A cap on the streams one process serves at once (`SEALSTREAM_MAX_STREAMS`).

Every stream holds memory for as long as it runs: a few MiB streamed back, and most of
all an upload into S3, about (parts in flight + 1) × the part size. The cap bounds their
sum. A stream past it is answered at once with `503 too-many-streams` and a
`Retry-After`, before its body is read (curl, which waits for `100-continue`, need not
send it). Other routes are not counted, so keys, jobs and health still answer at the cap.

An archive streamed in uploads up to `SEALSTREAM_BATCH_CONCURRENCY` members at once, each
with an upload of its own, so it counts as that many streams (at most the cap, so that
one can always run alone).
"""

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import Problem

STREAM_ROUTES = "/api/crypto/stream/"
ARCHIVE_ROUTE = "/api/crypto/stream/encrypt-archive"
RETRY_AFTER_SECONDS = 1


class StreamLimit:
    """ASGI middleware: at most `limit` requests under `STREAM_ROUTES` at once.

    The count is only touched on the app's event loop, which runs every ASGI call, so it
    needs no lock; a request leaves it when its response has ended or failed.
    """

    def __init__(self, app: ASGIApp, limit: int, archive_weight: int = 1) -> None:
        self.app = app
        self.limit = limit
        self.archive_weight = min(archive_weight, limit)
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(STREAM_ROUTES):
            await self.app(scope, receive, send)
            return
        weight = self.archive_weight if scope["path"].startswith(ARCHIVE_ROUTE) else 1
        if self.active + weight > self.limit:
            busy = Problem(
                503,
                "too-many-streams",
                f"the server is serving as many streams as it may ({self.limit}); "
                "try again shortly",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
            await busy.response(scope["path"])(scope, receive, send)
            return
        self.active += weight
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= weight
