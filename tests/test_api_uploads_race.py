"""A resumable upload's state read while a write of it is in flight (moved in Redis, not
yet in the bucket; the write held on its way to S3): a HEAD then answers the offset of
the state the bucket holds, as no tampering; a server killed there leaves an upload that
another server takes up from that state, where bytes sent again must still be those
sent before; and that state put back once the write has landed is refused."""

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from keystore import LocalKek
from services.jobs.redis_store import redis_client
from services.resumable import UPLOADS_PREFIX
from services.upload_anchor import KEY_PREFIX, Anchored, UploadAnchor
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api
from tests.support.data import random_bytes
from tests.support.http import create_key, problem, read_object
from tests.support.s3_proxy import HeldFirst, S3FaultProxy
from tests.support.services import sealstream_serve
from tests.test_api_uploads import FRAME, TUS, create, offset_of, patch
from tests.test_api_uploads_faults import send_part_of_patch
from tests.test_api_uploads_parts import refused_uploads

if TYPE_CHECKING:
    from tests.support.services import RedisServer

# A PATCH short of a part writes the state three times: its lock, the HMACs of its frames
# (before their ciphertext is staged), then the offset past them with the lock let go.
STATE_PUT = rb"^PUT \S*uploads/[0-9a-f]{32}\.json"
LAST_OF_PATCH = 2  # state writes let through before the one held


@pytest.fixture
def held() -> HeldFirst:
    return HeldFirst(STATE_PUT, skip=LAST_OF_PATCH)


@pytest.fixture
def s3_api(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: "RedisServer",
    moto_endpoint: str,
    held: HeldFirst,
) -> Iterator[Api]:
    with S3FaultProxy(moto_endpoint, held) as proxy:
        settings = api_settings("s3", tmp_path, request).model_copy(
            update={"s3_endpoint_url": proxy.url}
        )
        with live_api(settings) as api:
            api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(redis_server.url, ""))
            yield api


def test_a_head_while_the_state_is_written_is_no_tampering_but_a_put_back_state_is(
    s3_api: Api, held: HeldFirst, caplog: pytest.LogCaptureFixture
) -> None:
    data = random_bytes(6 * FRAME, seed=41)
    with s3_api.client() as client:
        create_key(client)
        url = create(client, len(data))
        assert patch(client, url, 0, data[: 2 * FRAME]).status_code == 204
        name = f"{UPLOADS_PREFIX}{url.rsplit('/', 1)[1]}.json"
        before = refused_uploads(s3_api)  # the count is the process's: earlier tests' too
        held.arm()
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(patch, client, url, 2 * FRAME, data[2 * FRAME : 4 * FRAME])
            assert held.held.wait(timeout=60)  # frames 3-4 staged, their offset held
            caplog.clear()

            during = client.head(url, headers=TUS)

            recorded = s3_api.records.store.get(name)
            held.release()
            assert writing.result().status_code == 204
        assert during.status_code == 200, during.text
        assert during.headers["upload-offset"] == str(2 * FRAME)  # what the bucket holds
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert refused_uploads(s3_api) == before
        assert offset_of(client, url) == 4 * FRAME

        s3_api.records.store.put(name, recorded)  # one write behind, its HMACs of 3-4

        assert client.head(url, headers=TUS).status_code == 502
        other = random_bytes(2 * FRAME, seed=42)
        problem(patch(client, url, 2 * FRAME, other), 502, "upload-tampered")
        assert refused_uploads(s3_api) == before + 2


def test_a_server_killed_between_redis_and_the_bucket_leaves_an_upload_that_goes_on(
    tmp_path: Path, redis_server: "RedisServer", moto_endpoint: str, s3_bucket: str
) -> None:
    """Redis holds the state whose write was cut off in flight, the bucket the one before
    (frames 3-4 staged, their HMACs recorded, the offset before them): a crash, not a
    put-back. Another server goes on from the bucket's state, and bytes sent again for
    frames 3-4 must be those sent before."""
    data = random_bytes(6 * FRAME, seed=43)
    held = HeldFirst(STATE_PUT, skip=LAST_OF_PATCH)
    LocalKek.load_or_create(tmp_path / "kek")  # mode 0600
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with S3FaultProxy(moto_endpoint, held) as proxy:
        env = {
            "SEALSTREAM_STORAGE_URL": f"s3://{s3_bucket}",
            "SEALSTREAM_S3_ENDPOINT_URL": proxy.url,
            "SEALSTREAM_KEK_FILE": str(tmp_path / "kek"),
            "SEALSTREAM_REDIS_URL": redis_server.url,
            "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
            "SEALSTREAM_UPLOAD_LOCK_SECONDS": "1",
            "SEALSTREAM_WORKERS": "1",  # the process killed is the one writing
        }
        with sealstream_serve(tmp_path, env) as first:
            with httpx.Client(base_url=first.url, headers=headers, timeout=60) as client:
                create_key(client)
                url = create(client, len(data))
                assert patch(client, url, 0, data[: 2 * FRAME]).status_code == 204
            held.arm()
            body = data[2 * FRAME : 4 * FRAME]
            writing = send_part_of_patch(first.url, url, 2 * FRAME, body, len(body))
            assert held.held.wait(timeout=60)
            first.process.kill()  # moved in Redis, its state not yet in the bucket
            first.process.wait()
            writing.close()
            held.release(fail=True)  # never sent: the server is gone
        with (
            sealstream_serve(tmp_path, env) as second,
            httpx.Client(base_url=second.url, headers=headers, timeout=60) as client,
        ):
            assert offset_of(client, url) == 2 * FRAME
            other = random_bytes(2 * FRAME, seed=44)
            while (refused := patch(client, url, 2 * FRAME, other)).status_code == 423:
                time.sleep(0.2)  # until the killed server's lock lapses
            problem(refused, 409, "resent-bytes-differ")

            assert patch(client, url, 2 * FRAME, data[2 * FRAME :]).status_code == 204

            assert read_object(client, "up/obj").content == data
            assert client.head(url, headers=TUS).status_code == 404


def test_a_step_in_flight_is_taken_over_only_from_the_state_it_replaces(
    redis_server: "RedisServer",
) -> None:
    """The anchor's moves on their own: a request goes on from the state a step in
    flight replaces (superseding it, whose commit then fails) but not from an older one,
    nor once the step is marked written; an anchor of the form before digests is taken at
    its generation."""
    client = redis_client(redis_server.url, "")
    anchor = UploadAnchor(client)
    g1, g2, g3, other = (1, "a1"), (2, "b2"), (3, "c3"), (2, "d4")
    client.set(f"{KEY_PREFIX}up", "1")
    assert anchor.advance("up", g1, g2)  # from the bare generation
    assert not anchor.advance("up", (0, "a1"), other)

    assert anchor.advance("up", g1, other)  # g2's writer died in flight
    assert not anchor.commit("up", g1, g2)
    assert anchor.commit("up", g1, other)

    current = anchor.current("up")
    assert isinstance(current, Anchored)
    assert current.accepts(*other) and not current.accepts(*g1)
    assert not anchor.advance("up", g1, g2)  # written: the state before is refused
    assert anchor.advance("up", other, g3)
    anchor.undo("up", other, g3)  # g3 never written: `other` is the upload's again
    assert anchor.current("up") == Anchored(*other)
