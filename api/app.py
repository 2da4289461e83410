"""The FastAPI application factory."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import problems
from api.routes import admin, health, keys
from api.services import Services
from api.tokens import TokenStore
from sealstream.settings import Settings
from sealstream.wiring import ConfigurationError, open_keystore, open_object_store


def build_services(settings: Settings) -> Services:
    if settings.admin_token is None:
        raise ConfigurationError("set SEALSTREAM_ADMIN_TOKEN (`sealstream serve` generates one)")
    objects = open_object_store(settings)
    return Services(
        settings=settings,
        objects=objects,
        keys=open_keystore(settings, objects),
        tokens=TokenStore(
            objects,
            settings.admin_token.get_secret_value(),
            cache_ttl=settings.key_cache_ttl,
        ),
    )


def create_app(settings: Settings) -> FastAPI:
    """The API over the parts `settings` describes."""
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        services.keys.close()

    app = FastAPI(title="sealstream", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    problems.install(app)
    for module in (health, keys, admin):
        app.include_router(module.router)
    return app
