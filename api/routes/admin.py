"""Token administration: issue, list and revoke API tokens for any tenant (scope `admin`)."""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.body import parse, read_json_object
from api.problems import Problem
from api.services import services
from api.tokens import SCOPES, TENANT_PATTERN, Principal, TokenNotFound

router = APIRouter(prefix="/api/admin", tags=["admin"])
Admin = Annotated[Principal, Depends(require("admin"))]


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tenant: str = Field(pattern=TENANT_PATTERN)
    scopes: list[str] = Field(min_length=1)
    name: str = Field("", max_length=200)
    expires_at: datetime | None = Field(None, alias="expiresAt")

    @field_validator("scopes")
    @classmethod
    def known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            raise PydanticCustomError(
                "unknown-scope", "unknown scopes: {unknown}", {"unknown": ", ".join(unknown)}
            )
        return scopes


@router.post("/tokens", status_code=201)
async def issue_token(request: Request, _: Admin) -> dict[str, Any]:
    """A new token; the token string is shown in this response only."""
    spec = parse(NewToken, await read_json_object(request, services(request).settings))
    token, record = await run_in_threadpool(
        services(request).tokens.issue,
        spec.tenant,
        spec.scopes,
        name=spec.name,
        expires_at=spec.expires_at,
    )
    return {"token": token, **record.public()}


@router.get("/tokens")
async def list_tokens(
    request: Request,
    _: Admin,
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
) -> dict[str, Any]:
    records = await run_in_threadpool(services(request).tokens.list, tenant)
    return {"tokens": [record.public() for record in records]}


@router.delete("/tokens/{token_id}")
async def revoke_token(request: Request, token_id: str, _: Admin) -> dict[str, Any]:
    try:
        record = await run_in_threadpool(services(request).tokens.revoke, token_id)
    except TokenNotFound:
        raise Problem(404, "token-not-found", f"no token has id {token_id!r}") from None
    return record.public()
