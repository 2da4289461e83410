"""JSON request bodies read with a size cap, parsed into models with problem-coded errors.

FastAPI's own body parameters read the whole body before any limit applies and answer
bad JSON in their own shape; reading here gives a 413 before a large body is buffered,
and a distinct code for each way a body can be wrong.
"""

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from api.problems import Problem, from_validation_error

Model = TypeVar("Model", bound=BaseModel)

_JSON_TYPES = ("application/json", "application/problem+json")


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over `limit` bytes."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type.lower() not in _JSON_TYPES:
        raise Problem(415, "unsupported-media-type", "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Problem(400, "invalid-json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Problem(400, "body-not-object", "the body must be a JSON object")
    return data


def parse(model: type[Model], data: dict[str, Any]) -> Model:
    """`data` validated into `model`; a 422 problem listing the fields otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", f"the body exceeds {limit} bytes")
