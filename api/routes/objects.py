"""Stored objects: list the tenant's objects, delete one together with its record and its
marker in the index of key versions.

Every key is resolved inside the token's tenant's space, so another tenant's object is
not found, exactly like a missing one.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.audit import noted
from api.auth import require
from api.openapi import AUTHENTICATED, QUERY, answer, answers
from api.services import services
from api.tokens import Principal
from services.placement import ObjectRef, check_object_key
from services.stored_objects import ObjectEntry, delete_object, list_objects

router = APIRouter(prefix="/api/objects", tags=["objects"])
Reader = Annotated[Principal, Depends(require("objects:read"))]
Writer = Annotated[Principal, Depends(require("objects:write"))]


class ObjectList(BaseModel):
    """A page of objects in key order; `next` is the `after` of the next page, null on
    the last."""

    objects: list[ObjectEntry]
    next: str | None


def _check_partial_key(text: str) -> None:
    """Refuse a prefix or cursor that no object key could start with."""
    if text:
        check_object_key(text + "x")  # a prefix may end in '/' or mid-segment


PAGE = {200: answer("A page of objects.", ObjectList)}


@router.get("", response_model=None, responses=answers(PAGE, AUTHENTICATED, QUERY, (400, 404)))
async def list_stored_objects(
    request: Request,
    principal: Reader,
    prefix: str = "",
    after: str = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    bucket: str | None = None,
) -> dict[str, Any]:
    """The tenant's objects whose keys start with `prefix`, each with what its record
    says: key version, creation time, and whether the record names this very object."""
    _check_partial_key(prefix)
    _check_partial_key(after)
    svc = services(request)
    store = svc.spaces.store(principal.tenant, bucket)
    entries, cursor = await run_in_threadpool(
        lambda: list_objects(svc.records, store, principal.tenant, prefix, after=after, limit=limit)
    )
    return {"objects": [entry.model_dump(mode="json") for entry in entries], "next": cursor}


@router.delete(
    "/{key:path}",
    status_code=204,
    response_model=None,
    responses=answers(
        {204: {"description": "The object is gone."}}, AUTHENTICATED, QUERY, (400, 404)
    ),
)
async def delete_stored_object(
    request: Request, key: str, principal: Writer, bucket: str | None = None
) -> Response:
    """Delete an object, its record and its marker in the index of key versions."""
    svc = services(request)
    note = noted(request)
    note.object = key
    placement = svc.spaces.place(principal.tenant, ObjectRef(key=key, bucket=bucket))
    note.bucket = placement.bucket
    deleted = await run_in_threadpool(
        delete_object, svc.records, placement.store, principal.tenant, placement.storage_key
    )
    if deleted is not None:
        note.key = f"{deleted.kid}#{deleted.key_version}"
    return Response(status_code=204)
