"""The FastAPI application factory."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields

from anyio import CapacityLimiter
from fastapi import FastAPI

from api import docs, openapi, problems
from api.admission import StreamLimit
from api.keygen import KeyWork
from api.metrics import Metrics, MetricsMiddleware
from api.routes import admin, crypto, health, jobs, keys
from api.services import Services
from api.tokens import TokenStore
from sealstream.settings import Settings
from sealstream.wiring import ConfigurationError
from workers.runner import open_runner
from workers.services import build_worker_services


def build_services(settings: Settings) -> Services:
    if settings.admin_token is None:
        raise ConfigurationError("set SEALSTREAM_ADMIN_TOKEN (`sealstream serve` generates one)")
    core = build_worker_services(settings)
    return Services(
        **{field.name: getattr(core, field.name) for field in fields(core)},
        tokens=TokenStore(
            core.records,
            settings.admin_token.get_secret_value(),
            cache_ttl=settings.key_cache_ttl,
        ),
        runner=open_runner(core),
        transfers=CapacityLimiter(settings.transfer_threads),
        key_work=KeyWork(settings.keygen_threads, settings.keygen_rate),
    )


def create_app(settings: Settings) -> FastAPI:
    """The API over the parts `settings` describes."""
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        services.runner.close()

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
    app.state.metrics = Metrics()
    app.state.metrics.watch_jobs(services.jobs)
    app.state.metrics.watch_records()
    # Added first, so it runs inside the metrics: refused streams are counted too
    # (as route "unmatched": routing never ran for them).
    app.add_middleware(StreamLimit, limit=settings.max_streams)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    problems.install(app)
    openapi.install(app)
    for module in (health, keys, crypto, jobs, admin):
        app.include_router(module.router)
    docs.install(app, settings.api_docs)
    return app
