"""Key management: generate, import, read, list, rotate, enable/disable, delete, export.

Every route acts within the token's tenant: another tenant's kid is simply not found.
Responses show metadata and public keys only; material leaves solely through export,
and only for keys created exportable.
"""

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.body import parse, read_json_object
from api.services import services
from api.tokens import Principal
from keystore import ImportSpec, KeyRecord, KeySpec, supported_algorithms

router = APIRouter(prefix="/api/key-management", tags=["keys"])
Reader = Annotated[Principal, Depends(require("keys:read"))]
Writer = Annotated[Principal, Depends(require("keys:write"))]
Exporter = Annotated[Principal, Depends(require("keys:export"))]


class KeyChange(BaseModel):
    """What PATCH may change: today only exportable, and only from true to false."""

    model_config = ConfigDict(extra="forbid")

    exportable: bool


def view(record: KeyRecord) -> dict[str, Any]:
    return record.public_view().model_dump(mode="json")


async def json_body(request: Request) -> dict[str, Any]:
    return await read_json_object(request, services(request).settings)


@router.get("/supported-algorithms")
async def list_supported_algorithms(_: Reader) -> dict[str, Any]:
    """The kty / alg pairs a key may be generated or imported with."""
    return {"algorithms": supported_algorithms()}


@router.post("/keys", status_code=201)
async def create_key(request: Request, principal: Writer) -> dict[str, Any]:
    spec = parse(KeySpec, await json_body(request))
    create = partial(services(request).keys.create, principal.tenant, spec)
    return view(await services(request).key_work.run(principal.tenant, spec.kty, create))


@router.post("/keys/import", status_code=201)
async def import_key(request: Request, principal: Writer) -> dict[str, Any]:
    spec = parse(ImportSpec, await json_body(request))
    kty = str(spec.jwk.get("kty", ""))
    import_ = partial(services(request).keys.import_jwk, principal.tenant, spec)
    return view(await services(request).key_work.run(principal.tenant, kty, import_))


@router.get("/keys")
async def list_keys(
    request: Request,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: str | None = None,
) -> dict[str, Any]:
    records, cursor = await run_in_threadpool(
        services(request).keys.list, principal.tenant, limit=limit, after=after
    )
    return {"keys": [view(record) for record in records], "next": cursor}


@router.get("/keys/{kid}")
async def get_key(request: Request, kid: str, principal: Reader) -> dict[str, Any]:
    return view(await run_in_threadpool(services(request).keys.get, principal.tenant, kid))


@router.patch("/keys/{kid}")
async def change_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    change = parse(KeyChange, await json_body(request))
    keys = services(request).keys
    return view(
        await run_in_threadpool(keys.set_exportable, principal.tenant, kid, change.exportable)
    )


@router.post("/keys/{kid}/rotate")
async def rotate_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    keys = services(request).keys
    record = await run_in_threadpool(keys.get, principal.tenant, kid)
    rotate = partial(keys.rotate, principal.tenant, kid)
    return view(await services(request).key_work.run(principal.tenant, record.kty, rotate))


@router.post("/keys/{kid}/disable")
async def disable_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    return view(await run_in_threadpool(services(request).keys.disable, principal.tenant, kid))


@router.post("/keys/{kid}/enable")
async def enable_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    return view(await run_in_threadpool(services(request).keys.enable, principal.tenant, kid))


@router.delete("/keys/{kid}")
async def schedule_key_deletion(
    request: Request,
    kid: str,
    principal: Writer,
    pending_window_days: Annotated[int, Query(alias="pendingWindowDays")] = 7,
) -> dict[str, Any]:
    """Schedule the key's destruction after a pending window (1 to 30 days)."""
    keys = services(request).keys
    return view(
        await run_in_threadpool(keys.schedule_deletion, principal.tenant, kid, pending_window_days)
    )


@router.post("/keys/{kid}/cancel-deletion")
async def cancel_key_deletion(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    """Keep the key; it comes back disabled, as an AWS KMS key does."""
    return view(
        await run_in_threadpool(services(request).keys.cancel_deletion, principal.tenant, kid)
    )


@router.get("/keys/{kid}/export")
async def export_key(
    request: Request,
    kid: str,
    principal: Exporter,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """The material of one version (the primary by default) as a private JWK."""
    jwk = await run_in_threadpool(services(request).keys.export_jwk, principal.tenant, kid, version)
    return dict(jwk)
