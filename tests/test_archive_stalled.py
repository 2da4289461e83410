"""Archive uploads (`POST /api/crypto/stream/encrypt-archive`) whose clients stop sending
mid-member, over real HTTP against `sealstream serve` on its local directory: the rest
of the server keeps answering. A slow client holds what its own upload needs (its
streams, the threads sealing its members), never what other requests wait for (the
shared thread pool, the store's lock), up to as many stalled archives as the streams
allow.
"""

import fcntl
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.data import tar_archive
from tests.support.http import create_key, form_bytes, problem, raw_upload
from tests.support.services import ServeProcess, sealstream_serve
from tests.test_archive_interrupted import ARCHIVE, FILES, metadata, send_part

BATCH_CONCURRENCY = 4
SETTINGS = {
    "SEALSTREAM_BATCH_CONCURRENCY": str(BATCH_CONCURRENCY),
    "SEALSTREAM_IDLE_TIMEOUT": "3600",  # the uploads stay stalled for the whole test
    "SEALSTREAM_LIFECYCLE_INTERVAL": "0.2",  # sweeps of the store go on meanwhile
}
# How long a request may go unanswered before the test fails: a bound an answer of a
# server that is not starved never comes near, however loaded the machine.
ANSWER_WITHIN = 20


@contextmanager
def stalled_archives(served: ServeProcess, prefixes: list[str]) -> Iterator[list[str]]:
    """Archive uploads under `prefixes`, each stopped by its client in a member's middle;
    their jobs' ids."""
    bodies = [form_bytes(metadata(prefix=prefix), tar_archive(FILES)) for prefix in prefixes]
    with ExitStack() as uploads:
        sockets: list[socket.socket] = [
            uploads.enter_context(raw_upload(served.url, ARCHIVE, len(body), served.admin_token))
            for body in bodies
        ]
        yield [send_part(sock, body) for sock, body in zip(sockets, bodies, strict=True)]


def printed_since(served: ServeProcess, lines: int) -> int:
    return sum(len(line) + 1 for line in served.output[lines:])


def keep_asking(served: ServeProcess, client: httpx.Client, prefixes: list[str]) -> None:
    """List under each prefix and read the key, again and again, until the server has
    logged more than its output's pipe holds: every request is answered, with the store
    swept meanwhile, and the test's reading of the server's log keeps up."""
    assert served.process.stdout is not None
    capacity = fcntl.fcntl(served.process.stdout.fileno(), fcntl.F_GETPIPE_SZ)
    start = len(served.output)
    while printed_since(served, start) <= 2 * capacity:
        for prefix in prefixes:
            listed = client.get("/api/objects", params={"prefix": prefix})
            assert listed.status_code == 200, listed.text
        key = client.get("/api/key-management/keys/mySymKey")
        assert key.status_code == 200, key.text


def still_running(client: httpx.Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        job = client.get(f"/api/jobs/{job_id}")
        assert job.status_code == 200 and job.json()["status"] == "running", job.text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("archives", [1, 3])
def test_stalled_archive_uploads_up_to_the_stream_limit_starve_no_other_request(
    tmp_path: Path, archives: int
) -> None:
    prefixes = [f"live{n}/" for n in range(archives)]
    cap = str(archives * BATCH_CONCURRENCY)  # a single tenant, given every stream
    streams = {"SEALSTREAM_MAX_STREAMS": cap, "SEALSTREAM_MAX_STREAMS_PER_TENANT": cap}
    with (
        sealstream_serve(tmp_path, {**SETTINGS, **streams}) as served,
        httpx.Client(
            base_url=served.url,
            headers={"Authorization": f"Bearer {served.admin_token}"},
            timeout=ANSWER_WITHIN,
        ) as client,
    ):
        create_key(client)
        with stalled_archives(served, prefixes) as job_ids:
            one_more = client.post(ARCHIVE, content=b"", headers={"Content-Type": "text/plain"})
            problem(one_more, 503, "too-many-streams")  # the streams are all taken
            keep_asking(served, client, prefixes)
            still_running(client, job_ids)
