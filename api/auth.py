"""Bearer-token authentication and scope checks, as FastAPI dependencies.

`Depends(require("keys:read"))` on a route answers 401 without a valid token and 403
when the token lacks the scope, both as problem documents with a `WWW-Authenticate`
challenge (RFC 6750); `Depends(authenticated)` asks only for a valid token. Both read
the token through FastAPI's `HTTPBearer`, so the OpenAPI document declares the bearer
scheme on every route that needs one, and API explorers can send a token.
"""

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.admission import claim_streams
from api.audit import noted
from api.problems import Problem
from api.services import services
from api.tokens import SCOPES, Principal, TokenError

# auto_error off: a missing token gets this API's own problem document, not FastAPI's.
BEARER = HTTPBearer(
    scheme_name="bearer",
    description="An API token (`sst_<id>_<secret>`), or the bootstrap admin token.",
    auto_error=False,
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


async def authenticated(request: Request, credentials: Credentials) -> Principal:
    """The principal a valid bearer token stands for; 401 without one."""
    token = _bearer_token(credentials)
    try:
        principal = await run_in_threadpool(services(request).tokens.authenticate, token)
    except TokenError as exc:
        raise Problem(
            401,
            exc.code,
            str(exc),
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    noted(request).principal = principal
    claim_streams(request.scope, principal.tenant)
    return principal


def require(*scopes: str) -> Callable[[Request, Principal], Awaitable[Principal]]:
    """A dependency that authenticates the request and demands every one of `scopes`. A
    request that can change or use keys or data (any scope but a `:read` one) is refused
    with 503 while the audit trail cannot record it."""
    unknown = sorted(set(scopes) - SCOPES)
    if not scopes or unknown:
        raise ValueError(f"unknown scopes {unknown!r}")
    needs_audit = not all(scope.endswith(":read") for scope in scopes)

    async def dependency(
        request: Request, principal: Annotated[Principal, Depends(authenticated)]
    ) -> Principal:
        for scope in scopes:
            if scope not in principal.scopes:
                challenge = f'Bearer error="insufficient_scope", scope="{" ".join(scopes)}"'
                raise Problem(
                    403,
                    "insufficient-scope",
                    f"the token lacks the {scope!r} scope",
                    headers={"WWW-Authenticate": challenge},
                )
        if needs_audit and services(request).audit.refuses_requests():
            raise Problem(
                503,
                "audit-unavailable",
                "the audit trail cannot be written, so the request is refused: try again later",
                headers={"Retry-After": "5"},
            )
        return principal

    return dependency


def _bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise Problem(
            401,
            "missing-token",
            "send an API token as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return credentials.credentials
