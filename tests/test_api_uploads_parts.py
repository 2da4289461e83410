"""A resumable upload's parts in S3 against a bucket writer (moto over HTTP, written with
boto3 directly): a part added to its multipart upload, or one put again with other bytes,
and the upload is refused at completion (502 upload-tampered, counted as a refused upload
record) with nothing made, and aborted at its expiry. A store that lists the parts'
etags unquoted is no tamperer."""

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from services.jobs.redis_store import redis_client
from services.resumable import STATE_KIND, UPLOADS_PREFIX, UploadState, frames_per_part
from services.upload_anchor import UploadAnchor
from tests.conftest import Api, api_settings, live_api
from tests.support.data import MiB, random_bytes
from tests.support.http import create_key, problem, read_object
from tests.support.metrics import scrape, value
from tests.test_api_uploads import FRAME, TUS, create, patch, pending

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tests.support.services import RedisServer

REFUSED = "sealstream_records_refused_total"


@pytest.fixture
def s3_api(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: "RedisServer"
) -> Iterator[Api]:
    with live_api(api_settings("s3", tmp_path, request)) as api:
        api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(redis_server.url, ""))
        yield api


def refused_uploads(api: Api) -> float:
    return value(scrape(api.url)[1], REFUSED, kind="upload")


def change_parts(moto_s3: "S3Client", state: UploadState, change: str) -> None:
    """What a bucket writer without the KEK can do to the upload's parts."""
    number = 3 if change == "added" else 1  # the upload's last part is its second
    moto_s3.upload_part(
        Bucket=state.bucket,
        Key=state.storage_key,
        UploadId=state.upload_id,
        PartNumber=number,
        Body=random_bytes(5 * MiB, seed=42),
    )


@pytest.mark.parametrize("change", ["added", "replaced"])
def test_a_part_changed_in_the_bucket_refuses_the_completion(
    s3_api: Api, moto_s3: "S3Client", change: str
) -> None:
    api = s3_api
    first_part = frames_per_part(1, FRAME) * FRAME  # of plaintext
    data = random_bytes(first_part + 1000, seed=41)
    with api.client() as client:
        create_key(client)
        url = create(client, len(data))
        assert patch(client, url, 0, data[:first_part]).status_code == 204
        name = f"{UPLOADS_PREFIX}{url.rsplit('/', 1)[1]}.json"
        state = api.records.get(STATE_KIND, name, UploadState)
        assert len(state.parts) == 1
        change_parts(moto_s3, state, change)
        before = refused_uploads(api)

        problem(patch(client, url, first_part, data[first_part:]), 502, "upload-tampered")

        assert refused_uploads(api) == before + 1
        problem(read_object(client, "up/obj"), 404, "object-not-found")
        assert client.head(url, headers=TUS).status_code == 502  # not completed by HEAD
        swept = api.parts.uploads().expire(datetime.now(UTC) + timedelta(days=2))
        assert [upload.id for upload in swept.expired] == [state.id]
        assert pending(api) == []
        assert list(api.objects.list(UPLOADS_PREFIX)) == []
        problem(read_object(client, "up/obj"), 404, "object-not-found")


def test_parts_listed_with_their_etags_unquoted_are_those_stored(s3_api: Api) -> None:
    """As some S3-compatible stores list them, where the answer to the upload quoted them."""

    def unquoted(response_dict: dict[str, Any], **_: object) -> None:
        response_dict["body"] = re.sub(
            rb"<ETag>(?:\"|&quot;|&#34;)([^<&\"]*)(?:\"|&quot;|&#34;)</ETag>",
            rb"<ETag>\1</ETag>",
            response_dict["body"],
        )

    store = s3_api.parts.spaces.store("default", None)
    store.client.meta.events.register("before-parse.s3.ListParts", unquoted)  # type: ignore[attr-defined]
    data = random_bytes(frames_per_part(1, FRAME) * FRAME + 1000, seed=43)
    with s3_api.client() as client:
        create_key(client)
        url = create(client, len(data))

        assert patch(client, url, 0, data).status_code == 204

        assert read_object(client, "up/obj").content == data
