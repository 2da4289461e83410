"""What the OpenAPI document says that FastAPI cannot see for itself, declared in one place.

The routes read their own bodies (`api.body`, `api.multipart`) and answer errors as problem
documents from exception handlers, so FastAPI knows neither their request bodies nor most
of their statuses. A route states them with the helpers here: `json_request(Model)` or
`form_request(Model, ...)` as its `openapi_extra`, and `answers(...)` as its `responses`,
naming statuses by the groups below. `install` puts the schemas those name into the
document's components.
"""

from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api.multipart import FILE_PART, METADATA_PART
from api.problems import MEDIA_TYPE as PROBLEM_MEDIA_TYPE

REF_PREFIX = "#/components/schemas/"


class FieldError(BaseModel):
    """One field a request got wrong; its input is never echoed."""

    loc: list[str]
    msg: str
    type: str


class ProblemDocument(BaseModel):
    """An error answer (RFC 9457): `code` is stable and says what went wrong."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(pattern=r"^urn:sealstream:problem:[a-z0-9]+(-[a-z0-9]+)*$")
    title: str
    status: int = Field(ge=400, le=599)
    code: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


# Statuses, by what a route does. Each route lists the groups that apply to it.
AUTHENTICATED = (401, 403, 502, 503)  # a token read from storage; 403: scope or bucket
JSON_BODY = (400, 408, 413, 415, 422)
FORM = (400, 408, 413, 415, 422)
NAMED_KEY = (404, 409, 422)  # a kid in the path: unknown, in the wrong state, malformed
QUERY = (422,)

_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed (body, form, message or object name).",
    401: "No token, or one that is unknown, revoked or expired.",
    403: "The token lacks the scope, the key or bucket does not allow this, or the key has "
    "reached its `maxUsageLimit` (`key-usage-exhausted`: it still decrypts).",
    404: "No such key, object, bucket or job in the token's tenant.",
    408: "The body stopped arriving, or arrived too slowly.",
    409: "The key or object is in a state that does not allow this, or already exists.",
    412: "The object changed while it was being written.",
    413: "The body, or the metadata part, is over the limit.",
    415: "The body is not of the media type the route reads.",
    416: "The range lies outside the plaintext.",
    422: "A field is invalid; `errors` lists each one.",
    428: "The request must confirm what it does (`confirm`); the problem says what that is.",
    502: "Object storage failed, or a stored record or object is damaged.",
    503: "Object storage, Redis or the KEK is unavailable, a Redis replica did not confirm a "
    "write in time, or the server is at its limit.",
}

_HEADERS: dict[str, dict[str, Any]] = {
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750).",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "string"},
    },
    "X-Key-Requested": {
        "description": "The kid the request named (or, decrypting, the message's key).",
        "schema": {"type": "string"},
        "required": True,
    },
    "X-Key-Used": {
        "description": "The key version that sealed, opened, signed or verified: "
        "`kid#version`; a public JWK given to verify with, `jwk#` and its RFC 7638 "
        "thumbprint.",
        "schema": {"type": "string"},
        "required": True,
    },
    "X-Algorithm-Used": {
        "description": "The key's algorithm (`alg`).",
        "schema": {"type": "string"},
        "required": True,
    },
    "X-Source-Key-Requested": {
        "description": "The source's kid as the request named it, or the source's own key.",
        "schema": {"type": "string"},
        "required": True,
    },
    "X-Source-Key-Used": {
        "description": "The key version that opened the message or checked the old "
        "signature; a public JWK given for it, `jwk#` and its RFC 7638 thumbprint.",
        "schema": {"type": "string"},
    },
    "X-Source-Algorithm-Used": {
        "description": "The source key's algorithm (`alg`).",
        "schema": {"type": "string"},
        "required": True,
    },
    "X-Key-Usage-Limit-Warning": {
        "description": "The key has reached its `softUsageLimit`: `usageCount=N; "
        "softUsageLimit=S`, then `; maxUsageLimit=M` if one is set, and for a key that "
        "rotates on its soft limit `; versionUsageCount=V` (the count the soft limit is "
        "measured against).",
        "schema": {"type": "string"},
    },
    "X-Key-Expiration-Warning": {
        "description": "The key expires within `SEALSTREAM_KEY_EXPIRATION_WARNING` "
        "seconds, or has expired (it then only decrypts): `expiresAt=<RFC 3339 time>`.",
        "schema": {"type": "string"},
    },
    "X-Source-Key-Usage-Limit-Warning": {
        "description": "As `X-Key-Usage-Limit-Warning`, for the key of the old message or "
        "signature.",
        "schema": {"type": "string"},
    },
    "X-Source-Key-Expiration-Warning": {
        "description": "As `X-Key-Expiration-Warning`, for the key of the old message or "
        "signature.",
        "schema": {"type": "string"},
    },
    "X-Message-Proven": {
        "description": "`true` if the message carries this service's proof that it wrote "
        "it and is signed or sealed only for keys only the service ever held (or, stored, "
        "the service's record of it); `false` otherwise: no proof (written before proofs "
        "were, or by anyone else holding the key's public half), another deployment's, or "
        "a data key that may be known outside the service. A range is `true` only for "
        "a proof of a message sealed only for keys only the service ever held: neither "
        "signature nor record covers a range.",
        "schema": {"type": "string", "enum": ["true", "false"]},
        "required": True,
    },
    "X-Source-Message-Proven": {
        "description": "As `X-Message-Proven`, for the message re-encrypted.",
        "schema": {"type": "string", "enum": ["true", "false"]},
        "required": True,
    },
    "X-Signature-Checked": {
        "description": "`false` on a range of a signed message: its frames authenticated, "
        "but its footer signature, over the whole message, was not checked.",
        "schema": {"type": "string", "enum": ["false"]},
    },
    "Accept-Ranges": {
        "description": "`bytes` when reading a stored object: `Range` may ask for part of it.",
        "schema": {"type": "string", "enum": ["bytes"]},
    },
    "Content-Range": {
        "description": "The plaintext bytes sent and the plaintext's length, or `*/length`.",
        "schema": {"type": "string"},
    },
}

WARNING_HEADERS = ("X-Key-Usage-Limit-Warning", "X-Key-Expiration-Warning")
SOURCE_WARNING_HEADERS = ("X-Source-Key-Usage-Limit-Warning", "X-Source-Key-Expiration-Warning")
KEY_HEADERS = ("X-Key-Requested", "X-Key-Used", "X-Algorithm-Used", *WARNING_HEADERS)
SOURCE_KEY_HEADERS = (
    "X-Source-Key-Requested",
    "X-Source-Key-Used",
    "X-Source-Algorithm-Used",
    *SOURCE_WARNING_HEADERS,
)
_PROBLEM_HEADERS: dict[int, tuple[str, ...]] = {
    401: ("WWW-Authenticate",),
    403: ("WWW-Authenticate",),
    416: ("Content-Range",),
    503: ("Retry-After",),
}

# Models whose schemas the document refers to, with the mode they are shown in.
_models: dict[type[BaseModel], JsonSchemaMode] = {ProblemDocument: "serialization"}


def _ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, str]:
    known = _models.setdefault(model, mode)
    if known != mode:
        raise ValueError(f"{model.__name__} is shown both as input and as output")
    return {"$ref": f"{REF_PREFIX}{model.__name__}"}


def headers(
    *names: str, required: Iterable[str] = (), optional: Iterable[str] = ()
) -> dict[str, Any]:
    """Response headers by name; those in `required` always come with the answer, those
    in `optional` not always, whatever they do elsewhere."""
    return {
        name: {
            **_HEADERS[name],
            "required": name not in optional
            and (name in required or bool(_HEADERS[name].get("required"))),
        }
        for name in names
    }


def answer(
    description: str,
    model: type[BaseModel] | None = None,
    *,
    media_type: str = "application/json",
    schema: Mapping[str, Any] | None = None,
    with_headers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A success answer: JSON as `model` shows it, or `schema` under `media_type`."""
    declared: dict[str, Any] = {"description": description}
    if model is not None:
        declared["content"] = {media_type: {"schema": _ref(model, "serialization")}}
    elif schema is not None:
        declared["content"] = {media_type: {"schema": dict(schema)}}
    if with_headers:
        declared["headers"] = dict(with_headers)
    return declared


def answers(
    success: Mapping[int, dict[str, Any]], *groups: Iterable[int]
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: its success answers, then a problem for every status in
    `groups`."""
    statuses = sorted({status for group in groups for status in group})
    declared: dict[int | str, dict[str, Any]] = {}
    declared.update(success.items())
    for status in statuses:
        declared[status] = {
            "description": _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": _ref(ProblemDocument, "serialization")}},
        }
        if status in _PROBLEM_HEADERS:
            declared[status]["headers"] = headers(*_PROBLEM_HEADERS[status])
    return declared


def json_request(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a JSON object validated as `model`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(model, "validation")}},
        }
    }


def form_request(metadata: type[BaseModel], *, file_required: bool, file: str) -> dict[str, Any]:
    """`openapi_extra` for the crypto routes' form: the `metadata` part (JSON, as
    `metadata` validates it) first, then the `file` part (`file` says what it holds)."""
    required = [METADATA_PART, FILE_PART] if file_required else [METADATA_PART]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": required,
                        "properties": {
                            METADATA_PART: _ref(metadata, "validation"),
                            FILE_PART: {"type": "string", "format": "binary", "description": file},
                        },
                    },
                    "encoding": {
                        METADATA_PART: {"contentType": "application/json"},
                        FILE_PART: {"contentType": "application/octet-stream"},
                    },
                }
            },
            "description": (
                f"The `{METADATA_PART}` part must come first: nothing of `{FILE_PART}` is "
                "read before it has been checked."
            ),
        }
    }


def install(app: FastAPI) -> None:
    """Add the schemas the declarations refer to into `app`'s OpenAPI components, and take
    out the 422 FastAPI declares in its own shape on every route with parameters: ours
    are problem documents, declared on the routes that can answer one."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        if ProblemDocument.__name__ not in schemas:
            _drop_fastapi_validation_errors(document)
            schemas.update(_component_schemas(schemas))
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_fastapi_validation_errors(document: dict[str, Any]) -> None:
    fastapi_error = {"$ref": f"{REF_PREFIX}HTTPValidationError"}
    for operations in document["paths"].values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema") == fastapi_error:
                del responses["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        document["components"]["schemas"].pop(name, None)


def _component_schemas(existing: Mapping[str, Any]) -> dict[str, Any]:
    refs, definitions = models_json_schema(
        [(model, mode) for model, mode in _models.items()],
        ref_template=REF_PREFIX + "{model}",
    )
    found: dict[str, Any] = definitions.get("$defs", {})
    for (model, _), ref in refs.items():
        if ref["$ref"] != f"{REF_PREFIX}{model.__name__}":
            raise ValueError(f"two models are named {model.__name__}: rename one")
    for name, schema in found.items():
        if name in existing and existing[name] != schema:
            raise ValueError(f"the schema {name} is declared twice, differently")
    return found
