"""Liveness and readiness probes: the only routes that need no token."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.problems import Problem
from api.services import services
from storage import StorageError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> JSONResponse | dict[str, object]:
    """The process can do its work: object storage answers."""
    try:
        await run_in_threadpool(services(request).objects.check)
    except StorageError as exc:
        problem = Problem(503, "not-ready", f"object storage is not reachable: {exc}")
        return problem.response(request.url.path)
    return {"status": "ready", "checks": {"storage": "ok"}}
