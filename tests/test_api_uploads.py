"""Resumable encrypt-to-storage over the tus 1.0 protocol, through a live server on each
backend: tuspy (the reference tus client) uploads, the object decrypts and its verify job
checks the recorded frame chain; bytes sent again must be those sent before; another
tenant finds no upload; terminated and expired uploads leave nothing pending; a state put
back from an older copy, or an upload brought back after it ended, is refused with nothing
sealed (its generation is anchored in Redis); a move of the generation a Redis replica
does not confirm is refused and undone."""

import base64
import dataclasses
import errno
import hashlib
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
from tusclient import client as tus

from audit import AUDIT_KEY_PURPOSE
from audit.reading import authentic_events
from keystore import LocalKek
from sealstream.settings import Settings
from sealstream_client import SealstreamClient, UploadLengthMismatch, UploadNotConfirmed
from sealstream_client.client import ResumableResult
from services import resumable
from services.frame_chain import FrameChain
from services.jobs.redis_store import redis_client
from services.replicas import Replicas
from services.resumable import (
    STATE_KIND,
    UPLOADS_PREFIX,
    Appending,
    Swept,
    UploadBusy,
    Uploads,
    UploadState,
    completion_name,
    staging_name,
    state_digest,
)
from services.unfinished import finish_recording
from services.upload_anchor import KEY_PREFIX, UploadAnchor
from storage import ObjectNotFound, ObjectStore, PartUpload, StorageUnavailable, integrity
from storage.records import RECORDS_PREFIX, load_record, save_record
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api, local_settings
from tests.support.data import KiB, MiB, random_bytes
from tests.support.http import create_key, encrypt, problem, read_object
from tests.support.jobs import REPLICA_TIMEOUT, finished_job, start_verify
from tests.support.ports import free_port
from tests.support.sentinel import MASTER, process_id
from tests.test_api_objects import tenant_client
from workers.lifecycle import run_sweeps

if TYPE_CHECKING:
    from api.services import Services
    from tests.support.services import RedisServer

UPLOADS = "/api/uploads"
FRAME = 256 * KiB
TUS = {"Tus-Resumable": "1.0.0"}


def tus_metadata(**fields: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in fields.items())


def post_upload(
    client: httpx.Client, length: int, key: str = "up/obj", **more: str
) -> httpx.Response:
    fields = {"kid": "mySymKey", "destination": key, "frameLength": str(FRAME), **more}
    return client.post(
        UPLOADS,
        headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": tus_metadata(**fields)},
    )


def create(client: httpx.Client, length: int, key: str = "up/obj", **more: str) -> str:
    response = post_upload(client, length, key, **more)
    assert response.status_code == 201, response.text
    location: str = response.headers["location"]
    return location


def patch(
    client: httpx.Client, url: str, offset: int, body: bytes | Iterator[bytes]
) -> httpx.Response:
    headers = {
        **TUS,
        "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream",
    }
    return client.patch(url, headers=headers, content=body)


def offset_of(client: httpx.Client, url: str) -> int:
    response = client.head(url, headers=TUS)
    assert response.status_code == 200
    return int(response.headers["upload-offset"])


def completed_head(client: httpx.Client, url: str, length: int) -> None:
    """A HEAD of an upload completed already, while its tombstone lives: its full
    offset, as tusd answers a finished upload, said completed."""
    head = client.head(url, headers=TUS)
    answered = (
        head.status_code,
        head.headers.get("upload-offset"),
        head.headers.get("upload-length"),
    )
    assert answered == (200, str(length), str(length))
    assert head.headers.get("x-upload-completed") == "1"


def tus_uploader(api: Api, data: bytes, key: str, **options: Any) -> Any:
    client = tus.TusClient(api.url + UPLOADS, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    metadata = {"kid": "mySymKey", "destination": key, "frameLength": str(FRAME)}
    return client.uploader(file_stream=io.BytesIO(data), metadata=metadata, **options)


def chain_of(data: bytes) -> str:
    chain = FrameChain(FRAME)
    chain.update(data)
    return chain.hexdigest()


def staging_of(api: Api, upload: str) -> str:
    """The name of the staging object the upload's state names."""
    state = api.records.get(STATE_KIND, f"{UPLOADS_PREFIX}{upload}.json", UploadState)
    return staging_name(upload, state.staging)


def staging_objects(store: ObjectStore, upload: str) -> list[str]:
    return [o.key for o in store.list(f"{UPLOADS_PREFIX}{upload}.") if o.key.endswith(".staged")]


def pending(api: Api) -> list[str]:
    return api.objects.pending_uploads("tenants/")  # the service writes its records meanwhile


@pytest.fixture(params=["local", "s3"])
def api(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: "RedisServer"
) -> Iterator[Api]:
    """A live API server on each backend, its uploads anchored in a redis-server of the
    test's own; its jobs run in the process (SEALSTREAM_REDIS_URL would send them to
    Celery), so the anchor is given to the server's parts directly."""
    with live_api(api_settings(request.param, tmp_path, request)) as api:
        api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(redis_server.url, ""))
        yield api


@pytest.fixture(params=["local", "s3"])
def redis_api(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: "RedisServer"
) -> Iterator[Api]:
    """A live API server on each backend with SEALSTREAM_REDIS_URL set."""
    settings = api_settings(request.param, tmp_path, request)
    with live_api(settings.model_copy(update={"redis_url": redis_server.url})) as api:
        yield api


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with api.client() as client:
        create_key(client)
        yield client


def test_tuspy_uploads_a_sealed_object_that_decrypts_and_verifies(
    api: Api, client: httpx.Client
) -> None:
    data = random_bytes(11 * MiB + 12_345, seed=1)  # three parts, the last short
    uploader = tus_uploader(api, data, "up/tuspy", chunk_size=3 * MiB + 1000)

    uploader.upload()

    assert read_object(client, "up/tuspy").content == data
    record = load_record(api.records, api.objects.bucket, "tenants/default/up/tuspy")
    assert (record.plaintext_size, record.plaintext_frame_chain) == (len(data), chain_of(data))
    job = finished_job(client, start_verify(client, "up/tuspy")["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert pending(api) == []
    assert list(api.objects.list(UPLOADS_PREFIX)) == []
    # The verify job checks the chain: a record that names another fails it.
    wrong = record.model_copy(update={"plaintext_frame_chain": chain_of(data[:-1])})
    save_record(api.records, wrong)
    job = finished_job(client, start_verify(client, "up/tuspy")["id"], timeout=120)
    assert (job["status"], job["error"]["code"]) == ("failed", "plaintext-digest-mismatch"), job


def test_the_offset_moves_by_whole_frames_and_a_cut_frame_is_sent_again(
    api: Api, client: httpx.Client
) -> None:
    data = random_bytes(3 * FRAME + 100, seed=2)
    url = create(client, len(data))

    answered = patch(client, url, 0, data[: FRAME + 5000])

    assert answered.status_code == 204, answered.text
    assert answered.headers["upload-offset"] == str(FRAME) == str(offset_of(client, url))
    assert patch(client, url, FRAME, data[FRAME:]).status_code == 204
    assert read_object(client, "up/obj").content == data


def test_bytes_sent_again_after_a_lost_acknowledgement_must_match(
    api: Api, client: httpx.Client, redis_server: "RedisServer"
) -> None:
    data = random_bytes(4 * FRAME, seed=5)
    url = create(client, len(data))
    name = f"{UPLOADS_PREFIX}{url.rsplit('/', 1)[1]}.json"
    before = api.records.get(STATE_KIND, name, UploadState)
    assert patch(client, url, 0, data[: 2 * FRAME]).status_code == 204
    recorded = api.records.get(STATE_KIND, name, UploadState)
    # Put the state back as a server that sealed frames 1-2 and died before it
    # acknowledged them left it: their HMACs recorded, the offset still 0 (the part so
    # far the header alone, which the state holds).
    uploads = api.parts.uploads()
    lost = before.model_copy(
        update={
            "generation": recorded.generation,
            "macs": {
                str(n): uploads.frame_mac(
                    before, n, hashlib.sha256(data[(n - 1) * FRAME : n * FRAME]).digest()
                )
                for n in (1, 2)
            },
        }
    )
    api.records.put(STATE_KIND, name, lost)
    anchored = f"{lost.generation}:{state_digest(lost)}"
    redis_client(redis_server.url, "").set(f"{KEY_PREFIX}{lost.id}", anchored, keepttl=True)
    assert recorded.offset == 2 * FRAME and offset_of(client, url) == 0

    refused = patch(client, url, 0, random_bytes(2 * FRAME, seed=6))

    problem(refused, 409, "resent-bytes-differ")
    assert offset_of(client, url) == 0
    assert patch(client, url, 0, data).status_code == 204
    assert read_object(client, "up/obj").content == data


def test_parts_are_acknowledged_once_synced_their_hmacs_recorded_before_they_are_stored(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resumable, "SYNC_FRAMES", 128)  # two parts of 64 frames
    data = random_bytes(50 * MiB, seed=7)
    url = create(client, len(data))
    upload = url.rsplit("/", 1)[1]
    appending = api.parts.uploads().begin("default", upload, 0, None, lambda state: None)
    per_part = appending.state.frames_per_part * FRAME
    name = f"{UPLOADS_PREFIX}{upload}.json"

    stored: list[int] = []
    put_part = ObjectStore.put_part

    def checked_put_part(store: ObjectStore, upload: PartUpload, number: int, *args: Any) -> Any:
        # Every frame of a part is acknowledged or has its HMAC recorded before it is stored.
        state = api.records.get(STATE_KIND, name, UploadState)
        last = min(number * per_part // FRAME, state.total_frames)
        frames = range((number - 1) * per_part // FRAME + 1, last + 1)
        assert all(n <= state.frames or str(n) in state.macs for n in frames)
        stored.append(number)
        return put_part(store, upload, number, *args)

    monkeypatch.setattr(ObjectStore, "put_part", checked_put_part)
    appending.write(data[: 3 * per_part + FRAME])  # three parts sealed, two stored at least
    mid_patch = api.records.get(STATE_KIND, name, UploadState)

    # Never the first part alone: it is acknowledged with the second, whose store syncs
    # both, once the third part's HMACs are written.
    assert (mid_patch.offset, mid_patch.frames) in ((0, 0), (2 * per_part, 2 * per_part // FRAME))
    # The third part's HMACs are recorded, or being recorded, while the second is stored.
    recorded = {int(n) for n in mid_patch.macs}
    parts = (2, 3) if mid_patch.frames == 0 else (3,)
    assert recorded in [set(range(mid_patch.frames + 1, n * per_part // FRAME + 1)) for n in parts]
    # A PATCH cut there acknowledges every whole frame it received: synced at its end.
    assert appending.end().offset == 3 * per_part + FRAME == offset_of(client, url)
    assert api.records.get(STATE_KIND, name, UploadState).macs == {}
    assert patch(client, url, 3 * per_part + FRAME, data[3 * per_part + FRAME :]).status_code == 204
    assert read_object(client, "up/obj").content == data
    assert stored == [1, 2, 3, 4]


def test_a_part_waiting_past_half_its_lock_is_not_stored_once_the_upload_is_taken_over(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH's part waits for the store of the part before, which stalls past the lock
    its record renewed; another request takes the upload over and stores the same parts.
    The stalled PATCH must not put its next part again (on S3 under SSE-KMS the new etag
    would not match the one the other request recorded): its lock is renewed before the
    store, and the renewal finds the upload taken (423)."""
    monkeypatch.setattr(resumable, "PART_TARGET", 5 * MiB)  # S3's least: parts of 20 frames
    data = random_bytes(4 * 5 * MiB + FRAME, seed=23)
    url = create(client, len(data))
    upload = url.rsplit("/", 1)[1]
    short = api.parts.uploads()
    short.lock_for = timedelta(seconds=1)
    stalling = short.begin("default", upload, 0, None, lambda state: None)
    per_part = stalling.state.frames_per_part * FRAME
    put_part = ObjectStore.put_part
    puts: list[int] = []

    def stalled_put_part(store: ObjectStore, part: PartUpload, number: int, *args: Any) -> Any:
        puts.append(number)
        if puts.count(2) == 1 and number == 2:
            time.sleep(2.5)  # the stalling PATCH's store of part 2, past its lock
        return put_part(store, part, number, *args)

    monkeypatch.setattr(ObjectStore, "put_part", stalled_put_part)
    stalling.write(data[: 3 * per_part])  # part 1 stored, part 2 storing, part 3 recorded
    time.sleep(1.3)
    offset = offset_of(client, url)
    assert patch(client, url, offset, data[offset : 4 * per_part]).status_code == 204

    with pytest.raises(UploadBusy):
        stalling.write(data[3 * per_part : 4 * per_part])
    stalling.abandon()

    assert puts.count(3) == 1  # the request that took the upload over put it, once
    assert patch(client, url, 4 * per_part, data[4 * per_part :]).status_code == 204
    assert read_object(client, "up/obj").content == data


def test_an_abandon_begun_while_a_write_runs_waits_for_it(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled while its write runs on a thread (twice: a server forced to
    quit) may begin its abandon on another: that waits for the write to end, so two
    threads never use one upload's state."""
    data = random_bytes(2 * FRAME, seed=24)
    url = create(client, len(data))
    appending = api.parts.uploads().begin("default", url.rsplit("/", 1)[1], 0, None, print)
    sealed_after = Appending._sealed_after

    def slow_sealed_after(self: Appending, *args: Any) -> Any:
        time.sleep(1.0)
        return sealed_after(self, *args)

    monkeypatch.setattr(Appending, "_sealed_after", slow_sealed_after)
    ended: dict[str, float] = {}

    def write() -> None:
        appending.write(data)
        ended["write"] = time.monotonic()

    writing = threading.Thread(target=write)
    writing.start()
    time.sleep(0.3)
    appending.abandon()
    ended["abandon"] = time.monotonic()
    writing.join(timeout=30)

    assert ended["abandon"] >= ended["write"]
    offset = offset_of(client, url)  # the lock let go of: the upload goes on
    assert patch(client, url, offset, data[offset:]).status_code == 204
    assert read_object(client, "up/obj").content == data


class FailingOnce:
    """`os.fsync` failing once with EIO for a file whose path holds `marker`, as Linux
    reports a failed writeback: once, after which its pages are clean and a sync succeeds."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.failed = False
        self._fsync = os.fsync

    def __call__(self, descriptor: int) -> None:
        if not self.failed and self.marker in str(Path(f"/proc/self/fd/{descriptor}").readlink()):
            self.failed = True
            raise OSError(errno.EIO, "Input/output error (injected)")
        self._fsync(descriptor)


@pytest.mark.parametrize("api", ["local"], indirect=True)
@pytest.mark.parametrize("failing", ["a part's sync", "the sync at the patch's end"])
def test_parts_stored_since_a_sync_that_failed_are_never_acknowledged(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    data = random_bytes(40 * MiB, seed=8)
    url = create(client, len(data))
    upload = url.rsplit("/", 1)[1]
    state = api.records.get(STATE_KIND, f"{UPLOADS_PREFIX}{upload}.json", UploadState)
    per_part = state.frames_per_part * FRAME
    # Synced every two parts; the PATCH ends either just after the second part (its
    # sync fails) or a frame into it (the final sync fails).
    monkeypatch.setattr(resumable, "SYNC_FRAMES", 2 * state.frames_per_part)
    sent = 2 * per_part if failing == "a part's sync" else per_part + FRAME
    fsync = FailingOnce(state.upload_id)  # the part file's name holds it
    monkeypatch.setattr(os, "fsync", fsync)

    problem(patch(client, url, 0, data[:sent]), 503, "storage-unavailable")

    assert fsync.failed
    # The first part's bytes were in the writeback that failed: the sync retried when
    # the PATCH let go of the upload succeeds, yet they may not be on disk.
    assert offset_of(client, url) == 0
    assert patch(client, url, 0, data).status_code == 204
    assert read_object(client, "up/obj").content == data


@pytest.mark.parametrize("api", ["s3"], indirect=True)
def test_uploads_are_refused_over_a_redis_that_may_lose_what_it_answered(
    api: Api, client: httpx.Client, redis_server: "RedisServer"
) -> None:
    redis = redis_client(redis_server.url, "")
    anchor = UploadAnchor(redis, recheck=timedelta(0))  # what Redis says is asked each time
    api.parts.__dict__["upload_anchor"] = anchor
    url = create(client, 2 * FRAME)
    redis.config_set("appendfsync", "everysec")  # a crash loses up to a second

    refused = problem(
        post_upload(client, FRAME, "up/other"), 503, "resumable-uploads-need-durable-redis"
    )
    assert "appendfsync always" in refused["detail"]
    problem(patch(client, url, 0, b"x" * FRAME), 503, "resumable-uploads-need-durable-redis")
    redis.config_set("appendonly", "no")
    assert client.head(url, headers=TUS).status_code == 503  # a HEAD's answer has no body

    redis.config_set("appendonly", "yes")
    redis.config_set("appendfsync", "always")
    assert patch(client, url, 0, b"x" * 2 * FRAME).status_code == 204
    vouched = UploadAnchor(redis, vouched=True)
    redis.config_set("appendonly", "no")
    api.parts.__dict__["upload_anchor"] = vouched
    assert post_upload(client, FRAME, "up/vouched").status_code == 201


@pytest.mark.parametrize("api", ["s3"], indirect=True)
def test_a_redis_that_hides_its_configuration_is_taken_for_what_it_can_prove(
    api: Api, client: httpx.Client, redis_server: "RedisServer"
) -> None:
    admin = redis_client(redis_server.url, "")
    # As managed Redis services do: CONFIG refused (the server syncs each write all the same).
    admin.acl_setuser(
        "uploads", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"]
    )
    limited = redis_client(redis_server.url.replace("//", "//uploads:pw@", 1), "")
    api.parts.__dict__["upload_anchor"] = UploadAnchor(limited)

    answered = post_upload(client, 2 * FRAME)

    version = str(admin.info("server")["redis_version"]).split(".")
    if (int(version[0]), int(version[1])) < (7, 2):  # no WAITAOF: nothing shows a write kept
        problem(answered, 503, "resumable-uploads-need-durable-redis")
        return
    # Each move waited for until the append-only file on disk has it.
    assert answered.status_code == 201
    assert patch(client, answered.headers["location"], 0, b"x" * 2 * FRAME).status_code == 204


def test_another_tenant_finds_no_upload(api: Api, client: httpx.Client) -> None:
    url = create(client, 10)
    with tenant_client(api, client, "other", "crypto:encrypt") as other:
        assert other.head(url, headers=TUS).status_code == 404
        problem(patch(other, url, 0, b"x" * 10), 404, "upload-not-found")
        problem(other.delete(url, headers=TUS), 404, "upload-not-found")
    assert offset_of(client, url) == 0


def test_a_patch_that_could_not_move_the_offset_is_refused(api: Api, client: httpx.Client) -> None:
    url = create(client, 2 * FRAME)

    problem(patch(client, url, 0, b"x" * 1000), 400, "patch-too-short")
    problem(patch(client, url, 0, iter([b"x" * 1000])), 400, "patch-too-short")  # chunked
    assert client.post("/api/uploads", headers=TUS).status_code == 400  # no Upload-Length
    assert patch(client, url, 0, b"x" * FRAME).status_code == 204
    assert patch(client, url, FRAME, b"x" * FRAME).status_code == 204
    problem(post_upload(client, 1), 409, "object-exists")
    create_key(client, kid="exportable", exportable=True)
    problem(post_upload(client, 1, "up/x", kid="exportable"), 422, "resumable-upload-unsupported")
    url = create(client, 2 * FRAME, key="up/other")
    problem(patch(client, url, 5, b"x" * FRAME), 409, "upload-offset-mismatch")
    problem(patch(client, url, 0, b"x" * (2 * FRAME + 1)), 400, "upload-length-exceeded")
    assert offset_of(client, url) == 0


def test_termination_and_expiry_leave_nothing_pending(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(2 * FRAME, seed=7)
    ended = create(client, 3 * FRAME, key="up/ended")
    assert patch(client, ended, 0, data).status_code == 204
    expiring = create(client, 3 * FRAME, key="up/expiring")
    assert patch(client, expiring, 0, data).status_code == 204
    assert pending(api) == ["tenants/default/up/ended", "tenants/default/up/expiring"]

    refused: list[Any] = []
    monkeypatch.setattr(integrity, "note_refusal", lambda *refusal: refused.append(refusal))
    assert api.parts.uploads().expire() == Swept()
    assert refused == []  # their staging objects are not taken for tampered records

    assert client.delete(ended, headers=TUS).status_code == 204
    swept = api.parts.uploads().expire(datetime.now(UTC) + timedelta(days=2))

    assert [state.key for state in swept.expired] == ["up/expiring"]
    assert pending(api) == []
    assert list(api.objects.list(UPLOADS_PREFIX)) == []
    assert client.head(expiring, headers=TUS).status_code == 404


def test_an_upload_over_an_object_whose_record_was_not_saved_is_read_through_its_intent(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its intent outnumbers the record of the object it replaced, so a read between the
    upload's completion and its record (here, a record that failed to save) gets it."""
    old, new = random_bytes(5000, seed=7), random_bytes(FRAME + 100, seed=8)
    assert encrypt(client, old, destination={"key": "up/obj"}).status_code == 201
    url = create(client, len(new), overwrite="true")
    put = api.records.store.put

    def records_unsaved(key: str, data: bytes, **conditions: Any) -> Any:
        if key.startswith(RECORDS_PREFIX):
            raise StorageUnavailable("cut off", key)
        return put(key, data, **conditions)

    with monkeypatch.context() as cut_off:
        cut_off.setattr(api.records.store, "put", records_unsaved)
        assert patch(client, url, 0, new).status_code == 503

    assert read_object(client, "up/obj").content == new


def test_a_bucket_writer_cannot_swap_staged_bytes_or_state_undetected(
    api: Api, client: httpx.Client
) -> None:
    data = random_bytes(4 * FRAME, seed=8)
    url = create(client, len(data))
    assert patch(client, url, 0, data[:FRAME]).status_code == 204  # staged: short of a part
    upload = url.rsplit("/", 1)[1]
    staged = staging_of(api, upload)
    genuine = api.records.store.get(staged)
    api.records.store.put(staged, genuine[:-1] + bytes([genuine[-1] ^ 1]))

    problem(patch(client, url, FRAME, data[FRAME:]), 502, "upload-tampered")

    api.records.store.put(staged, genuine)
    name = f"{UPLOADS_PREFIX}{upload}.json"
    sealed = api.records.store.get(name)
    rolled = sealed.replace(f'"offset": {FRAME}'.encode(), b'"offset": 0')
    assert rolled != sealed
    api.records.store.put(name, rolled)
    assert client.head(url, headers=TUS).status_code == 502  # refused, never believed
    api.records.store.put(name, sealed)
    assert patch(client, url, FRAME, data[FRAME:]).status_code == 204
    assert read_object(client, "up/obj").content == data


def test_an_object_stored_meanwhile_ends_the_upload_that_may_not_replace_it(
    api: Api, client: httpx.Client
) -> None:
    data = random_bytes(2 * FRAME, seed=9)
    url = create(client, len(data), key="up/raced")
    assert encrypt(client, b"first", destination={"key": "up/raced"}).status_code == 201

    problem(patch(client, url, 0, data), 409, "object-exists")

    assert client.head(url, headers=TUS).status_code == 404
    assert pending(api) == []
    assert read_object(client, "up/raced").content == b"first"


def test_a_state_put_back_from_an_older_copy_is_refused_with_nothing_sealed(
    redis_api: Api,
) -> None:
    """A bucket writer copies the state after creation, and puts it back once frames 1-2
    are sealed: other bytes for those frames would be sealed under the same data key and
    IVs. The state's generation is not Redis's: refused."""
    with redis_api.client() as client:
        create_key(client)
        url = create(client, 4 * FRAME)
        upload = url.rsplit("/", 1)[1]
        name = f"{UPLOADS_PREFIX}{upload}.json"
        store = redis_api.records.store
        copy = store.get(name)
        assert patch(client, url, 0, random_bytes(2 * FRAME, seed=11)).status_code == 204
        staged = staging_of(redis_api, upload)
        sealed = store.get(staged)
        store.put(name, copy)

        assert client.head(url, headers=TUS).status_code == 502
        problem(patch(client, url, 0, random_bytes(2 * FRAME, seed=12)), 502, "upload-tampered")

        # Nothing sealed from other bytes: the one staging object is the first bytes'.
        assert staging_objects(store, upload) == [staged]
        assert store.get(staged) == sealed


def test_a_finished_upload_cannot_be_brought_back_from_its_first_copies(
    redis_api: Api,
) -> None:
    data = random_bytes(2 * FRAME + 5, seed=13)
    with redis_api.client() as client:
        create_key(client)
        url = create(client, len(data))
        upload = url.rsplit("/", 1)[1]
        name = f"{UPLOADS_PREFIX}{upload}.json"
        store = redis_api.records.store
        copy = store.get(name)
        assert patch(client, url, 0, data).status_code == 204
        store.put(name, copy)

        completed_head(client, url, len(data))  # completed, whatever state is there
        problem(patch(client, url, 0, random_bytes(2 * FRAME, seed=14)), 404, "upload-not-found")

        assert staging_objects(store, upload) == []  # nothing sealed from other bytes
        assert read_object(client, "up/obj").content == data


def test_a_move_no_replica_confirms_is_refused_and_undone(
    tmp_path: Path, sentinel: tuple[str, list[int]]
) -> None:
    """Each move of an upload's generation waits for a replica: one the replica does not
    confirm (held back) is answered 503 and undone, so that the upload goes on from where
    it was, rather than being refused as put back."""
    url, (_, second, _) = sentinel
    anchor = UploadAnchor(redis_client(url, MASTER), Replicas(1, REPLICA_TIMEOUT))
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        api.parts.__dict__["upload_anchor"] = anchor
        create_key(client)
        location = create(client, 2 * FRAME)
        replica = process_id(second)
        os.kill(replica, signal.SIGSTOP)
        try:
            refused = patch(client, location, 0, random_bytes(FRAME, seed=21))
        finally:
            os.kill(replica, signal.SIGCONT)
        problem(refused, 503, "redis-not-replicated")

        assert offset_of(client, location) == 0
        data = random_bytes(2 * FRAME, seed=22)
        assert patch(client, location, 0, data).status_code == 204
        assert read_object(client, "up/obj").content == data


def test_a_completion_whose_end_no_replica_confirms_is_answered_as_completed(
    tmp_path: Path, sentinel: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is made and recorded before the upload's tombstone is left: a replica
    that does not confirm the tombstone does not turn the completion into a 503."""
    url, (_, second, _) = sentinel
    anchor = UploadAnchor(redis_client(url, MASTER), Replicas(1, REPLICA_TIMEOUT))
    replica = process_id(second)
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        api.parts.__dict__["upload_anchor"] = anchor
        create_key(client)
        location = create(client, 2 * FRAME)
        store_class = type(api.parts.spaces.store("default", api.objects.bucket))
        real = store_class.complete_parts

        def replica_held(self: Any, *args: Any, **kwargs: Any) -> Any:
            os.kill(replica, signal.SIGSTOP)  # every move before this one was confirmed
            return real(self, *args, **kwargs)

        monkeypatch.setattr(store_class, "complete_parts", replica_held)
        data = random_bytes(2 * FRAME, seed=23)
        try:
            answer = patch(client, location, 0, data)
        finally:
            os.kill(replica, signal.SIGCONT)

        assert answer.status_code == 204, answer.text
        assert answer.headers["upload-offset"] == str(len(data))
        assert read_object(client, "up/obj").content == data
        completed_head(client, location, len(data))
        assert list(api.objects.list(UPLOADS_PREFIX)) == []


def kek_elsewhere(tmp_path: Path) -> Settings:
    """A local directory whose KEK is not in it: its writers do not hold the KEK."""
    kek_file = tmp_path / "kek"
    LocalKek.load_or_create(kek_file)
    return local_settings(tmp_path).model_copy(update={"kek_file": kek_file})


@pytest.mark.parametrize("where", ["s3", "local-kek-elsewhere"])
def test_resumable_uploads_without_redis_are_refused_where_writers_lack_the_kek(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    settings = api_settings("s3", tmp_path, request) if where == "s3" else kek_elsewhere(tmp_path)
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        problem(post_upload(client, 10), 501, "resumable-uploads-need-redis")
        assert pending(api) == []


def complete_parts_failing_once(
    api: Api, monkeypatch: pytest.MonkeyPatch, *, made: bool = False
) -> None:
    """The store's first completion fails: before it (the store unreachable) or, `made`,
    after the object is made (its answer lost, as a crash there would leave it)."""
    store_class = type(api.parts.spaces.store("default", api.objects.bucket))
    real = store_class.complete_parts
    calls = []

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            if made:
                real(self, *args, **kwargs)
            raise StorageUnavailable("cut off", "complete")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_class, "complete_parts", flaky)


@pytest.mark.parametrize("made", [False, True], ids=["not-made", "made"])
@pytest.mark.parametrize("completes", ["head", "sweep"])
def test_an_upload_whose_completion_failed_is_completed_not_lost(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, completes: str, made: bool
) -> None:
    """A tus client that finds the full offset sends nothing more: the object must exist,
    recorded and its verify job started, whether the failed completion had made it or
    not (on S3 the object's etag proves it made from the upload's parts; on a local
    directory it is read back and must be the message the state records), whether a
    HEAD or the sweep completes it."""
    data = random_bytes(2 * FRAME + 3, seed=15)
    url = create(client, len(data))
    complete_parts_failing_once(api, monkeypatch, made=made)
    assert patch(client, url, 0, data).status_code == 503

    if completes == "head":
        head = client.head(url, headers=TUS)
        assert (head.status_code, head.headers["upload-offset"]) == (200, str(len(data)))
        job_id = head.headers["x-verify-job"]
    else:
        expire = Uploads.expire
        later = datetime.now(UTC) + timedelta(days=2)
        monkeypatch.setattr(Uploads, "expire", lambda uploads, now=None: expire(uploads, later))
        runner = cast("Services", api.parts).runner
        swept = run_sweeps(api.parts, runner.submit)
        assert swept["expiredUploads"] == 0
        (job_id,) = swept["completedUploads"]
        assert api.parts.audit.flush()
        audit_key = api.records.key.derive(AUDIT_KEY_PURPOSE)
        assert ("upload-completed", "default", "up/obj") in [
            (event["action"], event["tenant"], event.get("object"))
            for event in authentic_events(api.objects, audit_key)
            if event["type"] == "lifecycle"
        ]

    job = finished_job(client, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert read_object(client, "up/obj").content == data
    record = load_record(api.records, api.objects.bucket, "tenants/default/up/obj")
    assert (record.plaintext_size, record.plaintext_frame_chain) == (len(data), chain_of(data))
    completed_head(client, url, len(data))
    assert pending(api) == []
    assert list(api.objects.list(UPLOADS_PREFIX)) == []


def etags_not_derived_from_parts(api: Api, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """The object at `key` has an etag that is not the MD5 of its parts' etags (32 hex
    digits each, as S3 answers under SSE-KMS): stable, but no digest of its parts."""
    store_class = type(api.parts.spaces.store("default", api.objects.bucket))
    real = store_class.head

    def kms_head(self: Any, name: str) -> Any:
        info = real(self, name)
        if not name.endswith(key):
            return info
        disguised = hashlib.sha256(info.etag.encode()).hexdigest()[:32]
        return dataclasses.replace(info, etag=f'"{disguised}-1"')

    monkeypatch.setattr(store_class, "head", kms_head)


@pytest.mark.parametrize("api", ["s3"], indirect=True)
def test_a_completion_cut_off_is_completed_where_etags_are_no_digests_of_the_parts(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where an object's etag is not the MD5 of its parts' (S3 under SSE-KMS), the
    object a completion made before its end was cut off is read back, proven the
    upload's message and recorded, not refused as tampered for ever."""
    data = random_bytes(2 * FRAME + 3, seed=27)
    url = create(client, len(data))
    etags_not_derived_from_parts(api, monkeypatch, "/up/obj")
    complete_parts_failing_once(api, monkeypatch, made=True)
    assert patch(client, url, 0, data).status_code == 503

    head = client.head(url, headers=TUS)

    assert (head.status_code, head.headers.get("upload-offset")) == (200, str(len(data)))
    job = finished_job(client, head.headers["x-verify-job"], timeout=120)
    assert job["status"] == "succeeded", job
    record = load_record(api.records, api.objects.bucket, "tenants/default/up/obj")
    assert (record.plaintext_size, record.plaintext_frame_chain) == (len(data), chain_of(data))
    completed_head(client, url, len(data))


@pytest.mark.parametrize("planted", ["random", "with-its-header"])
def test_an_object_planted_where_a_completion_was_cut_off_is_refused_not_recorded(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """A bucket writer who puts an object of the message's size at the key of an upload
    whose completion was cut off does not get it recorded as the upload's, even with the
    upload's header in front (no secret): neither its etag (S3) nor its frames read back
    (a local directory) make it the upload's. The HEAD says what comes next."""
    data = random_bytes(2 * FRAME + 3, seed=16)
    url = create(client, len(data))
    complete_parts_failing_once(api, monkeypatch, made=True)
    assert patch(client, url, 0, data).status_code == 503
    state = api.records.get(
        STATE_KIND, f"{UPLOADS_PREFIX}{url.rpartition('/')[2]}.json", UploadState
    )
    made = api.objects.get(state.storage_key)
    header = made[: len(state.header_bytes)] if planted == "with-its-header" else b""
    api.objects.put(state.storage_key, header + random_bytes(len(made) - len(header), seed=17))

    assert client.head(url, headers=TUS).status_code == 502  # upload-tampered: no body
    refused = problem(patch(client, url, len(data), b""), 502, "upload-tampered")
    assert "aborted at its expiry" in refused["detail"]
    assert finish_recording(api.records, api.parts.keys, api.parts.spaces) == 0
    with pytest.raises(ObjectNotFound):
        load_record(api.records, api.objects.bucket, state.storage_key)


def test_an_object_planted_with_the_upload_header_is_never_taken_for_its_own(
    api: Api, client: httpx.Client
) -> None:
    """A bucket writer who copies the header (no secret: the staging object starts with
    it) onto bytes of the message's size at the upload's key before its last PATCH does
    not get them recorded as the upload's object, nor its client told it is stored."""
    data = random_bytes(2 * FRAME + 3, seed=21)
    url = create(client, len(data))
    assert patch(client, url, 0, data[:FRAME]).status_code == 204
    state = api.records.get(
        STATE_KIND, f"{UPLOADS_PREFIX}{url.rpartition('/')[2]}.json", UploadState
    )
    header = state.header_bytes
    forged = header + random_bytes(state.ciphertext_size() - len(header), seed=22)
    api.objects.put(state.storage_key, forged)

    last = patch(client, url, FRAME, data[FRAME:])

    assert last.status_code >= 400, last.headers
    with pytest.raises(ObjectNotFound):
        load_record(api.records, api.objects.bucket, state.storage_key)
    assert api.objects.get(state.storage_key) == forged
    assert pending(api) == []


def test_a_head_while_the_last_patch_completes_answers_the_full_offset(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HEAD is never refused as locked: while the PATCH that stored every frame is
    completing the object, it answers the offset acknowledged, the length."""
    data = random_bytes(2 * FRAME + 5, seed=18)
    url = create(client, len(data))
    with completing_last_patch(api, monkeypatch, url, data):
        head = client.head(url, headers=TUS)

    assert (head.status_code, head.headers["upload-offset"]) == (200, str(len(data)))
    assert "x-verify-job" not in head.headers
    assert read_object(client, "up/obj").content == data


@contextmanager
def completing_last_patch(
    api: Api, monkeypatch: pytest.MonkeyPatch, url: str, data: bytes
) -> Iterator[threading.Event]:
    """The PATCH of all of `data` to `url`, on a connection of its own, held inside the
    store's completion until the event yielded is set (at the latest as the block ends);
    it must then answer 204."""
    store_class = type(api.parts.spaces.store("default", api.objects.bucket))
    real, completing, let_go = store_class.complete_parts, threading.Event(), threading.Event()

    def held(self: Any, *args: Any, **kwargs: Any) -> Any:
        completing.set()
        let_go.wait(timeout=60)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_class, "complete_parts", held)
    with api.client() as other, ThreadPoolExecutor(1) as pool:
        patching = pool.submit(patch, other, url, 0, data)
        try:
            assert completing.wait(timeout=60)
            yield let_go
        finally:
            let_go.set()
        assert patching.result().status_code == 204


def resume_with_client(api: Api, url: str, data: bytes, attempts: int) -> ResumableResult:
    sdk = SealstreamClient(api.url, ADMIN_TOKEN, timeout=30)
    path = url.removeprefix(api.url)
    with io.BytesIO(data) as file:
        return sdk.upload_resumable(
            "mySymKey", file, len(data), key="up/obj", upload=path, attempts=attempts
        )


def test_the_client_never_takes_a_completion_under_way_for_one_done(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client finds every byte acknowledged while another request completes the
    upload (no verify job named): it is not told the object is stored while that
    completion has not ended, which may still fail."""
    data = random_bytes(2 * FRAME + 5, seed=19)
    url = create(client, len(data))
    with (
        completing_last_patch(api, monkeypatch, url, data),
        pytest.raises(UploadNotConfirmed),
    ):
        resume_with_client(api, url, data, attempts=2)


def test_the_client_waits_for_a_completion_under_way_to_end(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the completion it found under way ends, the upload gone and the object
    listed at its key, the client reports the upload done."""
    data = random_bytes(2 * FRAME + 5, seed=20)
    url = create(client, len(data))
    uploads_class = type(api.parts.uploads())
    real_get, heads = uploads_class.get, []
    with completing_last_patch(api, monkeypatch, url, data) as let_go:

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            answer = real_get(self, *args, **kwargs)
            heads.append(args)
            if len(heads) == 2:  # both of the client's first HEADs found the full offset
                let_go.set()
            return answer

        monkeypatch.setattr(uploads_class, "get", counted)
        result = resume_with_client(api, url, data, attempts=8)

    assert (result.offset, result.verify_job) == (len(data), None)
    assert read_object(client, "up/obj").content == data


def test_the_client_refuses_to_go_on_with_an_upload_of_another_length(
    api: Api, client: httpx.Client
) -> None:
    """Given an upload created for more bytes than the file it is handed, the client
    refuses it before sending anything: sending the file would move the offset to the
    file's length and leave the upload open, never an object."""
    data = random_bytes(2 * FRAME, seed=26)
    url = create(client, len(data) + FRAME + 5)

    with pytest.raises(UploadLengthMismatch) as refused:
        resume_with_client(api, url, data, attempts=2)

    assert (refused.value.upload_length, refused.value.length) == (len(data) + FRAME + 5, len(data))
    assert offset_of(client, url) == 0


def test_upload_requests_with_their_redis_down_name_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Their 503 names what an upload's request needed of Redis, not the job store."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with live_api(api_settings("s3", tmp_path, request)) as api, api.client() as client:
        api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(nowhere, ""))
        create_key(client)
        problem(post_upload(client, 10), 503, "upload-anchor-unavailable")


def test_a_completed_upload_answers_its_length_to_its_tenant_and_clients_take_it_as_done(
    api: Api, client: httpx.Client
) -> None:
    """A client whose last PATCH's answer was lost, and that resumes after the upload was
    completed, is told it is complete (tus: Upload-Offset of Upload-Length, as tusd
    answers), not that it is gone: tuspy sends nothing more, the client reports it done
    (no verify job it was told of), and creating it again is never tried. Another tenant
    is told nothing of it; nothing more can be written to it or terminated."""
    data = random_bytes(2 * FRAME + 5, seed=24)
    url = create(client, len(data))
    assert patch(client, url, 0, data).status_code == 204

    completed_head(client, url, len(data))
    resumed = tus_uploader(api, data, "up/obj", url=api.url + url)
    resumed.upload()
    assert resumed.offset == len(data)
    result = resume_with_client(api, url, data, attempts=2)
    assert result == ResumableResult(url, len(data), None)
    with tenant_client(api, client, "other", "crypto:encrypt") as other:
        assert other.head(url, headers=TUS).status_code == 404
    problem(patch(client, url, len(data), b""), 404, "upload-not-found")
    problem(client.delete(url, headers=TUS), 404, "upload-not-found")
    assert read_object(client, "up/obj").content == data


def test_an_unanchored_completion_is_answered_until_the_sweep_drops_its_note(
    tmp_path: Path,
) -> None:
    """With no Redis (the embedded default), a completed upload's tombstone is a sealed
    note beside the states: its HEAD answers the full offset until a day past its expiry,
    when the sweep removes the note, and the HEAD is then 404."""
    data = random_bytes(FRAME + 7, seed=25)
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        assert api.parts.upload_anchor is None
        create_key(client)
        url = create(client, len(data))
        assert patch(client, url, 0, data).status_code == 204
        note = completion_name(url.rpartition("/")[2])
        assert [info.key for info in api.records.store.list(note)] == [note]

        completed_head(client, url, len(data))
        assert api.parts.uploads().expire(datetime.now(UTC) + timedelta(days=1)) == Swept()
        completed_head(client, url, len(data))
        api.parts.uploads().expire(datetime.now(UTC) + timedelta(days=3))

        assert list(api.objects.list(UPLOADS_PREFIX)) == []
        assert list(api.records.store.list(note)) == []
        assert client.head(url, headers=TUS).status_code == 404


def test_an_empty_upload_is_complete_once_created(client: httpx.Client) -> None:
    response = post_upload(client, 0)

    assert response.status_code == 201 and response.headers["upload-offset"] == "0"
    assert read_object(client, "up/obj").content == b""


def test_an_upload_past_its_expiry_is_gone_before_the_sweep(api: Api, client: httpx.Client) -> None:
    url = create(client, 2 * FRAME)
    name = f"{UPLOADS_PREFIX}{url.rsplit('/', 1)[1]}.json"
    state = api.records.get(STATE_KIND, name, UploadState)
    past = datetime.now(UTC) - timedelta(hours=1)
    api.records.put(STATE_KIND, name, state.model_copy(update={"expires_at": past}))

    assert client.head(url, headers=TUS).status_code == 404
    problem(patch(client, url, 0, random_bytes(2 * FRAME, seed=16)), 404, "upload-not-found")
