"""Request bodies: read with an idle timeout and a minimum rate; JSON ones with a size cap,
parsed into models with problem-coded errors.

FastAPI's own body parameters read the whole body before any limit applies and answer
bad JSON in their own shape; reading here gives a 413 before a large body is buffered,
and a distinct code for each way a body can be wrong. uvicorn has no timeout for a body
that stops arriving or trickles in, so such a client would hold what its request began
(an upload to storage, buffers) for as long as it keeps the connection open.
"""

from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from api.idle import IdleGuard, TooSlow
from api.problems import Problem, from_validation_error
from sealstream.settings import Settings

Model = TypeVar("Model", bound=BaseModel)

_JSON_TYPES = ("application/json", "application/problem+json")


async def body_chunks(request: Request, settings: Settings) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive; a 408 problem once none has come for
    `idle_timeout` seconds, or once they come slower than `min_body_rate` (see
    `IdleGuard`). Only the wait for the client is timed, never the caller's own work
    between chunks (a slow storage write, say)."""
    chunks = request.stream()
    guard = IdleGuard(
        settings.idle_timeout, min_rate=settings.min_body_rate, window=settings.body_rate_window
    )
    try:
        while True:
            try:
                chunk = await guard.wait(anext(chunks))
                guard.delivered(len(chunk))
            except StopAsyncIteration:
                return
            except TooSlow:
                raise Problem(
                    408,
                    "body-too-slow",
                    f"the body arrived at under {settings.min_body_rate} bytes a second",
                ) from None
            except TimeoutError:
                raise Problem(
                    408,
                    "body-timeout",
                    f"no byte of the body arrived for {settings.idle_timeout:g} seconds",
                ) from None
            yield chunk
    finally:
        guard.close()


async def read_json_object(request: Request, settings: Settings) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over `settings.max_json_body`."""
    limit = settings.max_json_body
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type.lower() not in _JSON_TYPES:
        raise Problem(415, "unsupported-media-type", "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in body_chunks(request, settings):
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        data = parse_json(body)
    except ValueError as exc:
        raise Problem(400, "invalid-json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Problem(400, "body-not-object", "the body must be a JSON object")
    return data


def parse_json(raw: bytes | bytearray) -> Any:
    """`raw` parsed as JSON by pydantic's parser; a ValueError saying where it fails.

    Not `json.loads`: it recurses once per level of nesting, so a body of a few thousand
    '[' raises RecursionError; it raises a bare ValueError for an integer of over 4300
    digits; and it passes lone surrogate escapes ("\\ud800") into strings that fail later,
    wherever they are encoded (a problem document, a storage key). This parser refuses
    nesting deeper than 200 levels, numbers out of range, invalid UTF-8 and lone
    surrogates, and NaN and Infinity, which JSON does not have.
    """
    return from_json(raw, allow_inf_nan=False)


def parse(model: type[Model], data: dict[str, Any]) -> Model:
    """`data` validated into `model`; a 422 problem listing the fields otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", f"the body exceeds {limit} bytes")
