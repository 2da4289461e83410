"""The bench's server: the service's own app plus one bench-only route, `POST /bench/echo`.

`/bench/echo` takes the same form as `POST /api/crypto/stream/encrypt` (a `metadata` JSON
part, then `file`), with the same token check, the same multipart reader
(`api.multipart.UploadForm`) and the same response (`api.duplex.DuplexStreamingResponse`),
and streams the file part back unchanged: the transport ceiling the encrypt route is
measured against, so only the crypto differs.

Run as `python -m bench.echo_app`: configuration comes from the `SEALSTREAM_*` environment,
and uvicorn runs one worker with httptools and uvloop, with the allocator tuned, as
`sealstream serve` runs.
The route lives here, never in the service.
"""

from fastapi import FastAPI, Request
from fastapi.responses import Response

from api import create_app
from api.auth import require
from api.duplex import DuplexStreamingResponse
from api.multipart import UploadForm
from api.services import services
from sealstream.memory import keep_freed_buffers
from sealstream.settings import Settings

ECHO_PATH = "/bench/echo"


def create_bench_app(settings: Settings) -> FastAPI:
    """`create_app(settings)` plus `POST /bench/echo`."""
    app = create_app(settings)
    authorize = require("crypto:encrypt")

    @app.post(ECHO_PATH, response_model=None, include_in_schema=False)
    async def echo(request: Request) -> Response:
        await authorize(request)
        settings = services(request).settings
        form = UploadForm(request, settings)
        await form.metadata()
        await form.start_file()
        return DuplexStreamingResponse(
            form.file_chunks(),
            idle_timeout=settings.idle_timeout,
            media_type="application/octet-stream",
        )

    return app


def main() -> None:
    import uvicorn

    keep_freed_buffers()  # as `sealstream serve` does
    settings = Settings()
    uvicorn.run(
        create_bench_app(settings),
        host=settings.host,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        workers=1,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
