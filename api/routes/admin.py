"""Token administration: issue, list and revoke API tokens (scope `admin`).

A tenant admin manages its own tenant's tokens whose scopes it holds too, and grants
only scopes it holds; the operator (the bootstrap token, or a token granted `operator`)
manages every tenant's. A token a tenant admin does not manage is not found for it,
exactly like a missing one.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, field_validator
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
    expires_at: AwareDatetime | None = Field(None, alias="expiresAt")

    @field_validator("scopes")
    @classmethod
    def known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            raise PydanticCustomError(
                "unknown-scope", "unknown scopes: {unknown}", {"unknown": ", ".join(unknown)}
            )
        return scopes

    @field_validator("expires_at")
    @classmethod
    def in_the_future(cls, expires_at: datetime | None) -> datetime | None:
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise PydanticCustomError("invalid-expiry", "expiresAt must lie in the future")
        return expires_at


class TokenView(TokenRecord):
    """A token as admins see it: its record without the hash."""

    hash: str = Field(exclude=True, repr=False)


class IssuedToken(TokenView):
    """A new token's record and the token itself, which no later answer shows."""

    token: str


class TokenList(BaseModel):
    tokens: list[TokenView]


def manages(principal: Principal, record: TokenRecord) -> bool:
    """Whether `principal` may see and revoke the token `record`: a tenant admin can't
    reach above itself, say to its tenant's operator tokens."""
    if principal.operator:
        return True
    return record.tenant == principal.tenant and set(record.scopes) <= principal.scopes


def _check_grant(principal: Principal, spec: NewToken) -> None:
    """Refuse a token its issuer may not grant: for another tenant unless the issuer is
    the operator, or with a scope the issuer does not hold."""
    if spec.tenant != principal.tenant and not principal.operator:
        raise Problem(
            403, "operator-required", "a tenant admin issues tokens for its own tenant only"
        )
    beyond = sorted(set(spec.scopes) - principal.scopes)
    if beyond:
        detail = "a token cannot grant scopes its issuer lacks: " + ", ".join(beyond)
        raise Problem(403, "scope-not-held", detail)


@router.post(
    "/tokens",
    status_code=201,
    response_model=None,
    responses=answers({201: answer("The new token.", IssuedToken)}, AUTHENTICATED, JSON_BODY),
    openapi_extra=json_request(NewToken),
)
async def issue_token(request: Request, principal: Admin) -> dict[str, Any]:
    """A new token; the token string is shown in this response only."""
    spec = parse(NewToken, await read_json_object(request, services(request).settings))
    _check_grant(principal, spec)
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
        {200: answer("A tenant's tokens, or every tenant's.", TokenList)}, AUTHENTICATED, QUERY
    ),
)
async def list_tokens(
    request: Request,
    principal: Admin,
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
) -> dict[str, Any]:
    """The tokens of one tenant (those of its own a tenant admin manages), or of every
    tenant (operator)."""
    if not principal.operator:
        if tenant not in (None, principal.tenant):
            raise Problem(
                403, "operator-required", "a tenant admin lists its own tenant's tokens only"
            )
        tenant = principal.tenant
    records = await run_in_threadpool(services(request).tokens.list, tenant)
    return {"tokens": [record.public() for record in records if manages(principal, record)]}


@router.delete(
    "/tokens/{token_id}",
    response_model=None,
    responses=answers({200: answer("The revoked token.", TokenView)}, AUTHENTICATED, (404,)),
)
async def revoke_token(request: Request, token_id: str, principal: Admin) -> dict[str, Any]:
    tokens = services(request).tokens

    def revoke() -> TokenRecord:
        if not manages(principal, tokens.get(token_id)):
            raise TokenNotFound(token_id)
        return tokens.revoke(token_id)

    try:
        record = await run_in_threadpool(revoke)
    except TokenNotFound:
        raise Problem(404, "token-not-found", f"no token has id {token_id!r}") from None
    return record.public()
