"""Bearer-token authentication and scope checks, as FastAPI dependencies.

`Depends(require("keys:read"))` on a route answers 401 without a valid token and 403
when the token lacks the scope, both as problem documents with a `WWW-Authenticate`
challenge (RFC 6750).
"""

from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api.problems import Problem
from api.services import services
from api.tokens import SCOPES, Principal, TokenError


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that authenticates the request and demands `scope`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(request: Request) -> Principal:
        token = _bearer_token(request)
        try:
            principal = await run_in_threadpool(services(request).tokens.authenticate, token)
        except TokenError as exc:
            raise Problem(
                401,
                exc.code,
                str(exc),
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            ) from None
        if scope not in principal.scopes:
            raise Problem(
                403,
                "insufficient-scope",
                f"the token lacks the {scope!r} scope",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return principal

    return dependency


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(
            401,
            "missing-token",
            "send an API token as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()
