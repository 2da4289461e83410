"""Token administration: issue, list and revoke API tokens for any tenant (scope `admin`)."""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.body import parse, read_json_object
from api.openapi import AUTHENTICATED, JSON_BODY, QUERY, answer, answers, json_request
from api.problems import Problem
from api.services import services
from api.tokens import SCOPES, TENANT_PATTERN, Principal, TokenNotFound, TokenRecord

router = APIRouter(prefix="/api/admin", tags=["admin"])
_SCOPE_NAMES: list[JsonValue] = [*sorted(SCOPES)]
Admin = Annotated[Principal, Depends(require("admin"))]


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tenant: str = Field(pattern=TENANT_PATTERN)
    scopes: list[str] = Field(
        min_length=1, json_schema_extra={"items": {"type": "string", "enum": _SCOPE_NAMES}}
    )
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


class TokenView(TokenRecord):
    """A token as admins see it: its record without the hash."""

    hash: str = Field(exclude=True, repr=False)


class IssuedToken(TokenView):
    """A new token's record and the token itself, which no later answer shows."""

    token: str


class TokenList(BaseModel):
    tokens: list[TokenView]


@router.post(
    "/tokens",
    status_code=201,
    response_model=None,
    responses=answers({201: answer("The new token.", IssuedToken)}, AUTHENTICATED, JSON_BODY),
    openapi_extra=json_request(NewToken),
)
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


@router.get(
    "/tokens",
    response_model=None,
    responses=answers(
        {200: answer("Every token, or a tenant's.", TokenList)}, AUTHENTICATED, QUERY
    ),
)
async def list_tokens(
    request: Request,
    _: Admin,
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
) -> dict[str, Any]:
    records = await run_in_threadpool(services(request).tokens.list, tenant)
    return {"tokens": [record.public() for record in records]}


@router.delete(
    "/tokens/{token_id}",
    response_model=None,
    responses=answers({200: answer("The revoked token.", TokenView)}, AUTHENTICATED, (404,)),
)
async def revoke_token(request: Request, token_id: str, _: Admin) -> dict[str, Any]:
    try:
        record = await run_in_threadpool(services(request).tokens.revoke, token_id)
    except TokenNotFound:
        raise Problem(404, "token-not-found", f"no token has id {token_id!r}") from None
    return record.public()
