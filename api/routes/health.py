"""Liveness and readiness probes, and Prometheus metrics: the routes that need no token.

Readiness covers what every request needs: object storage, the KEK (usable, and the one
the store's records were sealed under), and Redis when jobs use it.

The metrics carry no tenant, kid or token (see `api.metrics`), so a scraper needs none.
"""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from api.openapi import answer, answers
from api.problems import Problem
from api.services import Services, services
from keystore import KekError
from keystore.recordkey import check_record_key
from services.errors import error_code
from storage import StorageError

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


_READY = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"const": "ready"},
        "checks": {"type": "object", "additionalProperties": {"const": "ok"}},
    },
}


@router.get(
    "/healthz",
    response_model=None,
    responses={
        200: answer(
            "Serving.",
            schema={"type": "object", "properties": {"status": {"const": "ok"}}},
        )
    },
)
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=None,
    responses=answers({200: answer("Ready to work.", schema=_READY)}, (503,)),
)
async def readyz(request: Request) -> JSONResponse | dict[str, object]:
    """The process can do its work: object storage answers, and Redis when jobs use it."""
    svc = services(request)
    checks = {"storage": "ok"}
    try:
        await run_in_threadpool(svc.objects.check)
    except StorageError as exc:
        # The error's own words (a directory, an endpoint) are for the log: this route
        # answers without a token.
        logger.warning("not ready: object storage: %s", exc)
        problem = Problem(503, "not-ready", f"object storage is not ready: {error_code(exc)}")
        return problem.response(request.url.path)
    try:
        await run_in_threadpool(_check_kek, svc)
    except (KekError, StorageError) as exc:
        logger.warning("not ready: the KEK: %s", exc)
        problem = Problem(503, "not-ready", f"the KEK cannot serve: {error_code(exc)}")
        return problem.response(request.url.path)
    checks["kek"] = "ok"
    if svc.settings.redis_url:
        try:
            await run_in_threadpool(svc.jobs.ping)
        except RedisError as exc:
            logger.warning("not ready: Redis: %s", exc)
            problem = Problem(503, "not-ready", "Redis is not reachable")
            return problem.response(request.url.path)
        checks["redis"] = "ok"
    return {"status": "ready", "checks": checks}


def _check_kek(svc: Services) -> None:
    svc.kek.check()
    check_record_key(svc.records.key, svc.objects, svc.records.store_id)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: answer(
            "Prometheus text, or OpenMetrics if `Accept` asks for it.",
            media_type="text/plain",
            schema={"type": "string"},
        )
    },
)
async def metrics(request: Request) -> Response:
    """Request counts, durations and body bytes by route, and the process's own figures."""
    body, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)
