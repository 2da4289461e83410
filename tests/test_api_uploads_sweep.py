"""The lifecycle sweep of resumable uploads against the requests under way: an upload a
PATCH holds is left until its lock lapses, a PATCH whose upload was swept under it (its
lock lapsed) answers 404 and leaves nothing behind, and an upload into a bucket its
tenant may no longer use, or a whole one whose state Redis no longer vouches for, is
still aborted, without holding up the others."""

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from sealstream.wiring import open_object_store
from services.jobs.redis_store import redis_client
from services.placement import Spaces
from services.resumable import STATE_KIND, UPLOADS_PREFIX, Swept, UploadState
from services.upload_anchor import KEY_PREFIX, UploadAnchor
from tests import test_api_uploads
from tests.conftest import Api, api_settings, live_api
from tests.support.data import random_bytes
from tests.support.http import create_key, problem, read_object
from tests.support.waiting import wait_until
from tests.test_api_uploads import (
    FRAME,
    TUS,
    complete_parts_failing_once,
    create,
    patch,
    pending,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tests.support.services import RedisServer

# The live server on each backend, its uploads anchored in a redis-server of the test's own.
api = test_api_uploads.api
client = test_api_uploads.client
LATER = timedelta(days=2)  # past any upload's expiry


def state_of(api: Api, url: str) -> UploadState:
    name = f"{UPLOADS_PREFIX}{url.rsplit('/', 1)[1]}.json"
    return api.records.get(STATE_KIND, name, UploadState)


def paused(first: bytes, rest: bytes, let_go: threading.Event) -> Iterator[bytes]:
    """A body sent in two pieces, the second once `let_go` is set."""
    yield first
    let_go.wait(timeout=60)
    yield rest


def nothing_left(api: Api) -> None:
    assert list(api.objects.list(UPLOADS_PREFIX)) == []
    assert pending(api) == []


def test_the_sweep_leaves_an_upload_a_patch_holds(api: Api, client: httpx.Client) -> None:
    data = random_bytes(3 * FRAME, seed=31)
    url = create(client, len(data))
    let_go = threading.Event()
    with ThreadPoolExecutor(1) as pool, api.client() as other:
        body = paused(data[:FRAME], data[FRAME:], let_go)
        patching = pool.submit(patch, other, url, 0, body)
        try:
            wait_until(lambda: state_of(api, url).held, "the PATCH to hold the upload")

            assert api.parts.uploads().expire(datetime.now(UTC) + LATER) == Swept()
        finally:
            let_go.set()
        assert patching.result().status_code == 204

    assert read_object(client, "up/obj").content == data
    nothing_left(api)


@pytest.fixture(params=["local", "s3"])
def short_lock_api(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: "RedisServer"
) -> Iterator[Api]:
    """A live server whose PATCHes hold an upload's lock a moment past each write."""
    settings = api_settings(request.param, tmp_path, request)
    with live_api(settings.model_copy(update={"upload_lock_seconds": 0.2})) as api:
        api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(redis_server.url, ""))
        yield api


def test_a_patch_whose_upload_was_swept_under_it_is_404_and_leaves_nothing(
    short_lock_api: Api,
) -> None:
    api = short_lock_api
    data = random_bytes(3 * FRAME, seed=32)
    let_go = threading.Event()
    with api.client() as client, ThreadPoolExecutor(1) as pool:
        create_key(client)
        url = create(client, len(data))
        patching = pool.submit(patch, client, url, 0, paused(data[:FRAME], data[FRAME:], let_go))
        try:
            wait_until(lambda: state_of(api, url).locked_until is not None, "the PATCH's lock")
            wait_until(lambda: not state_of(api, url).held, "the PATCH's lock to lapse")
            swept = api.parts.uploads().expire(datetime.now(UTC) + LATER)
        finally:
            let_go.set()

        refused = problem(patching.result(), 404, "upload-not-found")
        assert "expired" in refused["detail"] and "completed" not in refused["detail"]
        assert [state.key for state in swept.expired] == ["up/obj"]
        assert client.head(url, headers=TUS).status_code == 404
    nothing_left(api)


def test_a_patch_whose_upload_another_completed_under_it_is_told_so(
    short_lock_api: Api,
) -> None:
    """A PATCH that stalls past its lock, while another sends the whole upload and
    completes it, is answered 404 as an upload completed, not as one expired."""
    api = short_lock_api
    data = random_bytes(3 * FRAME, seed=33)
    let_go = threading.Event()
    with api.client() as client, api.client() as other, ThreadPoolExecutor(1) as pool:
        create_key(client)
        url = create(client, len(data))
        patching = pool.submit(patch, other, url, 0, paused(data[:FRAME], data[FRAME:], let_go))
        try:
            wait_until(lambda: state_of(api, url).locked_until is not None, "the PATCH's lock")
            wait_until(lambda: not state_of(api, url).held, "the PATCH's lock to lapse")
            assert patch(client, url, 0, data).status_code == 204
        finally:
            let_go.set()

        refused = problem(patching.result(), 404, "upload-not-found")
        assert "completed" in refused["detail"], refused
        assert read_object(client, "up/obj").content == data
    nothing_left(api)


def test_the_sweep_aborts_uploads_into_a_bucket_the_tenant_may_no_longer_use(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    s3_bucket: str,
    moto_s3: "S3Client",
    redis_server: "RedisServer",
) -> None:
    """The grant is withdrawn (the service restarted without it): the uploads into that
    bucket are the service's to clean up, and the rest of the sweep goes on."""
    other = f"{s3_bucket}-b"
    moto_s3.create_bucket(Bucket=other)
    settings = api_settings("s3", tmp_path, request).model_copy(
        update={"tenant_buckets": {"default": [other]}, "redis_url": redis_server.url}
    )
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        elsewhere = create(client, 3 * FRAME, key="up/elsewhere", bucket=other)
        assert patch(client, elsewhere, 0, random_bytes(FRAME, seed=33)).status_code == 204
        create(client, 3 * FRAME, key="up/here")
        withdrawn = settings.model_copy(update={"tenant_buckets": {}})
        revoked = dataclasses.replace(
            api.parts,
            settings=withdrawn,
            spaces=Spaces(api.objects, {}, partial(open_object_store, withdrawn)),
        )

        swept = revoked.uploads().expire(datetime.now(UTC) + LATER)

        assert sorted(state.key for state in swept.expired) == ["up/elsewhere", "up/here"]
        assert moto_s3.list_multipart_uploads(Bucket=other).get("Uploads", []) == []
        problem(patch(client, elsewhere, FRAME, b"x" * FRAME), 404, "upload-not-found")
        nothing_left(api)


def test_a_whole_upload_whose_state_redis_refuses_is_aborted_at_its_expiry(
    api: Api,
    client: httpx.Client,
    redis_server: "RedisServer",
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its completion failed, then Redis lost its generation: no request can complete it
    (each is refused), so the sweep aborts it rather than trying again for ever."""
    data = random_bytes(2 * FRAME + 3, seed=34)
    url = create(client, len(data))
    complete_parts_failing_once(api, monkeypatch)
    assert patch(client, url, 0, data).status_code == 503
    upload = url.rsplit("/", 1)[1]
    redis_client(redis_server.url, "").delete(f"{KEY_PREFIX}{upload}")

    swept = api.parts.uploads().expire(datetime.now(UTC) + LATER)

    assert [state.id for state in swept.expired] == [upload]
    problem(read_object(client, "up/obj"), 404, "object-not-found")
    nothing_left(api)
