"""Archive uploads (`POST /api/crypto/stream/encrypt-archive`) over real HTTP whose
clients hold back. One pauses in a member's middle: the progress lines of the members
sealed meanwhile reach it, and the job's record shows what was taken, while nothing more
arrives; the run then completes once the client sends the rest, or, cancelled during
the pause, stops once it sends more. Another never reads its
progress: the lines waiting for it are bounded, so the sealing waits too, and the run
ends once the client has read nothing for SEALSTREAM_IDLE_TIMEOUT.
"""

import contextlib
import io
import json
import socket
import tarfile
import threading
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx

from tests.conftest import ADMIN_TOKEN, Api, live_api, local_settings
from tests.support.data import tar_archive
from tests.support.http import (
    CLOSE,
    FORM_TYPE,
    auth,
    create_key,
    dechunked,
    form_bytes,
    raw_upload,
    read_response,
    request_head,
)
from tests.support.jobs import finished_job
from tests.support.waiting import wait_until
from tests.test_api_archives import manifest
from tests.test_archive_interrupted import ARCHIVE, FILES

METADATA = {"kid": "mySymKey", "destination": {"prefix": "out/"}}
PAUSED_IN = 9  # the member (from 0) the client stops sending in the middle of
# How long the test waits for what a paused upload should still get: a bound that an
# answer not held back by the pause never comes near, however loaded the machine.
WITHIN = 30


class Paused(NamedTuple):
    """A form whose client pauses half-way through member `PAUSED_IN`'s data."""

    body: bytes
    at: int  # where in the form the client pauses
    archive_at: int  # where in the archive
    data_start: int  # where in the archive the paused member's data starts
    next_at: int  # where in the form the next member's data is half-way through


def paused_body() -> Paused:
    archive = tar_archive(FILES)
    with tarfile.open(fileobj=io.BytesIO(archive)) as members:
        paused, following = members.getmembers()[PAUSED_IN : PAUSED_IN + 2]
    file_start = len(form_bytes(METADATA, b"")) - len(CLOSE)
    archive_at = paused.offset_data + paused.size // 2
    return Paused(
        form_bytes(METADATA, archive),
        file_start + archive_at,
        archive_at,
        paused.offset_data,
        file_start + following.offset_data + following.size // 2,
    )


def sealed_while_paused(sock: socket.socket, paused: Paused) -> tuple[bytes, str]:
    """Send the form up to its pause, and read the response until the members sent whole
    are said to be sealed; what was received, and the job's id."""
    sock.settimeout(WITHIN)
    sock.sendall(paused.body[: paused.at])
    received, events = progress_until_sealed(sock, PAUSED_IN)
    assert events[0]["event"] == "started"
    said = {event["path"] for event in events if event.get("event") == "member"}
    assert said == set(list(FILES)[:PAUSED_IN]), "the members read whole, sealed"
    return received, events[0]["jobId"]


def chunks_received(response: bytes) -> bytes:
    """The body so far of a chunked response still coming: its whole chunks."""
    body = bytearray()
    if b"\r\n\r\n" not in response:
        return b""
    rest = response[response.index(b"\r\n\r\n") + 4 :]
    while b"\r\n" in rest:
        size = int(rest[: rest.index(b"\r\n")], 16)
        start = rest.index(b"\r\n") + 2
        if size == 0 or len(rest) < start + size + 2:
            break
        body += rest[start : start + size]
        rest = rest[start + size + 2 :]
    return bytes(body)


def progress_until_sealed(sock: socket.socket, count: int) -> tuple[bytes, list[dict[str, Any]]]:
    """Read the response until `count` members are said to be sealed (each read waits
    at most `WITHIN` seconds); what was received, and the events so far."""
    received = b""
    while True:
        events = [json.loads(line) for line in chunks_received(received).splitlines()]
        if sum(event.get("status") == "sealed" for event in events) >= count:
            return received, events
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            sealed = [event["path"] for event in events if event.get("status") == "sealed"]
            raise AssertionError(f"only {sealed} said to be sealed while paused") from None
        assert chunk, "the server closed the connection"
        received += chunk


def taken(client: httpx.Client, job_id: str, items: int, offset: int) -> bool:
    """Whether the job's record shows `items` members and more than `offset` bytes."""
    progress = client.get(f"/api/jobs/{job_id}").json()["progress"]
    return bool(progress["itemsDone"] == items and progress["bytesDone"] > offset)


def test_a_paused_uploader_hears_of_the_members_sealed_then_completes(api: Api) -> None:
    paused = paused_body()
    with api.client() as client, raw_upload(api.url, ARCHIVE, len(paused.body)) as sock:
        create_key(client)
        received, job_id = sealed_while_paused(sock, paused)
        # The paused member is taken, and its data read as far as it came.
        assert client.get(f"/api/jobs/{job_id}").json()["status"] == "running"
        progress = lambda: taken(client, job_id, PAUSED_IN + 1, paused.data_start)  # noqa: E731
        wait_until(progress, "the job's record")

        sock.sendall(paused.body[paused.at :])
        lines = dechunked(read_response(sock, received)).splitlines()
    finished = json.loads(lines[-1])
    assert finished["status"] == "succeeded", finished
    assert finished["result"]["counts"]["sealed"] == len(FILES)
    members = [json.loads(line) for line in lines[1:-1]]
    assert sorted(member["path"] for member in members) == sorted(FILES)


def test_a_cancel_while_paused_stops_the_run_once_the_upload_goes_on(api: Api) -> None:
    """A cancel is noticed as the record is next written (once more bytes came), and the
    reading stops at its next chunk, the member it was reading abandoned: the members
    sealed stay, in an incomplete manifest."""
    paused = paused_body()
    with api.client() as client, raw_upload(api.url, ARCHIVE, len(paused.body)) as sock:
        create_key(client)
        received, job_id = sealed_while_paused(sock, paused)
        assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 202
        more = paused.at + 16 * 1024
        sock.sendall(paused.body[paused.at : more])
        # Written after the cancel was asked for, so the write noticed it.
        wait_until(lambda: taken(client, job_id, PAUSED_IN + 1, paused.archive_at), "a write")
        # The rest of the member, and then some: a member is read 1 MiB or its end at a
        # time, and the archive's reading reads ahead of it.
        sock.sendall(paused.body[more : paused.next_at])
        lines = dechunked(read_response(sock, received)).splitlines()
        document = manifest(client)
    finished = json.loads(lines[-1])
    assert finished["status"] == "cancelled", finished
    assert document["complete"] is False
    assert sorted(member["path"] for member in document["members"]) == list(FILES)[:PAUSED_IN]


UNREAD_MEMBERS = 4000  # about three times what the socket buffers and the server hold


def unread_upload(url: str, body: bytes) -> socket.socket:
    """A connection sending `body` (from a thread of its own) whose response is never
    read, its receive buffer made small so that what the server sends soon fills it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    sock.connect((address.hostname, address.port))
    headers = {"Content-Type": FORM_TYPE, "Content-Length": str(len(body)), **auth(ADMIN_TOKEN)}
    request = request_head(url, ARCHIVE, headers) + body
    threading.Thread(target=send_until_dropped, args=(sock, request), daemon=True).start()
    return sock


def send_until_dropped(sock: socket.socket, data: bytes) -> None:
    """Send `data`, or as much of it as goes before the server drops the connection."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def the_running_archive(client: httpx.Client) -> str:
    """The id of the one encrypt-archive job running, once it is."""
    found: list[str] = []

    def running() -> bool:
        listed = client.get("/api/jobs", params={"kind": "encrypt-archive"}).json()["jobs"]
        found[:] = [job["id"] for job in listed if job["status"] == "running"]
        return len(found) == 1

    wait_until(running, "the archive's job")
    return found[0]


def test_an_uploader_that_reads_no_progress_holds_the_run_back_until_it_is_ended(
    tmp_path: Path,
) -> None:
    """A client that sends its archive and never reads the response: its lines wait up to
    the server's bound, the sealing then waits too, and once the client has read nothing
    for SEALSTREAM_IDLE_TIMEOUT the run ends, the members sealed so far listed."""
    # Long names make long lines (each names its member and its object twice over).
    long_name = "/".join(["x" * 150] * 5)  # a file name has at most 255 bytes
    files = {f"{n:04d}/{long_name}": b"%d" % n for n in range(UNREAD_MEMBERS)}
    body = form_bytes(METADATA, tar_archive(files))
    settings = local_settings(tmp_path).model_copy(update={"idle_timeout": 2.0})
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        sock = unread_upload(api.url, body)
        try:
            job = finished_job(client, the_running_archive(client), timeout=120)
        finally:
            sock.close()
        assert job["status"] == "failed", job["result"]
        assert job["error"]["code"] == "client-disconnected", job["error"]
        document = manifest(client)
    assert document["complete"] is False
    assert 0 < document["counts"]["sealed"] < UNREAD_MEMBERS
