"""The tenant's name key, which hides archive members' names (scope `admin`): read which
versions it has, and rotate it.

Rotation adds a version, which runs into a new prefix name their members under from then
on; every earlier version is kept, since the objects named under it, their records and any
rerun into their prefix need it (`services.archives.naming`). No version is ever retired:
there is no route for it. Answers show versions and dates, never material.
"""

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.openapi import AUTHENTICATED, answer, answers
from api.routes.admin import Admin
from api.services import services
from keystore.name_keys import NameKeyRecord
from storage.documents import CamelModel

router = APIRouter(prefix="/api/admin/name-key", tags=["admin"])


class NameKeyVersionView(CamelModel):
    version: int
    created_at: datetime


class NameKeyView(CamelModel):
    tenant: str
    current: int | None  # None until the tenant first hides names
    versions: list[NameKeyVersionView]


def _view(tenant: str, record: NameKeyRecord | None) -> dict[str, Any]:
    versions = [] if record is None else record.versions
    view = NameKeyView(
        tenant=tenant,
        current=versions[-1].version if versions else None,
        versions=[NameKeyVersionView(version=v.version, created_at=v.created_at) for v in versions],
    )
    return view.model_dump(mode="json")


VIEW = {200: answer("The tenant's name key versions, the newest current.", NameKeyView)}


@router.get(
    "",
    response_model=None,
    responses=answers(VIEW, AUTHENTICATED),
)
async def read_name_key(request: Request, principal: Admin) -> dict[str, Any]:
    """The versions of the token's tenant's name key, the newest current."""
    record = await run_in_threadpool(services(request).keys.name_keys.record, principal.tenant)
    return _view(principal.tenant, record)


@router.post(
    "/rotate",
    response_model=None,
    responses=answers(VIEW, AUTHENTICATED, (409,)),
)
async def rotate_name_key(request: Request, principal: Admin) -> dict[str, Any]:
    """Add a version of the tenant's name key and make it current: runs into a new prefix
    hide names under it; objects, manifests and reruns of earlier versions are unchanged.
    409 `name-key-versions-exhausted` once it has `SEALSTREAM_NAME_KEY_MAX_VERSIONS`."""
    record = await run_in_threadpool(services(request).keys.name_keys.rotate, principal.tenant)
    return _view(principal.tenant, record)
