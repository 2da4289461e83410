"""A streaming response that may run while the request body is still being read.

Starlette's `StreamingResponse` listens for disconnects by calling `receive()` (ASGI spec
2.3 and later), which steals request-body chunks from an endpoint still reading them: a
1 GiB upload came back as a valid 255 KB message. This response never calls `receive()`.

A body that fails after the headers went out is aborted, not finished: the response
returns without its final message, so the server (uvicorn: "ASGI callable returned
without completing response") drops the connection without the terminating chunk, and
the client sees a broken transfer instead of a short file that looks complete. Returning
rather than raising keeps an expected event (a tampered frame, a client gone) to one
log line instead of a traceback.

A client that stops reading is aborted the same way once a send has waited `idle_timeout`
seconds: uvicorn's send waits for the client with no limit of its own, and meanwhile the
request holds its upload or storage read open. That includes a client that sends its
whole body before reading anything: it and the server would otherwise wait for each
other for ever.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.idle import IdleGuard

logger = logging.getLogger(__name__)


class DuplexStreamingResponse(Response):
    def __init__(
        self,
        content: AsyncIterator[bytes | bytearray | memoryview],
        *,
        idle_timeout: float,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.body_iterator = content
        self.idle_timeout = idle_timeout
        self.status_code = status_code
        self.media_type = media_type
        self.background = background
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        guard = IdleGuard(self.idle_timeout)
        try:
            async for chunk in self.body_iterator:
                if not await self._sent(guard, send, chunk, more=True):
                    return
            if not await self._sent(guard, send, b"", more=False):
                return
        except Exception as exc:
            logger.warning("aborting a streamed response: %s: %s", type(exc).__name__, exc)
            return
        finally:
            guard.close()
        if self.background is not None:
            await self.background()

    async def _sent(
        self, guard: IdleGuard, send: Send, body: bytes | bytearray | memoryview, *, more: bool
    ) -> bool:
        """Send a piece of the body; False if the client read none of it in time."""
        try:
            await guard.wait(send({"type": "http.response.body", "body": body, "more_body": more}))
        except TimeoutError:
            logger.warning(
                "aborting a streamed response: the client read nothing for %g seconds",
                self.idle_timeout,
            )
            return False
        return True


class ProducedStreamingResponse(DuplexStreamingResponse):
    """A duplex response whose body `produce` writes into a bounded stream while the
    response runs, in a task of its own: a producer that gets ahead of the client waits.

    Once the response has ended, sent or aborted, the stream is closed, so the producer's
    next send fails (`anyio.BrokenResourceError`); the response waits for the producer
    to finish, so that nothing it started outlives the request.
    """

    def __init__(
        self,
        produce: Callable[[MemoryObjectSendStream[bytes]], Awaitable[None]],
        *,
        buffered: int,
        idle_timeout: float,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        self._produce = produce
        self._sender, receiver = anyio.create_memory_object_stream[bytes](buffered)
        self._receiver = receiver
        super().__init__(
            receiver,
            idle_timeout=idle_timeout,
            status_code=status_code,
            headers=headers,
            media_type=media_type,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._run_producer)
            with self._receiver:
                await super().__call__(scope, receive, send)

    async def _run_producer(self) -> None:
        with self._sender:
            await self._produce(self._sender)
