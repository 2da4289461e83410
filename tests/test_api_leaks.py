"""No problem a client reads tells where or how the service keeps things: no server path,
no storage key (`tenants/…`, `sealstream/…`), no metadata sidecar (`.meta`), no storage
endpoint. Each storage failure a request can meet is driven through the live API, on
both backends, and every problem body (a failed job's error included) is searched."""

from pathlib import Path
from typing import Any

import httpx
import pytest

from sealstream.settings import Settings
from sealstream.wiring import local_storage_dir
from tests.conftest import Api, api_settings, live_api, local_settings
from tests.support.http import create_key, encrypt, problem, read_object
from tests.support.jobs import finished_job
from tests.support.ports import LOCALHOST, free_port
from tests.support.s3_proxy import S3FaultProxy, requests_matching

VERIFY = "/api/jobs/verify"
BATCH = "/api/jobs/batch-encrypt"
INTERNAL = ["tenants/", "sealstream/", ".meta"]
LONGEST_KEY = "k" * 1024  # what a client may name; with the tenant's prefix, too long to store


class Answers:
    """Problem documents received, each checked for its status and code."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def expect(self, response: httpx.Response, status: int, code: str) -> dict[str, Any]:
        body = problem(response, status, code)
        self.bodies.append(response.text)
        return body

    def leaks(self, *forbidden: str) -> list[tuple[str, str]]:
        return [(word, body) for body in self.bodies for word in forbidden if word in body]


def batch_request(source: dict[str, str], destination: dict[str, str]) -> dict[str, Any]:
    return {"kid": "mySymKey", "source": source, "destination": destination}


def test_storage_failures_name_only_what_the_client_sent(api: Api) -> None:
    answers = Answers()
    with api.client() as client:
        create_key(client)
        answers.expect(read_object(client, "absent/object"), 404, "object-not-found")
        answers.expect(client.post(VERIFY, json={"key": "absent"}), 404, "object-not-found")
        missing = batch_request({"key": "absent.tar"}, {"prefix": "out/"})
        answers.expect(client.post(BATCH, json=missing), 404, "object-not-found")

        assert encrypt(client, b"taken", destination={"key": "taken"}).status_code == 201
        again = encrypt(client, b"again", destination={"key": "taken"})
        body = answers.expect(again, 409, "object-exists")
        assert "'taken'" in body["detail"]

        too_long = encrypt(client, b"data", destination={"key": LONGEST_KEY})
        answers.expect(too_long, 400, "invalid-object-key")

    assert answers.leaks(*INTERNAL, *_storage_names(api.settings)) == []


def test_local_store_failures_name_no_path(tmp_path: Path) -> None:
    """What only a directory can meet: files put there behind the service's back (no
    metadata sidecar: refused when named, left out of listings), keys that are
    directories, and the directory itself gone."""
    root = tmp_path / "storage"
    answers = Answers()
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        create_key(client)
        dropped = root / "tenants" / "default" / "in" / "dropped.tar"
        dropped.parent.mkdir(parents=True)
        dropped.write_bytes(b"not through the service")

        answers.expect(read_object(client, "in/dropped.tar"), 502, "storage-error")
        answers.expect(client.post(VERIFY, json={"key": "in/dropped.tar"}), 502, "storage-error")
        whole = batch_request({"key": "in/dropped.tar"}, {"prefix": "out/"})
        answers.expect(client.post(BATCH, json=whole), 502, "storage-error")
        listed = client.post(BATCH, json=batch_request({"prefix": "in/"}, {"prefix": "out/"}))
        assert listed.status_code == 202, listed.text
        job = finished_job(client, listed.json()["id"])
        # Listed, a file without metadata is no object: skipped, and the listing goes on.
        assert job["status"] == "succeeded", job
        assert job["result"]["counts"]["items"] == 0, job
        answers.bodies.append(str(job["error"]))

        assert encrypt(client, b"x", destination={"key": "dir/file"}).status_code == 201
        answers.expect(read_object(client, "dir"), 404, "object-not-found")
        over_prefix = encrypt(client, b"x", destination={"key": "dir", "overwrite": True})
        answers.expect(over_prefix, 400, "invalid-object-key")
        under_object = encrypt(client, b"x", destination={"key": "dir/file/below"})
        answers.expect(under_object, 400, "invalid-object-key")

        root.rename(tmp_path / "moved-away")  # at once, whatever jobs still write there
        answers.expect(client.get("/readyz"), 503, "not-ready")
        answers.expect(read_object(client, "dir/file"), 404, "bucket-not-found")

    assert answers.leaks(*INTERNAL, str(root), str(tmp_path)) == []


def test_s3_failures_name_no_endpoint_and_no_key(
    tmp_path: Path, moto_endpoint: str, request: pytest.FixtureRequest
) -> None:
    """An S3 server that fails requests (500s, retried, then given up), and one that
    cannot be reached at all."""
    answers = Answers()
    with S3FaultProxy(moto_endpoint, requests_matching(rb"\S+ \S*/unlucky")) as proxy:
        with live_api(s3_settings(tmp_path, request, proxy.url)) as api, api.client() as client:
            create_key(client)
            answers.expect(read_object(client, "unlucky"), 503, "storage-unavailable")
        assert proxy.failed >= 1
    nowhere = f"http://{LOCALHOST}:{free_port()}"
    with live_api(s3_settings(tmp_path, request, nowhere)) as api, api.client() as client:
        answers.expect(client.get("/readyz"), 503, "not-ready")
        answers.expect(read_object(client, "object"), 503, "storage-unavailable")

    endpoints = [url.removeprefix("http://") for url in (proxy.url, nowhere, moto_endpoint)]
    assert answers.leaks(*INTERNAL, *endpoints) == []


def s3_settings(tmp_path: Path, request: pytest.FixtureRequest, endpoint: str) -> Settings:
    """The suite's S3 settings, reaching the bucket through `endpoint`."""
    settings = api_settings("s3", tmp_path, request)
    return settings.model_copy(update={"s3_endpoint_url": endpoint})


def _storage_names(settings: Settings) -> list[str]:
    """What names where the service keeps its objects: the directory, or the endpoint."""
    directory = local_storage_dir(settings)
    if directory is not None:
        return [str(directory)]
    assert settings.s3_endpoint_url is not None
    return [settings.s3_endpoint_url.removeprefix("http://")]
