"""Key management: generate, import, read, list, rotate, enable/disable, delete, export.

Every route acts within the token's tenant: another tenant's kid is simply not found.
Responses show metadata and public keys only; material leaves solely through export,
and only for keys created exportable.
"""

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from api.audit import noted
from api.auth import require
from api.body import parse, read_json_object
from api.openapi import AUTHENTICATED, JSON_BODY, NAMED_KEY, QUERY, answer, answers, json_request
from api.problems import Problem
from api.services import services
from api.tokens import Principal
from keystore import ImportSpec, KeyChange, KeyRecord, KeySpec, KeyView, supported_algorithms
from keystore.records import VersionInfo
from services.inventory import (
    CURSOR_PATTERN,
    IndexedObject,
    IndexPage,
    InvalidCursor,
    UnreadableRun,
    VersionIndex,
)
from services.retirement import RetirementRefused, Retirements
from storage.documents import CamelModel

router = APIRouter(prefix="/api/key-management", tags=["keys"])
Reader = Annotated[Principal, Depends(require("keys:read"))]
Writer = Annotated[Principal, Depends(require("keys:write"))]
Exporter = Annotated[Principal, Depends(require("keys:export"))]


class KeyList(BaseModel):
    """A page of keys; `next` is the `after` of the next page, null on the last."""

    keys: list[KeyView]
    next: str | None


class VersionDetail(VersionInfo):
    """A version, and how many stored objects the index lists under it (None: unknown,
    a bucket one of its runs is in cannot be read)."""

    object_count: int | None


class KeyDetail(KeyView):
    """A key as its readers see it, with each version's count of stored objects."""

    versions: tuple[VersionDetail, ...]


class IndexedObjects(BaseModel):
    """A page of a key version's objects, in index order; `next` is the `after` of the
    next page, null on the last; `unreadable`, the runs (an archive's or batch job's
    objects under one prefix) passed over because their bucket could not be read now:
    their objects are in no page."""

    objects: list[IndexedObject]
    next: str | None
    unreadable: list[UnreadableRun]


class Retirement(CamelModel):
    """What retiring a version takes: its name, `kid#version`, as the confirmation that
    what it sealed outside storage may become unreadable; and the days until its material
    is destroyed."""

    model_config = ConfigDict(extra="forbid")

    confirm: str | None = None
    pending_window_days: int = 7


DETAIL = {200: answer("The key, with each version's count of stored objects.", KeyDetail)}
RETIRED = {200: answer("The key, the version retired.", KeyDetail)}
RETIREMENT_CANCELLED = {200: answer("The key, the version in use again.", KeyDetail)}
INDEXED = {200: answer("A page of the version's stored objects.", IndexedObjects)}


KEY = {200: answer("The key as its readers see it.", KeyView)}
CREATED = {201: answer("The new key.", KeyView)}
JWK = {200: answer("The material as a private JWK.", schema={"type": "object"})}
ALGORITHMS = {200: answer("Each key type: its algorithms and sizes.", schema={"type": "object"})}


def view(record: KeyRecord) -> dict[str, Any]:
    return record.public_view().model_dump(mode="json")


def versioned(request: Request, record: KeyRecord) -> dict[str, Any]:
    """The view of a key whose primary version the request made: its audit event names
    that version."""
    noted(request).key = f"{record.kid}#{record.primary_version}"
    return view(record)


async def json_body(request: Request) -> dict[str, Any]:
    return await read_json_object(request, services(request).settings)


@router.get(
    "/supported-algorithms", response_model=None, responses=answers(ALGORITHMS, AUTHENTICATED)
)
async def list_supported_algorithms(_: Reader) -> dict[str, Any]:
    """The kty / alg pairs a key may be generated or imported with."""
    return {"algorithms": supported_algorithms()}


@router.post(
    "/keys",
    status_code=201,
    response_model=None,
    responses=answers(CREATED, AUTHENTICATED, JSON_BODY, (409,)),
    openapi_extra=json_request(KeySpec),
)
async def create_key(request: Request, principal: Writer) -> dict[str, Any]:
    spec = parse(KeySpec, await json_body(request))
    noted(request).key = spec.kid
    create = partial(services(request).keys.create, principal.tenant, spec)
    return versioned(
        request, await services(request).key_work.run(principal.tenant, spec.kty, create)
    )


@router.post(
    "/keys/import",
    status_code=201,
    response_model=None,
    responses=answers(CREATED, AUTHENTICATED, JSON_BODY, (409,)),
    openapi_extra=json_request(ImportSpec),
)
async def import_key(request: Request, principal: Writer) -> dict[str, Any]:
    spec = parse(ImportSpec, await json_body(request))
    noted(request).key = spec.kid
    kty = str(spec.jwk.get("kty", ""))
    import_ = partial(services(request).keys.import_jwk, principal.tenant, spec)
    return versioned(request, await services(request).key_work.run(principal.tenant, kty, import_))


@router.get(
    "/keys",
    response_model=None,
    responses=answers({200: answer("A page of keys.", KeyList)}, AUTHENTICATED, QUERY),
)
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


@router.get("/keys/{kid}", response_model=None, responses=answers(DETAIL, AUTHENTICATED, NAMED_KEY))
async def get_key(request: Request, kid: str, principal: Reader) -> dict[str, Any]:
    """The key, each version with the count of stored objects the index lists under it."""
    return await run_in_threadpool(_detailed, request, principal.tenant, kid)


@router.patch(
    "/keys/{kid}",
    response_model=None,
    responses=answers(KEY, AUTHENTICATED, NAMED_KEY, JSON_BODY),
    openapi_extra=json_request(KeyChange),
)
async def change_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    """Change what a key allows: `exportable` (to false only), `expiresAt`, the usage
    limits and `rotateOnUsageLimit`; a field left out stays, `null` clears it."""
    change = parse(KeyChange, await json_body(request))
    return view(
        await run_in_threadpool(services(request).keys.change, principal.tenant, kid, change)
    )


@router.post(
    "/keys/{kid}/rotate", response_model=None, responses=answers(KEY, AUTHENTICATED, NAMED_KEY)
)
async def rotate_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    keys = services(request).keys
    record = await run_in_threadpool(keys.get, principal.tenant, kid)
    rotate = partial(keys.rotate, principal.tenant, kid)
    return versioned(
        request, await services(request).key_work.run(principal.tenant, record.kty, rotate)
    )


@router.post(
    "/keys/{kid}/disable", response_model=None, responses=answers(KEY, AUTHENTICATED, NAMED_KEY)
)
async def disable_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    return view(await run_in_threadpool(services(request).keys.disable, principal.tenant, kid))


@router.post(
    "/keys/{kid}/enable", response_model=None, responses=answers(KEY, AUTHENTICATED, NAMED_KEY)
)
async def enable_key(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    return view(await run_in_threadpool(services(request).keys.enable, principal.tenant, kid))


@router.delete("/keys/{kid}", response_model=None, responses=answers(KEY, AUTHENTICATED, NAMED_KEY))
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


@router.post(
    "/keys/{kid}/cancel-deletion",
    response_model=None,
    responses=answers(KEY, AUTHENTICATED, NAMED_KEY),
)
async def cancel_key_deletion(request: Request, kid: str, principal: Writer) -> dict[str, Any]:
    """Keep the key; it comes back disabled, as an AWS KMS key does."""
    return view(
        await run_in_threadpool(services(request).keys.cancel_deletion, principal.tenant, kid)
    )


@router.get(
    "/keys/{kid}/export", response_model=None, responses=answers(JWK, AUTHENTICATED, NAMED_KEY)
)
async def export_key(
    request: Request,
    kid: str,
    principal: Exporter,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """The material of one version (the primary by default) as a private JWK."""
    noted(request).key = kid if version is None else f"{kid}#{version}"
    jwk = await run_in_threadpool(services(request).keys.export_jwk, principal.tenant, kid, version)
    noted(request).key = str(jwk["kid"])  # kid#version: the version exported
    return dict(jwk)


# The index of key versions, and retiring a version

ObjectReader = Annotated[Principal, Depends(require("objects:read"))]


def detail(record: KeyRecord, counts: dict[int, int | None]) -> dict[str, Any]:
    """The key's view, each version with its count of stored objects (`counts`)."""
    shown = view(record)
    for version in shown["versions"]:
        version["objectCount"] = counts.get(version["version"], 0)
    return shown


def _detailed(request: Request, tenant: str, kid: str) -> dict[str, Any]:
    svc = services(request)
    record = svc.keys.get(tenant, kid)
    return detail(record, VersionIndex(svc.records, svc.spaces).counts(tenant, kid))


@router.get(
    "/keys/{kid}/objects",
    response_model=None,
    responses=answers(INDEXED, AUTHENTICATED, NAMED_KEY, QUERY),
)
async def list_key_version_objects(
    request: Request,
    kid: str,
    principal: Reader,
    _: ObjectReader,
    version: Annotated[int, Query(ge=1)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str, Query(pattern=CURSOR_PATTERN)] = "",
) -> dict[str, Any]:
    """The stored objects the index lists under one version of the key."""
    svc = services(request)

    def page() -> IndexPage:
        svc.keys.get(principal.tenant, kid).version(version)  # 404 for either
        index = VersionIndex(svc.records, svc.spaces)
        return index.page(principal.tenant, kid, version, limit=limit, after=after)

    try:
        found = await run_in_threadpool(page)
    except InvalidCursor as refusal:
        raise Problem(422, "invalid-request", f"invalid request: query.after: {refusal}") from None
    return {
        "objects": [IndexedObject.of(marker).model_dump(mode="json") for marker in found.markers],
        "next": found.next,
        "unreadable": [run.model_dump(mode="json") for run in found.unreadable],
    }


@router.post(
    "/keys/{kid}/versions/{version}/retire",
    response_model=None,
    responses=answers(RETIRED, AUTHENTICATED, NAMED_KEY, JSON_BODY, (428,)),
    openapi_extra=json_request(Retirement),
)
async def retire_key_version(
    request: Request, kid: str, version: Annotated[int, Path(ge=1)], principal: Writer
) -> dict[str, Any]:
    """Retire a version that no stored object uses: it seals and opens nothing from now
    on, and its material is destroyed after `pendingWindowDays` (1 to 30, default 7)."""
    svc = services(request)
    spec = parse(Retirement, await json_body(request))
    retirements = Retirements(svc.keys, svc.records, svc.spaces)
    retire = partial(
        retirements.retire,
        principal.tenant,
        kid,
        version,
        confirm=spec.confirm,
        pending_days=spec.pending_window_days,
    )
    try:
        await run_in_threadpool(retire)
    except RetirementRefused as refusal:
        raise Problem(
            refusal.status, refusal.code, str(refusal), extensions=refusal.extensions()
        ) from None
    return await run_in_threadpool(_detailed, request, principal.tenant, kid)


@router.post(
    "/keys/{kid}/versions/{version}/cancel-retirement",
    response_model=None,
    responses=answers(RETIREMENT_CANCELLED, AUTHENTICATED, NAMED_KEY),
)
async def cancel_key_version_retirement(
    request: Request, kid: str, version: Annotated[int, Path(ge=1)], principal: Writer
) -> dict[str, Any]:
    """Put a retired version back in use before its material is destroyed (within its
    pending window), as cancel-deletion keeps a key."""
    noted(request).key = f"{kid}#{version}"
    keys = services(request).keys
    await run_in_threadpool(keys.cancel_retirement, principal.tenant, kid, version)
    return await run_in_threadpool(_detailed, request, principal.tenant, kid)
