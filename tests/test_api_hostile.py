"""Hostile input over real HTTP: JSON built to break a parser, in every route that reads JSON
(request bodies and the crypto routes' `metadata` part). Each gets a 4xx problem, and the
server stays healthy."""

from collections.abc import Iterator

import pytest

from tests.conftest import Api, live_api, local_settings
from tests.stream_helpers import DECRYPT, ENCRYPT, KEYS, create_key, post_form, problem

JSON_ROUTES = [
    KEYS,
    f"{KEYS}/import",
    f"{KEYS}/mySymKey",  # PATCH
    "/api/admin/tokens",
    "/api/jobs/verify",
    "/api/jobs/batch-encrypt",
    "/api/jobs/rewrap",
]

# JSON that the standard library's parser fails on with something other than a JSON error,
# or lets through as strings that cannot be encoded again.
HOSTILE_JSON: dict[str, bytes] = {
    "deep-array": b"[" * 20_000 + b"]" * 20_000,
    "deep-object": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "deep-in-a-field": b'{"kid": "mySymKey", "encryptionContext": ' + b"[" * 5_000 + b"}",
    "integer-of-5000-digits": b'{"kid": "mySymKey", "frameLength": ' + b"9" * 5_000 + b"}",
    "lone-surrogate-in-a-value": b'{"kid": "mySymKey", "prefix": "\\ud800/", "key": "\\udc00",'
    b' "tenant": "t", "scopes": ["\\ud800"]}',
    "lone-surrogate-in-a-name": b'{"\\udfff": 1}',
    "nan": b'{"kid": "mySymKey", "frameLength": NaN}',
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One server on the local backend (parsing does not depend on it) with `mySymKey`."""
    with live_api(local_settings(tmp_path_factory.mktemp("hostile"))) as api:
        with api.client() as client:
            create_key(client)
        yield api


@pytest.mark.parametrize("body", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_bodies_are_refused(served: Api, body: bytes) -> None:
    with served.client() as client:
        for path in JSON_ROUTES:
            method = "PATCH" if path.endswith("mySymKey") else "POST"
            response = client.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
            detail = problem(response, 400, "invalid-json")["detail"]
            assert detail.startswith("the body is not valid JSON: "), detail
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("metadata", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_metadata_is_refused(served: Api, metadata: bytes) -> None:
    with served.client() as client:
        for path in (ENCRYPT, DECRYPT):
            detail = problem(post_form(client, path, metadata, b"x"), 400, "invalid-metadata")
            assert detail["detail"].startswith("the metadata part is not valid JSON: ")
        assert client.get("/readyz").status_code == 200


def test_a_wrong_method_is_told_every_method_the_path_takes(served: Api) -> None:
    with served.client() as client:
        response = client.request("OPTIONS", KEYS)
        problem(response, 405, "method-not-allowed")
        assert response.headers["Allow"] == "GET, POST"
