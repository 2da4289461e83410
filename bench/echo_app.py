"""The bench's server: the service's own app plus four bench-only routes.

All four take the same form as `POST /api/crypto/stream/encrypt` (a `metadata` JSON part,
then `file`), with the same token check and the same multipart reader
(`api.multipart.UploadForm`); the first three answer with the same response
(`api.duplex.DuplexStreamingResponse`):

- `POST /bench/echo` streams the file part back unchanged: the transport ceiling the
  encrypt route is measured against, so only the crypto differs.
- `POST /bench/hold-echo` streams it back a frame at a time, with no crypto: each chunk is
  copied as it arrives into a reused buffer of a default frame's length, which is sent
  once full. A stream-back of this format must hold each frame until it is full when the
  file's length is not known (a chunked upload), since only then is it known not to be
  the final one, whose layout differs; this shows what that hold alone costs the echo on
  this machine.
- `POST /bench/aes-echo` streams each chunk back as it comes through AES-256-GCM alone,
  into a reused buffer under one context. No header, sequence numbers or tags, so its
  output is no message anyone could open. It shows what the work every encrypting
  stream-back must do costs the echo when nothing is held (the file's length known):
  AES-GCM over every byte, into a buffer of its own.
- `POST /bench/drain` reads the file part to its end and answers how many bytes it had:
  the HTTP intake alone, the most any upload into storage can go through this server.

Run as `python -m bench.echo_app`: configuration comes from the `SEALSTREAM_*` environment,
and uvicorn runs one worker on uvloop with the service's HTTP protocol (`api.serving`),
with the allocator tuned, as `sealstream serve` runs. `python -m bench.echo_app granian`
(or `hypercorn`) serves the same app with that ASGI server instead, one worker on uvloop,
for bench/asgi_servers.py; neither is a dependency of the service, and neither has the
connection guards of `api.serving`.
The routes live here, never in the service.
"""

import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from api.auth import BEARER, authenticated, require
from api.duplex import DuplexStreamingResponse
from api.multipart import UploadForm
from api.services import services
from api.serving import server_options
from envelope import DEFAULT_FRAME_LENGTH
from sealstream.memory import keep_freed_buffers
from sealstream.server import create_app
from sealstream.settings import Settings

ECHO_PATH = "/bench/echo"
HOLD_ECHO_PATH = "/bench/hold-echo"
AES_ECHO_PATH = "/bench/aes-echo"
DRAIN_PATH = "/bench/drain"


async def held_in_frames(chunks: AsyncIterator[memoryview]) -> AsyncIterator[memoryview]:
    """The chunks copied into a frame-sized buffer, sent when full (and the rest at the
    end). The buffer is reused: uvicorn copies a chunked body's pieces before `send`
    returns, as `Encryptor.recycle` relies on too."""
    frame = memoryview(bytearray(DEFAULT_FRAME_LENGTH))
    filled = 0
    async for chunk in chunks:
        while chunk:
            take = min(len(chunk), DEFAULT_FRAME_LENGTH - filled)
            frame[filled : filled + take] = chunk[:take]
            filled += take
            chunk = chunk[take:]
            if filled == DEFAULT_FRAME_LENGTH:
                yield frame
                filled = 0
    if filled:
        yield frame[:filled]


async def aes_gcm_alone(chunks: AsyncIterator[memoryview]) -> AsyncIterator[memoryview]:
    """Each chunk encrypted under one AES-GCM context into a reused buffer, and sent."""
    context = Cipher(algorithms.AES(os.urandom(32)), modes.GCM(os.urandom(12))).encryptor()
    buffer = bytearray()
    async for chunk in chunks:
        if len(buffer) < len(chunk):
            buffer = bytearray(len(chunk))
        out = memoryview(buffer)[: len(chunk)]
        context.update_into(chunk, out)
        yield out


def create_bench_app(settings: Settings) -> FastAPI:
    """`create_app(settings)` plus the bench's routes: `POST /bench/echo`,
    `/bench/hold-echo`, `/bench/aes-echo` and `/bench/drain`."""
    app = create_app(settings)
    authorize = require("crypto:encrypt")

    async def form_up_to_file(request: Request) -> UploadForm:
        """The request authorized, and its form read up to the file part's data."""
        await authorize(request, await authenticated(request, await BEARER(request)))
        form = UploadForm(request, services(request).settings)
        await form.metadata()
        await form.start_file()
        return form

    def response(request: Request, body: AsyncIterator[memoryview]) -> Response:
        return DuplexStreamingResponse(
            body,
            idle_timeout=services(request).settings.idle_timeout,
            media_type="application/octet-stream",
        )

    @app.post(ECHO_PATH, response_model=None, include_in_schema=False)
    async def echo(request: Request) -> Response:
        form = await form_up_to_file(request)
        return response(request, form.file_chunks())

    @app.post(HOLD_ECHO_PATH, response_model=None, include_in_schema=False)
    async def hold_echo(request: Request) -> Response:
        form = await form_up_to_file(request)
        return response(request, held_in_frames(form.file_chunks()))

    @app.post(AES_ECHO_PATH, response_model=None, include_in_schema=False)
    async def aes_echo(request: Request) -> Response:
        form = await form_up_to_file(request)
        return response(request, aes_gcm_alone(form.file_chunks()))

    @app.post(DRAIN_PATH, response_model=None, include_in_schema=False)
    async def drain(request: Request) -> Response:
        form = await form_up_to_file(request)
        size = 0
        async for chunk in form.file_chunks():
            size += len(chunk)
        return JSONResponse({"size": size})

    return app


def app_from_environment() -> FastAPI:
    """The bench app over the settings of the `SEALSTREAM_*` environment."""
    return create_bench_app(Settings())


def main() -> None:
    keep_freed_buffers()  # as `sealstream serve` does
    settings = Settings()
    server = sys.argv[1] if len(sys.argv) > 1 else "uvicorn"
    if server == "granian":
        from granian import Granian

        # Its enumerations take their values' strings.
        options: dict[str, Any] = {"interface": "asgi", "loop": "uvloop", "log_level": "warning"}
        Granian(
            "bench.echo_app:app_from_environment",
            factory=True,
            address=settings.host,
            port=settings.port,
            workers=1,
            **options,
        ).serve()
    elif server == "hypercorn":
        import asyncio

        import uvloop
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{settings.host}:{settings.port}"]
        config.loglevel = "WARNING"
        uvloop.install()
        app: Any = create_bench_app(settings)  # an ASGI app, as hypercorn's types do not say
        asyncio.run(serve(app, config))
    else:
        import uvicorn

        uvicorn.run(
            create_bench_app(settings),
            loop="uvloop",
            log_level="warning",
            **server_options(settings),
        )


if __name__ == "__main__":
    main()
