"""The API's documentation: served from the package (no CDN, so it works on a host with no
internet access), readable as `SEALSTREAM_API_DOCS` says, and declaring the bearer
scheme so that an API explorer can send a token."""

import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Api, live_api, local_settings

PAGES = ("/docs", "/redoc")
# What a page loads: src="…", href="…", and the OpenAPI document (Swagger UI's url: '…',
# ReDoc's spec-url="…").
_REFERENCES = re.compile(r"""(?:src|href|spec-url)="([^"]*)"|url: '([^']*)'""")
_ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
def docs_api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    """A live API with `api_docs` as the test's parameter (default: the default)."""
    access = getattr(request, "param", None)
    settings = local_settings(tmp_path)
    if access is not None:
        settings = settings.model_copy(update={"api_docs": access})
    with live_api(settings) as api:
        yield api


def references(page: str) -> list[str]:
    return [src or url for src, url in _REFERENCES.findall(page)]


def test_the_pages_and_all_they_load_come_from_the_server(docs_api: Api) -> None:
    """Nothing a page names lies elsewhere, and each thing it names loads: the shipped
    Swagger UI and ReDoc builds, byte for byte."""
    shipped = files("fastapi_offline").joinpath("static")
    with docs_api.client(token=None) as client:
        for path in PAGES:
            page = client.get(path)
            assert page.status_code == 200
            assert "://" not in page.text  # no other origin: no CDN, no fonts
            named = references(page.text)
            assert "/openapi.json" in named and len(named) >= 3, named
            for reference in named:
                assert reference.startswith("/"), reference
                loaded = client.get(reference)
                assert loaded.status_code == 200, reference
                if reference.startswith("/docs/assets/"):
                    name = reference.rsplit("/", 1)[1]
                    assert loaded.content == shipped.joinpath(name).read_bytes()
                    assert _ASSET_TYPES[Path(name).suffix] in loaded.headers["content-type"]
        swagger = client.get("/docs").text
        assert '"validatorUrl": null' in swagger  # never sends the document to be checked


def test_the_openapi_document_declares_the_bearer_scheme(docs_api: Api) -> None:
    with docs_api.client(token=None) as client:
        document: dict[str, Any] = client.get("/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    operations = {
        (method, path): operation
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    guarded = {key for key, operation in operations.items() if "security" in operation}
    assert guarded == {key for key in operations if key[1].startswith("/api/")}
    assert all(operations[key]["security"] == [{"bearer": []}] for key in guarded)
    assert ("get", "/healthz") in operations and ("get", "/healthz") not in guarded


@pytest.mark.parametrize("docs_api", ["token"], indirect=True)
def test_behind_a_token_only_the_document_is_served_and_to_tokens(docs_api: Api) -> None:
    with docs_api.client(token=None) as anonymous:
        refused = anonymous.get("/openapi.json")
        assert refused.status_code == 401
        assert refused.json()["code"] == "missing-token"
    with docs_api.client() as client:
        assert client.get("/openapi.json").json()["info"]["title"] == "sealstream"
        for path in (*PAGES, "/docs/assets/swagger-ui-bundle.js"):
            assert client.get(path).status_code == 404


@pytest.mark.parametrize("docs_api", ["off"], indirect=True)
def test_off_serves_no_documentation(docs_api: Api) -> None:
    with docs_api.client() as client:
        for path in ("/openapi.json", *PAGES, "/docs/assets/swagger-ui-bundle.js"):
            assert client.get(path).status_code == 404
        assert client.get("/healthz").status_code == 200


def test_a_token_is_refused_or_taken_as_before(docs_api: Api) -> None:
    """The bearer scheme reads the header as the API always did: case-insensitive
    scheme, a missing or empty token refused with this API's own problem."""
    url = f"{docs_api.url}/api/key-management/supported-algorithms"
    for header in ("", "Basic abc", "Bearer"):
        refused = httpx.get(url, headers={"Authorization": header} if header else {})
        assert (refused.status_code, refused.json()["code"]) == (401, "missing-token"), header
        assert refused.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(url, headers={"Authorization": "Bearer sst_0000000000000000_" + "x" * 43})
    assert (wrong.status_code, wrong.json()["code"]) == (401, "invalid-token")
    token = docs_api.client().headers["authorization"].split(" ", 1)[1]
    assert httpx.get(url, headers={"Authorization": f"bEaReR  {token}"}).status_code == 200
