"""The API process, composed: the service's parts built from the settings, the job runner
(Celery workers over Redis, or, for the embedded default, threads of this process), and
the app over them. Nowhere else builds the app."""

from dataclasses import fields
from pathlib import Path

from anyio import CapacityLimiter
from fastapi import FastAPI

from api.admission import Streams
from api.app import make_app
from api.keygen import KeyWork
from api.services import Services
from api.tokens import TokenStore
from sealstream.capacity import stream_memory
from sealstream.settings import Settings
from sealstream.wiring import ConfigurationError, Parts, build_parts
from services.jobs import JobRunner
from workers.runner import CeleryRunner, InProcessRunner


def create_app(settings: Settings, metrics_dir: Path | None = None) -> FastAPI:
    """The API over the parts `settings` describes (`metrics_dir`: see `make_app`)."""
    if settings.admin_token is None:
        raise ConfigurationError("set SEALSTREAM_ADMIN_TOKEN (`sealstream serve` generates one)")
    parts = build_parts(settings)
    services = Services(
        **{field.name: getattr(parts, field.name) for field in fields(parts)},
        tokens=TokenStore(
            parts.records,
            settings.admin_token.get_secret_value(),
            cache_ttl=settings.key_cache_ttl,
        ),
        runner=_job_runner(parts),
        transfers=CapacityLimiter(settings.transfer_threads),
        streams=Streams(
            settings.max_streams,
            stream_memory(settings.s3_part_size, settings.s3_parts_in_flight),
            settings.tenant_streams,
        ),
        key_work=KeyWork(settings.keygen_threads, settings.keygen_rate),
    )
    return make_app(services, metrics_dir)


def _job_runner(parts: Parts) -> JobRunner:
    if parts.settings.redis_url:
        return CeleryRunner(parts.settings, parts.jobs)
    return InProcessRunner(parts)
