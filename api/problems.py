"""Errors as `application/problem+json` (RFC 9457), each with a stable machine `code`.

Every failure the API answers — ours, the key store's, the object store's, FastAPI's own
validation and routing errors — leaves through here, so clients see one shape and no
stack trace. Validation errors never echo the input back: it may hold key material.
"""

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import envelope
import keystore
import storage
from keystore.name_keys import NameUnreadable
from services import resumable
from services.errors import error_code, public_detail
from services.open_stored import StoredObjectRefused
from services.placement import BucketNotAllowed
from services.reencrypt import ObjectTampered, RecipientNotHeld
from services.replicas import NotReplicated
from services.upload_anchor import AnchorNotDurable
from storage.integrity import RecordTampered

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
# Requests on resumable uploads, whose Redis errors are the anchor's, not the job store's.
UPLOADS_PATH = "/api/uploads"


class Problem(Exception):
    """An error the API answers with its status and a problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        """`extensions` are members of the problem beyond RFC 9457's own, for machines."""
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})

    def document(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extensions,
            "type": f"urn:sealstream:problem:{self.code}",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body

    def response(self, instance: str | None = None) -> JSONResponse:
        return JSONResponse(
            self.document(instance),
            status_code=self.status,
            media_type=MEDIA_TYPE,
            headers=self.headers,
        )


# Status of each domain error; the most specific class listed wins (codes: error_code).
_STATUS: dict[type[Exception], int] = {
    envelope.UnsupportedMessage: 400,
    envelope.HeaderLimitExceeded: 400,
    envelope.FrameSequenceError: 400,
    envelope.TruncatedMessage: 400,
    envelope.TrailingData: 400,
    envelope.MessageFormatError: 400,
    envelope.AuthenticationError: 400,
    envelope.MalformedJws: 400,
    envelope.JwsAlgorithmMismatch: 422,
    envelope.SignatureInvalid: 422,
    envelope.SigningFailed: 500,
    envelope.DataKeyUnavailable: 422,
    envelope.EncryptionContextMismatch: 422,
    envelope.EnvelopeError: 422,
    keystore.KeyNotFound: 404,
    keystore.KeyExists: 409,
    keystore.KeyMismatch: 422,
    keystore.InvalidArgument: 422,
    keystore.InvalidKeyState: 409,
    keystore.ExportabilityIsOneWay: 409,
    keystore.ConcurrentUpdate: 409,
    keystore.OperationNotPermitted: 403,
    keystore.KeyNotExportable: 403,
    keystore.KeyUsageExhausted: 403,
    keystore.UsageUnavailable: 503,
    keystore.KekError: 503,
    # A record names a name key version the tenant's name key record lacks: that record
    # was put back from before the version was added.
    NameUnreadable: 502,
    keystore.StoreNeedsUpgrade: 503,
    keystore.KeystoreError: 500,
    storage.ObjectNotFound: 404,
    storage.BucketNotFound: 404,
    storage.ObjectExists: 409,
    storage.PreconditionFailed: 412,
    storage.InvalidObjectKey: 400,
    storage.InvalidMetadata: 400,
    storage.InvalidRange: 416,
    storage.StorageUnavailable: 503,
    RecordTampered: 502,
    storage.StorageError: 502,
    BucketNotAllowed: 403,
    resumable.UploadNotFound: 404,
    resumable.UploadBusy: 423,
    resumable.OffsetMismatch: 409,
    resumable.ResentBytesDiffer: 409,
    resumable.PatchTooShort: 400,
    resumable.UploadTooLong: 400,
    resumable.UploadTampered: 502,
    resumable.UploadUnsupported: 422,
    resumable.UploadsNeedRedis: 501,
    resumable.UploadsNeedDurableRedis: 503,
    resumable.TooManyUploads: 429,
    StoredObjectRefused: 502,
    ObjectTampered: 502,
    RecipientNotHeld: 409,
}


def not_replicated(outcome: str) -> Problem:
    """503 for a Redis write no replica confirmed in time (`NotReplicated`): a failover
    could lose it, so it is not acknowledged; `outcome` says what became of it."""
    return Problem(503, "redis-not-replicated", f"no Redis replica confirmed it in time: {outcome}")


def from_domain_error(exc: Exception) -> Problem:
    """The problem for a key-store or object-store error, in words a client may read
    (`public_detail`); a server-side failure is logged in full."""
    status = next(_STATUS[cls] for cls in type(exc).__mro__ if cls in _STATUS)
    if status >= 500:
        logger.warning("answering %d %s: %s", status, error_code(exc), exc)
    return Problem(status, error_code(exc), public_detail(exc))


def from_validation_error(exc: ValidationError | RequestValidationError) -> Problem:
    """422 with each failing field; the code is the first custom error type, if any."""
    errors = [
        {"loc": [str(part) for part in error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]
    # pydantic's own error types are snake_case; ours are kebab-case problem codes.
    custom = [str(error["type"]) for error in exc.errors() if "-" in error["type"]]
    code = custom[0] if custom else "invalid-request"
    fields = ", ".join(".".join(map(str, error["loc"])) or "body" for error in exc.errors())
    return Problem(422, code, f"invalid request: {fields}", errors=errors)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """The methods the requested resource takes. Starlette's 405 names only those of the
    first route whose path matched, though GET and POST of one path are two routes. Where
    a literal path and a template both match (`/keys/import`, `/keys/{kid}`), the literal
    one is the resource, as OpenAPI resolves it."""
    paths: dict[str, dict[str, Any]] = request.app.openapi()["paths"]
    path = request.scope["path"]
    matching = [template for template in paths if _template(template).fullmatch(path)]
    if matching:
        resource = min(matching, key=lambda template: template.count("{"))
        return ", ".join(sorted(method.upper() for method in paths[resource]))
    routes = request.app.router.routes  # the routes the document leaves out (its pages)
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


def _template(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)))


def install(app: FastAPI) -> None:
    """Route every error raised while serving `app` through a problem document."""

    async def problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return from_validation_error(exc).response(request.url.path)

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "-")
        detail = str(exc.detail) if exc.detail else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return Problem(exc.status_code, code, detail, headers=headers).response(request.url.path)

    async def domain(request: Request, exc: Exception) -> JSONResponse:
        return from_domain_error(exc).response(request.url.path)

    async def job_store_down(request: Request, exc: Exception) -> JSONResponse:
        # An upload's request reaches Redis for its state's generation, not for a job.
        code, detail = "job-store-unavailable", "the job store is not reachable"
        if request.url.path.startswith(UPLOADS_PATH):
            code, detail = "upload-anchor-unavailable", "the uploads' Redis is not reachable"
        # redis-py's words name Redis's host and port: for the log only.
        logger.warning("answering 503 %s: %s", code, exc)
        problem = Problem(503, code, detail)
        return problem.response(request.url.path)

    async def unreplicated(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("answering 503 redis-not-replicated: %s", exc)
        problem = not_replicated("not acknowledged; try again")
        return problem.response(request.url.path)

    async def not_durable(request: Request, exc: Exception) -> JSONResponse:
        # Found by a move, the request's own check passed: answered as that check is.
        refused = resumable.UploadsNeedDurableRedis(str(exc))
        return from_domain_error(refused).response(request.url.path)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "unhandled %s on %s %s",
            type(exc).__name__,
            request.method,
            request.url.path,
            exc_info=exc,
        )
        return Problem(500, "internal-error", "the server failed to handle the request").response(
            request.url.path
        )

    app.add_exception_handler(Problem, problem)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(ValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(keystore.KeystoreError, domain)
    app.add_exception_handler(storage.StorageError, domain)
    app.add_exception_handler(envelope.EnvelopeError, domain)
    app.add_exception_handler(BucketNotAllowed, domain)
    app.add_exception_handler(StoredObjectRefused, domain)
    app.add_exception_handler(ObjectTampered, domain)
    app.add_exception_handler(RecipientNotHeld, domain)
    app.add_exception_handler(resumable.UploadRefused, domain)
    app.add_exception_handler(NotReplicated, unreplicated)
    app.add_exception_handler(AnchorNotDurable, not_durable)  # MoveNotDurable is also NotReplicated
    app.add_exception_handler(RedisError, job_store_down)
    app.add_exception_handler(Exception, unexpected)
