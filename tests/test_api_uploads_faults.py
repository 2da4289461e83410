"""Resumable uploads against faults: tuspy through a proxy that cuts its connections at
random offsets, many times in one upload; a server process killed mid-upload and the
upload finished through another. Each time the object decrypts to the file, its verify
job passes, and nothing is left pending."""

import io
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from tusclient import client as tus

from services.jobs.redis_store import redis_client
from services.resumable import UPLOADS_PREFIX
from services.upload_anchor import UploadAnchor
from tests import test_api_uploads
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api, local_settings
from tests.support.cut_proxy import CuttingProxy
from tests.support.data import KiB, MiB, random_bytes
from tests.support.http import create_key, problem, read_object
from tests.support.jobs import finished_job, start_verify
from tests.support.s3_proxy import HeldFirst, S3FaultProxy
from tests.support.services import sealstream_serve
from tests.test_api_uploads import UPLOADS, completed_head, create, offset_of, patch

if TYPE_CHECKING:
    from tests.support.services import RedisServer

FRAME = 64 * KiB
CUTS = 12

# The live server on each backend with its uploads anchored in a redis-server of the
# test's own, as resumable uploads on S3 need.
api = test_api_uploads.api


def uploader(url: str, data: bytes, key: str, **options: Any) -> Any:
    client = tus.TusClient(url + UPLOADS, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    metadata = {"kid": "mySymKey", "destination": key, "frameLength": str(FRAME)}
    return client.uploader(
        file_stream=io.BytesIO(data), metadata=metadata, retry_delay=0.2, **options
    )


def stored_whole(client: httpx.Client, key: str, data: bytes) -> None:
    assert read_object(client, key).content == data
    job = finished_job(client, start_verify(client, key)["id"], timeout=120)
    assert job["status"] == "succeeded", job


def test_tuspy_goes_on_through_connections_cut_at_random_offsets(api: Api) -> None:
    data = random_bytes(7 * MiB + 4321, seed=11)
    rng = random.Random(24)
    # tuspy's connections: POST, PATCH, then HEAD and PATCH after each failure. Each of
    # the first CUTS PATCHes is cut somewhere (perhaps in its headers); the rest run whole.
    whole = 1 << 40
    cuts = [whole]
    for _ in range(CUTS):
        cuts += [rng.randrange(100, 600 * KiB), whole]
    with api.client() as client, CuttingProxy(api.url, cuts) as proxy:
        create_key(client)
        upload = uploader(proxy.url, data, "up/cut", retries=3 * CUTS)

        upload.upload()

        assert proxy.cut == CUTS
        stored_whole(client, "up/cut", data)
    assert api.objects.pending_uploads("tenants/") == []


def send_part_of_patch(url: str, path: str, offset: int, body: bytes, total: int) -> socket.socket:
    """A PATCH that announces `total` bytes and sends only `body`: left hanging."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
        f"Content-Type: application/offset+octet-stream\r\nContent-Length: {total}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_server_killed_mid_upload_is_taken_over_by_another(tmp_path: Path) -> None:
    data = random_bytes(6 * MiB + 999, seed=12)
    # The embedded default: the KEK generated in the storage directory, whose writers hold
    # it anyway, so its uploads need no anchor outside it.
    settings = local_settings(tmp_path)
    env = {
        "SEALSTREAM_STORAGE_URL": settings.storage_url,
        "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
        "SEALSTREAM_UPLOAD_LOCK_SECONDS": "1",
    }
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with sealstream_serve(tmp_path, env) as first:
        with httpx.Client(base_url=first.url, headers=headers, timeout=60) as client:
            create_key(client)
            path = create(client, len(data), key="up/moved", frameLength=str(FRAME))
            assert patch(client, path, 0, data[: 2 * MiB]).status_code == 204
            hanging = send_part_of_patch(first.url, path, 2 * MiB, data[2 * MiB : 3 * MiB], 4 * MiB)
        first.process.kill()  # mid-PATCH: its bytes are lost, and it may hold the lock
        first.process.wait()
        hanging.close()
    with (
        sealstream_serve(tmp_path, env) as second,
        httpx.Client(base_url=second.url, headers=headers, timeout=60) as client,
    ):
        start = offset_of(client, path)
        assert 2 * MiB <= start < len(data)
        upload = uploader(second.url, data, "up/moved", retries=20)
        upload.set_url(second.url + path)
        upload.offset = start

        upload.upload()

        stored_whole(client, "up/moved", data)
        completed_head(client, path, len(data))


def test_a_patch_whose_lock_lapsed_spoils_nothing_of_the_one_that_took_over(
    tmp_path: Path, request: pytest.FixtureRequest, redis_server: "RedisServer", moto_endpoint: str
) -> None:
    """A PATCH stalls (its staging write held on the way to S3) past its lock; another
    takes the upload over and stages more frames; the first wakes and writes its staging
    object: under a name of its own, so the upload still completes and verifies (over one
    name, it replaced the staged bytes the state names, and the upload was refused for
    good), and it is refused, its frames not acknowledged."""
    frame = test_api_uploads.FRAME
    data = random_bytes(4 * frame, seed=31)
    stall = HeldFirst(rb"^PUT \S*\.staged")
    with S3FaultProxy(moto_endpoint, stall) as proxy:
        settings = api_settings("s3", tmp_path, request).model_copy(
            update={"s3_endpoint_url": proxy.url, "upload_lock_seconds": 1.0}
        )
        with live_api(settings) as api, api.client() as client, api.client() as stalled:
            api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(redis_server.url, ""))
            create_key(client)
            url = create(client, len(data))
            stall.arm()
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(patch, stalled, url, 0, data[: 2 * frame])
                assert stall.held.wait(timeout=60)  # frames 1-2 recorded, their staging held
                while (took_over := patch(client, url, 0, data[: 3 * frame])).status_code == 423:
                    time.sleep(0.2)  # until the first one's lock lapses
                assert took_over.status_code == 204, took_over.text
                stall.release()
                problem(first.result(), 423, "upload-locked")

            assert offset_of(client, url) == 3 * frame
            assert patch(client, url, 3 * frame, data[3 * frame :]).status_code == 204
            stored_whole(client, "up/obj", data)
            assert list(api.records.store.list(UPLOADS_PREFIX)) == []  # the stale one too
