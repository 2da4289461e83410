"""The FastAPI application over a running API's services: its routes, middleware, error
answers and documentation. The services themselves are built by `sealstream.server`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from api import docs, openapi, problems
from api.admission import StreamLimit
from api.audit import AuditMiddleware
from api.metrics import Metrics, MetricsMiddleware
from api.routes import (
    admin,
    archives,
    audit,
    crypto,
    health,
    jobs,
    keys,
    name_keys,
    objects,
    signatures,
    uploads,
)
from api.services import Services


def make_app(services: Services, metrics_dir: Path | None = None) -> FastAPI:
    """The API over `services`; their job runner stops when the app does, and then their
    audit chain is closed. `metrics_dir`: where the server's processes share their
    metrics, when there are several."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        services.runner.close()
        services.keys.close()  # adds the uses it counted to the shared count
        services.audit.close()

    # The documentation routes are api.docs's: served from the package, and as the
    # settings allow.
    app = FastAPI(
        title="sealstream",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    app.state.metrics = Metrics(metrics_dir)
    app.state.metrics.watch_jobs(services.jobs)
    # Added first, so it runs inside the metrics: refused streams are counted too
    # (as route "unmatched": routing never ran for them).
    app.add_middleware(
        StreamLimit,
        streams=services.streams,
        archive_weight=services.settings.batch_concurrency,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(AuditMiddleware, trail=services.audit)
    problems.install(app)
    openapi.install(app)
    for module in (
        health,
        keys,
        crypto,
        uploads,
        archives,
        signatures,
        objects,
        jobs,
        admin,
        name_keys,
        audit,
    ):
        app.include_router(module.router)
    docs.install(app, services.settings.api_docs)
    return app
