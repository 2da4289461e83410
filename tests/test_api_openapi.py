"""The OpenAPI document: what it declares of the routes that read their own bodies and
answer errors as problem documents, which FastAPI cannot see for itself."""

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from api import create_app
from api.multipart import FILE_PART, METADATA_PART
from tests.conftest import local_settings


def _document() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        document: dict[str, Any] = create_app(local_settings(Path(root))).openapi()
        return document


DOCUMENT = _document()


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            yield method.upper(), path, operation


def test_the_crypto_routes_declare_their_form() -> None:
    for path, metadata in (("encrypt", "EncryptMetadata"), ("decrypt", "DecryptMetadata")):
        operation = DOCUMENT["paths"][f"/api/crypto/stream/{path}"]["post"]
        form = operation["requestBody"]["content"]["multipart/form-data"]
        parts = form["schema"]["properties"]
        assert parts[METADATA_PART] == {"$ref": f"#/components/schemas/{metadata}"}
        assert parts[FILE_PART]["format"] == "binary"
        assert form["encoding"][METADATA_PART]["contentType"] == "application/json"
        assert "kid" in DOCUMENT["components"]["schemas"][metadata]["properties"]
        for status in ("200", "400", "401", "403", "404", "413", "415", "422"):
            assert status in operation["responses"], (path, status)
        assert {"X-Key-Requested", "X-Key-Used", "X-Algorithm-Used"} <= set(
            operation["responses"]["200"]["headers"]
        )
    ranged = DOCUMENT["paths"]["/api/crypto/stream/decrypt"]["post"]["responses"]
    assert ranged["206"]["headers"]["Content-Range"]["required"]
    assert "Content-Range" in ranged["416"]["headers"]


def test_every_error_is_declared_as_a_problem_document() -> None:
    problem = {"$ref": "#/components/schemas/ProblemDocument"}
    for method, path, operation in _operations():
        errors = {s: r for s, r in operation["responses"].items() if s.startswith(("4", "5"))}
        if path.startswith("/api/"):
            assert {"401", "403"} <= set(errors), (method, path)
        for status, declared in errors.items():
            assert declared["content"] == {"application/problem+json": {"schema": problem}}, (
                method,
                path,
                status,
            )
    fields = DOCUMENT["components"]["schemas"]["ProblemDocument"]["properties"]
    assert set(fields) == {"type", "title", "status", "code", "detail", "instance", "errors"}
