"""Streaming crypto when things go wrong part-way: plaintext never on disk, clients that
vanish, an S3 server that fails, tampered messages, keys disabled mid-stream and bodies
cut short. Each ends with a clear error, no visible object and no pending upload; a
response that had started is aborted (no terminating chunk), never cleanly ended."""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from anyio import CapacityLimiter, to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from api.services import Services
from keystore import LocalKek
from sealstream.server import create_app
from sealstream.settings import Settings
from services.open_stored import CheckedObject, check_stored, stored_plaintext
from services.placement import ObjectRef
from services.unfinished import finish_recording
from storage import MIN_PART_SIZE, PreconditionFailed
from storage.records import INTENTS_PREFIX
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api, local_settings
from tests.support.audited import audited_serve
from tests.support.data import KiB, MiB, Tally, flip_bit, marked_chunks, pieces, random_bytes
from tests.support.envelope import frame_count, frame_offset
from tests.support.http import (
    CLOSE,
    DECRYPT,
    ENCRYPT,
    FORM_TYPE,
    KEYS,
    Exchange,
    auth,
    connect,
    create_key,
    decrypt,
    encrypt,
    exchange,
    form,
    form_bytes,
    part_head,
    post_form,
    problem,
    raw_upload,
    read_object,
    request_head,
)
from tests.support.jobs import finished_job, start_verify
from tests.support.metrics import scrape, value
from tests.support.s3_proxy import HeldParts, PartsAfter, Rule, S3FaultProxy, requests_matching
from tests.support.services import api_server
from tests.support.storage import nothing_stored
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

FRAME = 4096
DESTINATION = {"kid": "mySymKey", "destination": {"key": "big/object.bin"}}


def aborted(response: Exchange) -> None:
    """The response started (200) and was then cut off: no clean end to its body."""
    assert response.status == 200
    assert not response.complete, "a failed stream must not end cleanly"


def nothing_in_bucket(s3: "S3Client", bucket: str) -> bool:
    """Seen by moto directly: no object under tenants/ and no multipart upload at all."""
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="tenants/").get("KeyCount", 0)
    return objects == 0 and not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


# Plaintext never touches the server's disk


def _files_under(directory: Path) -> Iterator[Path]:
    return (path for path in directory.rglob("*") if path.is_file())


def _holds(path: Path, marker: bytes) -> bool:
    overlap = len(marker) - 1
    tail = b""
    with path.open("rb") as file:
        while block := file.read(MiB):
            if marker in tail + block:
                return True
            tail = block[-overlap:]
    return False


@pytest.mark.parametrize("destination", [False, True], ids=["stream-back-s3", "stored-locally"])
def test_no_plaintext_touches_the_servers_disk(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, destination: bool
) -> None:
    """64 MB through `sealstream serve`, far past Starlette's 1 MiB spool threshold, with
    an audit hook reporting every open for writing, temp file, rename and link."""
    temp_dir, cwd, storage_dir = tmp_path / "tmp", tmp_path / "cwd", tmp_path / "storage"
    for directory in (temp_dir, cwd):
        directory.mkdir()
    env = {"TMPDIR": str(temp_dir)}
    if destination:
        env["SEALSTREAM_STORAGE_URL"] = f"file://{storage_dir}"
    else:  # no local storage at all: any write after start-up is a leak
        LocalKek.load_or_create(tmp_path / "kek")  # mode 0600
        env |= {
            "SEALSTREAM_STORAGE_URL": f"s3://{s3_bucket}",
            "SEALSTREAM_S3_ENDPOINT_URL": moto_endpoint,
            "SEALSTREAM_KEK_FILE": str(tmp_path / "kek"),
        }
    marker = os.urandom(16)
    sent = Tally()
    with audited_serve(cwd, env) as server:
        with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as client:
            create_key(client)
        plaintext = sent.through(marked_chunks(64 * MiB, marker))
        metadata = DESTINATION if destination else {"kid": "mySymKey"}
        response = exchange(server.url, ENCRYPT, form(metadata, plaintext), keep_body=False)
        assert response.complete and sent.size == 64 * MiB
        if destination:
            assert response.status == 201
            source = {"source": DESTINATION["destination"]}
            opened = exchange(server.url, DECRYPT, form(source, None), keep_body=False)
        else:
            assert response.status == 200 and response.size > sent.size
            opened = None
    assert list(temp_dir.iterdir()) == [], "the server left files in TMPDIR"
    assert list(cwd.iterdir()) == []
    writes = [(event, (cwd / path).resolve()) for event, path in server.writes()]
    if not destination:
        assert writes == [], "the server wrote files while streaming"
        return
    assert opened is not None and opened.complete and opened.sha256 == sent.sha256
    # Everything written went under the storage directory, and none of it is plaintext.
    assert writes, "the audit hook saw no write at all"
    assert all(path.is_relative_to(storage_dir) for _, path in writes), writes
    stored = list(_files_under(storage_dir))
    assert any(path.stat().st_size > 64 * MiB for path in stored)
    assert not [path for path in stored if _holds(path, marker)]


# The client goes away


def _upload_head(total: int) -> tuple[bytes, int]:
    """The form up to the file's data, and the declared length of a body of `total`."""
    head = form_bytes(DESTINATION, None, terminated=False)
    head += b"\r\n" + part_head("file", "application/octet-stream", "big.bin")
    return head, len(head) + total + len(b"\r\n--x--\r\n")


def test_client_disconnecting_mid_upload_leaves_nothing(api: Api) -> None:
    with api.client() as client:
        create_key(client)
    head, length = _upload_head(40 * MiB)
    with raw_upload(api.url, ENCRYPT, length) as sock:
        sock.sendall(head)
        for piece in pieces(random_bytes(10 * MiB, seed=1), 256 * KiB):
            sock.sendall(piece)
        # Past the first 5 MiB part, even batched by 4 MiB: the S3 multipart upload has
        # begun (locally, the temporary file exists from the start).
        wait_until(lambda: bool(api.objects.pending_uploads("tenants/")), "the upload to start")
    wait_until(lambda: nothing_stored(api.objects), "the upload to be aborted")


# A client that stops sending but keeps its connection open

IDLE_TIMEOUT = 1.0


@pytest.fixture(params=["local", "s3"])
def impatient_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """A live API server that gives up on a body after `IDLE_TIMEOUT` seconds of silence;
    the key `mySymKey` exists."""
    settings = api_settings(request.param, tmp_path, request)
    with live_api(settings.model_copy(update={"idle_timeout": IDLE_TIMEOUT})) as api:
        with api.client() as client:
            create_key(client)
        yield api


def response_to(sock: socket.socket) -> tuple[int, bytes, BaseException | None]:
    """Status, body and, if the body was cut off, the error: what the server answered."""
    response = http.client.HTTPResponse(sock, method="POST")
    response.begin()
    try:
        return response.status, response.read(), None
    except http.client.IncompleteRead as exc:
        return response.status, exc.partial, exc


def test_an_upload_to_storage_that_stalls_is_refused_and_leaves_nothing(
    impatient_api: Api,
) -> None:
    head, length = _upload_head(40 * MiB)
    with raw_upload(impatient_api.url, ENCRYPT, length) as sock:
        sock.sendall(head)
        for piece in pieces(random_bytes(10 * MiB, seed=3), 256 * KiB):
            sock.sendall(piece)
        wait_until(
            lambda: bool(impatient_api.objects.pending_uploads("tenants/")), "the upload to start"
        )
        status, body, cut = response_to(sock)  # the connection stays open, silent
    assert (status, cut) == (408, None)
    assert json.loads(body)["code"] == "body-timeout"
    wait_until(lambda: nothing_stored(impatient_api.objects), "the upload to be aborted")


def test_a_stream_back_that_stalls_is_cut_off(impatient_api: Api) -> None:
    metadata = form_bytes({"kid": "mySymKey", "frameLength": FRAME}, None, terminated=False)
    head = metadata + b"\r\n" + part_head("file", "application/octet-stream", "big.bin")
    with raw_upload(impatient_api.url, ENCRYPT, len(head) + 10 * MiB) as sock:
        sock.sendall(head + random_bytes(64 * KiB, seed=4))
        status, body, cut = response_to(sock)
    assert status == 200
    assert isinstance(cut, http.client.IncompleteRead), "a stalled stream must not end cleanly"
    assert 0 < len(body) < 64 * KiB + 4 * KiB  # the frames sealed before the stall


def test_a_client_that_never_reads_the_stream_back_is_given_up_on(impatient_api: Api) -> None:
    """A client that sends its whole body before reading (most simple HTTP clients) and the
    server, which reads only as fast as its ciphertext is read, would wait for each other
    for ever; the server gives up on the request once a send has waited `IDLE_TIMEOUT`.
    (uvicorn then keeps the socket until the client goes: it has no way to drop one whose
    unsent bytes nobody reads.)"""
    metadata = form_bytes({"kid": "mySymKey"}, None, terminated=False)
    head = metadata + b"\r\n" + part_head("file", "application/octet-stream", "big.bin")
    block = random_bytes(MiB, seed=5)

    def ended() -> bool:
        _, samples = scrape(impatient_api.url)
        requests = "sealstream_http_requests_total"
        aborted = value(samples, requests, method="POST", route=ENCRYPT, status="aborted")
        in_progress = value(samples, "sealstream_http_requests_in_progress", method="POST")
        return aborted == 1 and in_progress == 0

    with raw_upload(impatient_api.url, ENCRYPT, len(head) + 1024 * MiB) as sock:
        sock.settimeout(None)
        sending = threading.Thread(target=send_blocks, args=(sock, head, block), daemon=True)
        sending.start()
        wait_until(ended, "the server to give up on the request")
        assert sending.is_alive(), "the client is still blocked sending, reading nothing"
        sock.shutdown(socket.SHUT_RDWR)
    sending.join(30)


def send_blocks(sock: socket.socket, head: bytes, block: bytes) -> None:
    """Send `head`, then `block` until the connection fails: a client that never reads."""
    with suppress(OSError):
        sock.sendall(head)
        while True:
            sock.sendall(block)


def test_a_json_body_that_stalls_is_refused(impatient_api: Api) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": "100", **auth(ADMIN_TOKEN)}
    with connect(impatient_api.url) as sock:
        sock.sendall(request_head(impatient_api.url, KEYS, headers) + b'{"kid": "half')
        status, body, cut = response_to(sock)
    assert (status, cut) == (408, None)
    assert json.loads(body)["code"] == "body-timeout"


# The S3 server fails part-way


def with_default_threads(app: ASGIApp, threads: int) -> ASGIApp:
    """`app`, with its event loop's default pool of worker threads cut to `threads` (anyio
    gives it 40): what a server under heavy load has left of it."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            to_thread.current_default_thread_limiter().total_tokens = threads
        await app(scope, receive, send)

    return limited


@contextmanager
def behind_proxy(
    tmp_path: Path,
    moto_endpoint: str,
    bucket: str,
    rule: Rule,
    *,
    default_threads: int | None = None,
    **settings: Any,
) -> Iterator[tuple[str, S3FaultProxy, Services]]:
    """An API server whose S3 traffic goes through an `S3FaultProxy`; its URL, the proxy
    and its services. The key `mySymKey` exists."""
    kek = tmp_path / "kek"
    LocalKek.load_or_create(kek)  # mode 0600
    with S3FaultProxy(moto_endpoint, rule) as proxy:
        configured = Settings(
            storage_url=f"s3://{bucket}",
            s3_endpoint_url=proxy.url,
            kek_file=kek,
            admin_token=ADMIN_TOKEN,
            **{"s3_part_size": MIN_PART_SIZE, "s3_parts_in_flight": 2, **settings},
        )
        app = create_app(configured)
        served = app if default_threads is None else with_default_threads(app, default_threads)
        with api_server(served) as url:
            with Api.of(url, configured, app).client() as client:
                create_key(client)
            yield url, proxy, app.state.services


@dataclass
class ShrinkOnSecondLook:
    """Once `armed`, before the second HEAD or GET of the object `key` goes through, cuts
    the object to 10 bytes straight on the S3 server: it changes while it is being read."""

    s3: "S3Client"
    bucket: str
    key: str
    armed: threading.Event = field(default_factory=threading.Event)
    looks: int = 0

    def __call__(self, head: bytes, length: int) -> bool:
        request = f"^(HEAD|GET) /{self.bucket}/{self.key}[ ?]".encode()
        if self.armed.is_set() and re.match(request, head):
            self.looks += 1
            if self.looks == 2:
                body = self.s3.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
                self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=body[:10])
        return False


def test_an_object_that_shrinks_while_it_is_checked_is_refused(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    """Its size was looked up, then it is shorter than the reads it takes: 502, and the
    problem names the object by its key, not by where it is stored."""
    shrink = ShrinkOnSecondLook(moto_s3, s3_bucket, "tenants/default/moving")
    with (
        behind_proxy(tmp_path, moto_endpoint, s3_bucket, shrink) as (url, _, _),
        httpx.Client(base_url=url, headers=auth(ADMIN_TOKEN), timeout=60) as client,
    ):
        stored = encrypt(client, random_bytes(50_000), destination={"key": "moving"})
        finished_job(client, stored.json()["verifyJob"])  # its reads of the object are done
        shrink.armed.set()
        refused = read_object(client, "moving", "bytes=-10")
    body = problem(refused, 502, "object-damaged")
    assert shrink.looks >= 2 and "'moving'" in body["detail"] and "tenants/" not in body["detail"]


def test_s3_failing_mid_upload_aborts_the_upload(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    parts = PartsAfter(MIN_PART_SIZE + MiB)  # the first part goes, the next ones fail
    with behind_proxy(tmp_path, moto_endpoint, s3_bucket, parts) as (url, proxy, _):
        plaintext = pieces(random_bytes(30 * MiB, seed=2), MiB)
        response = exchange(url, ENCRYPT, form(DESTINATION, plaintext))
    assert parts.passed >= MIN_PART_SIZE and proxy.failed >= 1
    problem(response, 503, "storage-unavailable")
    assert nothing_in_bucket(moto_s3, s3_bucket)


def test_uploads_stalled_by_storage_leave_threads_for_every_other_request(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    """An upload whose parts the store does not take holds a thread. Transfers take theirs
    from a pool of their own, so more stalled uploads than the default pool has threads
    still leave threads for what every request needs (authentication, key lookups); the
    uploads beyond the transfers' pool wait their turn, and all finish once S3 moves."""
    held = HeldParts()
    uploads = 5
    with behind_proxy(
        tmp_path,
        moto_endpoint,
        s3_bucket,
        held,
        default_threads=3,
        transfer_threads=2,
        s3_parts_in_flight=1,
    ) as (url, _, services):
        transfers = services.transfers
        plaintexts = [random_bytes(12 * MiB, seed=40 + number) for number in range(uploads)]
        with ThreadPoolExecutor(uploads) as pool:
            responses = [
                pool.submit(
                    exchange,
                    url,
                    ENCRYPT,
                    form({"kid": "mySymKey", "destination": {"key": f"stalled/{number}"}},
                         pieces(plaintext, MiB)),
                )
                for number, plaintext in enumerate(plaintexts)
            ]  # fmt: skip
            try:
                # Two writers wait for a part the proxy holds, on both transfer threads;
                # the other uploads wait for a thread.
                wait_until(
                    lambda: held.held >= 2 and transfers.statistics().tasks_waiting == uploads - 2,
                    "two uploads to stall and the others to wait their turn",
                )
                with httpx.Client(base_url=url, headers=auth(ADMIN_TOKEN), timeout=10) as client:
                    assert client.get("/api/key-management/keys/mySymKey").status_code == 200
            finally:
                held.release()
            statuses = [future.result().status for future in responses]
    assert statuses == [201] * uploads
    assert not moto_s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_s3_failing_to_store_the_record_leaves_no_object(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    """The object's record is written last; if that fails, the request fails, and the
    object it describes must not stay behind (a retry would then meet 409)."""
    records = requests_matching(rb"^PUT /[^/ ]+/sealstream/objects/")
    with behind_proxy(tmp_path, moto_endpoint, s3_bucket, records) as (url, proxy, _):
        response = exchange(url, ENCRYPT, form(DESTINATION, random_bytes(100_000, seed=12)))
        assert proxy.failed >= 1
        problem(response, 503, "storage-unavailable")
        assert nothing_in_bucket(moto_s3, s3_bucket)


@dataclass
class Armed:
    """Fails the requests whose request line matches `pattern`, while `armed`."""

    pattern: bytes
    armed: threading.Event = field(default_factory=threading.Event)

    def __call__(self, head: bytes, length: int) -> bool:
        return self.armed.is_set() and re.match(self.pattern, head) is not None


def reencrypt_in_place(client: httpx.Client, key: str) -> httpx.Response:
    metadata = {"kid": "mySymKey", "source": {"key": key}}
    return post_form(client, "/api/crypto/stream/reencrypt", metadata, None)


def test_an_object_whose_writer_was_lost_before_its_record_is_served_and_then_recorded(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    """Storage cut off right after the upload completed, as if the API host died: the
    record is not saved and the object is not taken back. Its record's intent, noted
    before the upload completed, serves reads of it meanwhile, and the sweep records it."""
    lost = Armed(rb"^(PUT /[^/ ]+/sealstream/objects/|DELETE )")
    plaintext = random_bytes(100_000, seed=13)
    with (
        behind_proxy(tmp_path, moto_endpoint, s3_bucket, lost) as (url, proxy, services),
        httpx.Client(base_url=url, headers=auth(ADMIN_TOKEN), timeout=60) as client,
    ):
        lost.armed.set()
        problem(
            encrypt(client, plaintext, destination={"key": "orphan"}), 503, "storage-unavailable"
        )
        lost.armed.clear()
        assert proxy.failed >= 2
        assert moto_s3.head_object(Bucket=s3_bucket, Key="tenants/default/orphan")

        served = read_object(client, "orphan")
        assert (served.status_code, served.content) == (200, plaintext)
        assert finish_recording(services.records, services.keys, services.spaces) == 1
        assert finish_recording(services.records, services.keys, services.spaces) == 0
        assert list(services.records.store.list(INTENTS_PREFIX)) == []
        verified = finished_job(client, start_verify(client, "orphan")["id"])
        assert verified["status"] == "succeeded", verified


def test_a_read_while_a_reencrypt_swaps_the_object_gets_the_new_message_whole(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    """Between the swap and the new record, the object is the new message and its record
    still names the old one: frozen there by failing the record's write, a read gets the
    new message, whole, from the record's intent; the sweep then saves the new record."""
    records = Armed(rb"^PUT /[^/ ]+/sealstream/objects/")
    plaintext = random_bytes(70_000, seed=14)
    with (
        behind_proxy(tmp_path, moto_endpoint, s3_bucket, records) as (url, _, services),
        httpx.Client(base_url=url, headers=auth(ADMIN_TOKEN), timeout=60) as client,
    ):
        assert encrypt(client, plaintext, destination={"key": "swapped"}).status_code == 201
        old_etag = services.records.store.head("tenants/default/swapped").etag
        records.armed.set()
        problem(reencrypt_in_place(client, "swapped"), 503, "storage-unavailable")
        records.armed.clear()
        assert services.records.store.head("tenants/default/swapped").etag != old_etag

        served = read_object(client, "swapped")
        assert (served.status_code, served.content) == (200, plaintext)
        assert finish_recording(services.records, services.keys, services.spaces) == 1
        served = read_object(client, "swapped")
        assert (served.status_code, served.content) == (200, plaintext)


# Tampered messages


def test_a_tampered_frame_aborts_the_stream_after_the_frames_before_it(api: Api) -> None:
    data = random_bytes(2 * MiB, seed=3)
    with api.client() as client:
        create_key(client)
        message = encrypt(client, data, frameLength=FRAME).content
    bad_frame = 300  # about 1.2 MB into the message: well after the response has started
    tampered = flip_bit(message, frame_offset(message, bad_frame) + 100)
    response = exchange(api.url, DECRYPT, form({}, pieces(tampered, 64 * KiB)))
    aborted(response)
    # What came out is whole verified frames, and none from the tampered one on.
    assert response.size % FRAME == 0 and response.size <= bad_frame * FRAME
    assert response.body == data[: response.size]


@pytest.mark.parametrize(
    ("cut", "what"),
    [
        (lambda m: m[: frame_offset(m, frame_count(m))], "no final frame"),
        (lambda m: m[: frame_offset(m, 200) + 50], "cut inside a frame"),
        (lambda m: m[: len(m) - 1], "final frame one byte short"),
        (lambda m: m + b"\x00" * 10, "bytes after the final frame"),
        (lambda m: m[: frame_offset(m, 100)] + m[frame_offset(m, 101) :], "a frame missing"),
    ],
    ids=["no-final-frame", "inside-a-frame", "one-byte-short", "trailing-bytes", "frame-dropped"],
)
def test_a_truncated_message_never_decrypts_cleanly(
    api: Api, cut: Callable[[bytes], bytes], what: str
) -> None:
    data = random_bytes(MiB, seed=4)
    with api.client() as client:
        create_key(client)
        message = encrypt(client, data, frameLength=FRAME).content
    response = exchange(api.url, DECRYPT, form({}, pieces(cut(message), 64 * KiB)))
    aborted(response)
    assert response.body == data[: response.size], what


def test_a_tampered_header_is_refused_before_any_body(api: Api) -> None:
    data = random_bytes(100_000, seed=5)
    with api.client() as client:
        create_key(client)
        message = encrypt(client, data, frameLength=FRAME).content
        header_end = frame_offset(message, 0)
        tag = decrypt(client, flip_bit(message, header_end - 1))
        problem(tag, 400, "header-authentication-failed")
        for offset in (1, 5, 40, header_end // 2, header_end - 20):
            refused = decrypt(client, flip_bit(message, offset))
            assert 400 <= refused.status_code < 500, (offset, refused.text)
            assert refused.headers["Content-Type"] == "application/problem+json"


def test_a_tampered_stored_object_is_never_served_as_good(api: Api) -> None:
    data = random_bytes(200_000, seed=6)
    with api.client() as client:
        create_key(client)
        stored = encrypt(client, data, frameLength=FRAME, destination={"key": "t"}).json()
        key = stored["storageKey"]
        message = api.objects.get(key)
        api.objects.put(key, flip_bit(message, frame_offset(message, 20) + 64))
        # Frames before the tampered one still read by range.
        clean = read_object(client, "t", f"bytes=0-{20 * FRAME - 1}")
        assert clean.status_code == 206 and clean.content == data[: 20 * FRAME]
    source = form({"source": {"key": "t"}}, None)
    whole = exchange(api.url, DECRYPT, source)
    aborted(whole)
    assert whole.size < len(data) and whole.body == data[: whole.size]
    headers = {"Range": f"bytes={20 * FRAME - 10}-{21 * FRAME}"}
    ranged = exchange(api.url, DECRYPT, form({"source": {"key": "t"}}, None), headers=headers)
    assert ranged.status == 206 and not ranged.complete
    assert ranged.body == data[20 * FRAME - 10 : 20 * FRAME - 10 + ranged.size]
    assert ranged.size < 10 + FRAME


@pytest.mark.skipif(shutil.which("curl") is None, reason="checks curl's own report")
def test_curl_reports_an_aborted_decrypt(api: Api, tmp_path: Path) -> None:
    data = random_bytes(3 * MiB, seed=7)
    with api.client() as client:
        create_key(client)
        message = encrypt(client, data, frameLength=FRAME).content
    # The last regular frame: the server has read the whole upload when it finds it, so
    # curl sees the response cut short rather than its upload refused.
    last = frame_count(message) - 1
    (tmp_path / "tampered.enc").write_bytes(flip_bit(message, frame_offset(message, last) + 1))
    done = subprocess.run(
        [
            "curl", "-sS", "-X", "POST", f"{api.url}{DECRYPT}",
            "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
            "-F", "metadata={};type=application/json",
            "-F", "file=@tampered.enc;type=application/octet-stream",
            "--output", "out.bin",
        ],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 18, done.stderr
    assert "transfer closed with outstanding read data remaining" in done.stderr
    out = (tmp_path / "out.bin").read_bytes()
    assert len(out) <= last * FRAME and out == data[: len(out)]


# Keys disabled or deleted


def test_a_disabled_key_neither_encrypts_nor_decrypts(api: Api) -> None:
    data = random_bytes(10_000, seed=8)
    with api.client() as client:
        create_key(client)
        message = encrypt(client, data).content
        encrypt(client, data, destination={"key": "kept"})
        assert client.post(f"{KEYS}/mySymKey/disable").status_code == 200
        problem(encrypt(client, data), 409, "key-disabled")
        problem(encrypt(client, data, destination={"key": "new"}), 409, "key-disabled")
        problem(decrypt(client, message), 409, "key-disabled")
        problem(read_object(client, "kept"), 409, "key-disabled")
        problem(read_object(client, "kept", "bytes=0-9"), 409, "key-disabled")
        assert client.post(f"{KEYS}/mySymKey/enable").status_code == 200
        assert decrypt(client, message).content == data
        assert client.delete(f"{KEYS}/mySymKey").status_code == 200
        problem(encrypt(client, data), 409, "key-pending-deletion")
        problem(decrypt(client, message), 409, "key-pending-deletion")
        problem(read_object(client, "kept"), 409, "key-pending-deletion")
    assert [info.key for info in api.objects.list("tenants/")] == ["tenants/default/kept"]


@dataclass
class SlowBody:
    """`first`, then 8 KiB pieces with pauses for about a minute (the duplex client stops
    sending once it has its answer); `slowing` is set once `first` has gone."""

    first: bytes
    slowing: threading.Event = field(default_factory=threading.Event)

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        self.slowing.set()
        for _ in range(3000):
            time.sleep(0.02)
            yield b"z" * 8192


@pytest.mark.parametrize(
    ("destination", "kid"),
    [(True, "mySymKey"), (False, "mySymKey"), (False, ["firstKey", "mySymKey"])],
    ids=["to-storage", "stream-back", "stream-back-second-of-two-keys"],
)
def test_a_key_disabled_during_a_long_upload_stops_it(
    api: Api, destination: bool, kid: str | list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The server re-checks the keys (every key of a message for several) about every
    second (cache TTL 0.5 s here)."""
    body = SlowBody(random_bytes(6 * MiB, seed=9))
    metadata = {**DESTINATION, "frameLength": FRAME} if destination else {"kid": kid}
    with api.client() as client, ThreadPoolExecutor(1) as pool:
        create_key(client)
        if isinstance(kid, list):
            create_key(client, kid="firstKey")
        running = pool.submit(exchange, api.url, ENCRYPT, form(metadata, body), keep_body=True)
        wait_until(body.slowing.is_set, "the slow part of the upload")
        if destination:  # the upload is under way (on S3: its first part has gone)
            wait_until(lambda: bool(api.objects.pending_uploads("tenants/")), "the upload")
        assert not running.done()
        assert client.post(f"{KEYS}/mySymKey/disable").status_code == 200
        response = running.result(timeout=60)
    if destination:
        problem(response, 409, "key-disabled")
    else:
        aborted(response)
        assert any("is disabled" in record.getMessage() for record in caplog.records)
    assert nothing_stored(api.objects)


@pytest.mark.parametrize("range_", [None, "bytes=1000-"], ids=["whole", "ranged"])
def test_a_key_disabled_during_a_long_read_of_a_stored_object_stops_it(
    api: Api, range_: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """As an upload is: the server re-checks the key about every second while it streams
    a stored object back (cache TTL 0.5 s here), and aborts the response."""
    data = random_bytes(24 * MiB, seed=12)
    body = form_bytes({"source": {"key": "long"}}, None)
    headers = {"Content-Type": FORM_TYPE, **({"Range": range_} if range_ else {})}
    received = 0
    with api.client() as client:
        create_key(client)
        assert encrypt(client, data, destination={"key": "long"}).status_code == 201
        with (
            pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
            client.stream("POST", DECRYPT, content=body, headers=headers) as response,
        ):
            assert response.status_code == (200 if range_ is None else 206)
            for piece in response.iter_raw(64 * KiB):
                if not received:  # the read is under way
                    assert client.post(f"{KEYS}/mySymKey/disable").status_code == 200
                received += len(piece)
                time.sleep(0.02)  # a slow reader: the whole object would take seconds
    assert received < len(data) - 1000
    assert any("is disabled" in record.getMessage() for record in caplog.records)


# Bodies that stop before the closing boundary


UNFINISHED_ENDINGS = {
    "inside-the-file": b"",
    "crlf": b"\r\n",
    "delimiter": b"\r\n--sealstream-test-7c2f0a",
    "delimiter-and-one-dash": b"\r\n--sealstream-test-7c2f0a-",
    "delimiter-and-crlf": b"\r\n--sealstream-test-7c2f0a\r\n",
}


@pytest.mark.parametrize("ending", UNFINISHED_ENDINGS.values(), ids=UNFINISHED_ENDINGS.keys())
@pytest.mark.parametrize("size", [3 * FRAME, 3 * FRAME + 100], ids=["frame-edge", "mid-frame"])
def test_an_unterminated_form_never_yields_a_message(
    served_local: Api, ending: bytes, size: int
) -> None:
    """The HTTP body is complete, the multipart form inside it is not: a truncated upload
    must not become a valid-looking short message."""
    data = random_bytes(size, seed=10)
    head = form_bytes({"kid": "mySymKey", "frameLength": FRAME}, data, terminated=False)
    response = exchange(served_local.url, ENCRYPT, [head + ending])
    aborted(response)
    with served_local.client() as client:
        stored = {"kid": "mySymKey", "destination": {"key": "cut"}}
        body = form_bytes(stored, data, terminated=False) + ending
        refused = client.post(ENCRYPT, content=body, headers={"Content-Type": FORM_TYPE})
        problem(refused, 400, "unterminated-multipart")
    assert nothing_stored(served_local.objects)


@pytest.fixture(scope="module")
def served_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with live_api(local_settings(tmp_path_factory.mktemp("faults"))) as api:
        with api.client() as client:
            create_key(client)
        yield api


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_a_part_after_the_file_is_refused(served_local: Api, declared: bool) -> None:
    data = random_bytes(3 * FRAME, seed=11)
    extra = b"\r\n" + part_head("more") + b"x" + CLOSE
    head = form_bytes({"kid": "mySymKey", "frameLength": FRAME}, data, terminated=False)
    body = head + extra
    aborted(exchange(served_local.url, ENCRYPT, [body], length=len(body) if declared else None))
    stored = {"kid": "mySymKey", "destination": {"key": "extra"}}
    body = form_bytes(stored, data, terminated=False) + extra
    with served_local.client() as client:
        refused = client.post(ENCRYPT, content=body, headers={"Content-Type": FORM_TYPE})
        problem(refused, 400, "unexpected-part")
    assert nothing_stored(served_local.objects)


@pytest.mark.parametrize(
    ("size", "whole"),
    [(3 * FRAME - 5, False), (3 * FRAME + 5, True)],
    ids=["inside-a-streamed-frame", "after-the-streamed-frames"],
)
def test_an_epilogue_after_a_declared_length_body(
    served_local: Api, size: int, whole: bool
) -> None:
    """RFC 2046 lets a body go on after its closing boundary (an epilogue), which no
    client we know sends. With the body's length declared, the file's is worked out as if
    nothing followed, and the frames that end within it go out as regular ones while the
    file arrives. A file that ends inside one of them cannot be sealed: the stream is
    aborted, never ended as if complete. Ending after them, it still makes a whole
    message; and sent chunked, the same body is encrypted whole either way."""
    data = random_bytes(size, seed=12)
    body = form_bytes({"kid": "mySymKey", "frameLength": FRAME}, data) + b"an epilogue " * 2
    declared = exchange(served_local.url, ENCRYPT, [body], length=len(body))
    chunked = exchange(served_local.url, ENCRYPT, [body])
    with served_local.client() as client:
        assert decrypt(client, chunked.body).content == data
        if whole:
            assert declared.complete and decrypt(client, declared.body).content == data
        else:
            aborted(declared)


# Reads racing a re-encryption in place


@dataclass
class HeldBodyRead:
    """Holds the first ranged GET of `key` that starts within its first 64 KiB but not
    at 0 (a stored read's body, from the end of its header) until `released`: a read
    stalled between its check and its body."""

    key: bytes
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def __call__(self, head: bytes, length: int) -> bool:
        body = re.search(rb"(?im)^range: bytes=(\d+)-", head)
        line = head.split(b"\r\n", 1)[0]
        held = line.startswith(b"GET /") and b"/" + self.key + b" " in line
        if held and body and 0 < int(body.group(1)) < 64 * KiB and not self.reached.is_set():
            self.reached.set()
            self.released.wait(timeout=60)
        return False


def test_a_read_whose_object_is_swapped_between_its_check_and_its_body_serves_the_new_one(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    """The body is read from the version checked (S3: If-Match with its etag): swapped
    in between, the read is refused before anything is answered, and served whole from
    the new message, checked again."""
    held = HeldBodyRead(b"tenants/default/raced")
    plaintext = random_bytes(3 * MiB, seed=15)
    with (
        behind_proxy(tmp_path, moto_endpoint, s3_bucket, held) as (url, _, _),
        httpx.Client(base_url=url, headers=auth(ADMIN_TOKEN), timeout=60) as client,
    ):
        assert encrypt(client, plaintext, destination={"key": "raced"}).status_code == 201
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_object, client, "raced")
            assert held.reached.wait(timeout=30)
            assert reencrypt_in_place(client, "raced").status_code == 201
            held.released.set()
            served = reading.result(timeout=60)
        assert (served.status_code, served.content) == (200, plaintext)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_check_then_a_swap_makes_the_read_of_the_plaintext_refuse_before_any_byte(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On both backends: a read opened after its object was replaced is refused as
    `PreconditionFailed` (the route checks the object again), not read as the new
    message under the old one's header."""
    plaintext = random_bytes(2 * MiB, seed=16)
    settings = api_settings(backend, tmp_path, request)
    app = create_app(settings)
    with (
        api_server(app, settings=settings) as url,
        Api.of(url, settings, app).client() as client,
    ):
        create_key(client)
        assert encrypt(client, plaintext, destination={"key": "checked"}).status_code == 201
        services: Services = app.state.services
        placement = services.spaces.place("default", ObjectRef(key="checked"))

        async def check() -> CheckedObject:
            return await check_stored(
                services.keys, "default", placement, records=services.records,
                serve_unrecorded=False, expected_kid=None, context={},
                refuse_unproven=False, transfers=CapacityLimiter(1),
            )  # fmt: skip

        async def read(checked: CheckedObject) -> bytes:
            body = await stored_plaintext(checked, CapacityLimiter(1), services.keys.name_keys)
            return b"".join([piece async for piece in body])

        checked = anyio.run(check)
        assert reencrypt_in_place(client, "checked").status_code == 201
        with pytest.raises(PreconditionFailed):
            anyio.run(read, checked)
        assert anyio.run(read, anyio.run(check)) == plaintext


def test_a_read_already_streaming_finishes_the_version_it_started_while_it_is_swapped(
    api: Api,
) -> None:
    """A local file stays open across the rename; S3 streams the GET it opened."""
    plaintext = random_bytes(24 * MiB, seed=17)
    with api.client() as client, api.client() as other:
        create_key(client)
        assert encrypt(client, plaintext, destination={"key": "streamed"}).status_code == 201
        assert client.post(f"{KEYS}/mySymKey/rotate").status_code in (200, 201)
        body = form_bytes({"source": {"key": "streamed"}}, None)
        headers = {"Content-Type": FORM_TYPE}
        with client.stream("POST", DECRYPT, content=body, headers=headers) as reading:
            assert reading.status_code == 200
            assert reading.headers["X-Key-Used"] == "mySymKey#1"
            pieces = reading.iter_bytes(MiB)
            received = [next(pieces)]
            moved = reencrypt_in_place(other, "streamed")
            assert moved.status_code == 201 and moved.headers["X-Key-Used"] == "mySymKey#2"
            received.extend(pieces)
        assert b"".join(received) == plaintext
