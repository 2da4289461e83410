"""The audit of requests: one event for each authenticated request, and refused ones
(401s counted per source, see `audit.trail`), recorded by `AuditMiddleware` as each
request ends.

The middleware sees every request, so a new route is audited without a line of its own:
its template, operation (the route's name), status, problem `code`, bytes both ways,
client address, and a `kid` (and version) in its path. A route adds what only it knows
to the request's `AuditNote` (`noted(request)`): the key version a stream used, the
context's keys (never their values), the object. `api.auth` notes who the request acts
as. Like `api.metrics`, it is a plain ASGI middleware that only passes messages through.
"""

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.tokens import Principal
from audit import AuditTrail

REQUEST_ID_HEADER = b"x-request-id"
PROBLEM_TYPE = b"application/problem+json"
MAX_PROBLEM_BYTES = 16 * 1024  # a problem document is small; more is not one we parse
_STATE = "audit_note"


@dataclass
class AuditNote:
    """What a request's event says beyond what the middleware sees."""

    principal: Principal | None = None
    key: str | None = None  # kid, or kid#version
    context_keys: list[str] | None = None
    object: str | None = None
    bucket: str | None = None  # the object's
    # The code of a refusal met once the answer had started, which aborted it (a stored
    # object found tampered at its end): no problem document carries it.
    refusal: str | None = None

    def context(self, context: Iterable[str]) -> None:
        """Note an encryption context's keys: its values are never recorded."""
        self.context_keys = sorted(context) or None


def noted(request: Request) -> AuditNote:
    """The note of `request`'s audit event (a loose one if the app is not audited)."""
    note = request.scope.get("state", {}).get(_STATE)
    return note if isinstance(note, AuditNote) else AuditNote()


class AuditMiddleware:
    def __init__(self, app: ASGIApp, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.trail.options.enabled:
            await self.app(scope, receive, send)
            return
        note = AuditNote()
        scope.setdefault("state", {})[_STATE] = note
        request_id = secrets.token_hex(8)
        exchange = _Exchange()

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.bytes_in += len(message.get("body", b""))
            return message

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.started(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            elif message["type"] == "http.response.body":
                exchange.sent(message)
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        finally:
            self._record(scope, note, request_id, exchange)

    def _record(
        self, scope: Scope, note: AuditNote, request_id: str, exchange: "_Exchange"
    ) -> None:
        route = scope.get("route")
        # The template as documented: `{key}`, not Starlette's `{key:path}`.
        template = str(getattr(route, "path_format", "unmatched"))
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        principal = note.principal
        if principal is None:
            if exchange.status == 401:
                self.trail.refused(address, template, exchange.code() or "invalid-token")
            return  # no token asked for: health, metrics, documentation
        self.trail.record(
            {
                "type": "request",
                "requestId": request_id,
                "tenant": principal.tenant,
                "tokenId": principal.token_id,
                "method": scope["method"],
                "route": template,
                "operation": getattr(route, "name", None),
                "key": note.key or _path_key(scope.get("path_params", {})),
                "contextKeys": note.context_keys,
                "object": note.object,
                "bucket": note.bucket,
                "bytesIn": exchange.bytes_in,
                "bytesOut": exchange.bytes_out,
                "status": exchange.status,
                "code": exchange.code() or note.refusal,
                "aborted": exchange.aborted or None,
                "client": address,
            }
        )


class _Exchange:
    """What passed through for one request."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.status: int | None = None
        self.ended = False
        self._problem: bytearray | None = None

    @property
    def aborted(self) -> bool:
        return not self.ended

    def started(self, message: Message) -> None:
        self.status = int(message["status"])
        content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        if content_type.startswith(PROBLEM_TYPE):
            self._problem = bytearray()

    def sent(self, message: Message) -> None:
        body = message.get("body", b"")
        self.bytes_out += len(body)
        if self._problem is not None and len(self._problem) < MAX_PROBLEM_BYTES:
            self._problem += body
        self.ended = not message.get("more_body", False)

    def code(self) -> str | None:
        """The problem document's `code`, if the answer was one."""
        if self._problem is None:
            return None
        try:
            document: Any = json.loads(self._problem)
        except ValueError:
            return None
        code = document.get("code") if isinstance(document, dict) else None
        return code if isinstance(code, str) else None


def _path_key(params: dict[str, Any]) -> str | None:
    """The key a route's path names: `kid`, with its version if the path has one."""
    kid = params.get("kid")
    if kid is None:
        return None
    version = params.get("version", params.get("n"))
    return f"{kid}#{version}" if version is not None else str(kid)
