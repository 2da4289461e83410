"""A resumable upload's state read while a write of it is in flight (moved in Redis, not
yet in the bucket; the write held on its way to S3): a HEAD then answers the offset of
the state the bucket holds, as no tampering; a server killed there leaves an upload that
another server takes up from that state, where bytes sent again must still be those
sent before; and that state put back once the write has landed is refused."""

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
from anyio import CapacityLimiter
from starlette.requests import Request

from api.routes.uploads import HANDOFF_BYTES, _feed
from keystore import LocalKek
from services.jobs.redis_store import redis_client
from services.resumable import UPLOADS_PREFIX, Appending
from services.upload_anchor import KEY_PREFIX, Anchored, UploadAnchor
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api, local_settings
from tests.support.data import random_bytes
from tests.support.http import create_key, problem, read_object
from tests.support.s3_proxy import HeldEach, HeldFirst, S3FaultProxy
from tests.support.services import sealstream_serve
from tests.test_api_uploads import FRAME, TUS, completed_head, create, offset_of, patch
from tests.test_api_uploads_faults import send_part_of_patch
from tests.test_api_uploads_parts import refused_uploads

if TYPE_CHECKING:
    from api.services import Services
    from tests.support.services import RedisServer

# A PATCH short of a part writes the state three times: its lock, the HMACs of its frames
# (before their ciphertext is staged), then the offset past them with the lock let go.
STATE_PUT = rb"^PUT \S*uploads/[0-9a-f]{32}\.json"
LAST_OF_PATCH = 2  # state writes let through before the one held


@pytest.fixture
def held() -> HeldFirst:
    return HeldFirst(STATE_PUT, skip=LAST_OF_PATCH)


@contextmanager
def api_through(
    proxy: S3FaultProxy, request: pytest.FixtureRequest, tmp_path: Path, redis: "RedisServer"
) -> Iterator[Api]:
    """A live API server on S3 through `proxy`, its uploads anchored in `redis`."""
    settings = api_settings("s3", tmp_path, request).model_copy(
        update={"s3_endpoint_url": proxy.url}
    )
    with live_api(settings) as api:
        api.parts.__dict__["upload_anchor"] = UploadAnchor(redis_client(redis.url, ""))
        yield api


@pytest.fixture
def s3_api(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: "RedisServer",
    moto_endpoint: str,
    held: HeldFirst,
) -> Iterator[Api]:
    with (
        S3FaultProxy(moto_endpoint, held) as proxy,
        api_through(proxy, request, tmp_path, redis_server) as api,
    ):
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


def test_two_requests_that_read_one_unlocked_state_never_both_advance(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: "RedisServer",
    moto_endpoint: str,
) -> None:
    """Two PATCHes at once from one offset: while the first's lock is on its way to the
    bucket (moved in Redis, held), the second reads the state still unlocked; it is
    refused (423) rather than taking the first's step in flight over, so that the first
    lands and goes on, and the upload is never left with one state in the bucket and
    another anchored (502 for ever)."""
    data = random_bytes(4 * FRAME, seed=45)
    held = HeldEach(STATE_PUT, count=2)
    with (
        S3FaultProxy(moto_endpoint, held) as proxy,
        api_through(proxy, request, tmp_path, redis_server) as api,
        api.client() as client,
        ThreadPoolExecutor(2) as pool,
    ):
        create_key(client)
        url = create(client, len(data))
        assert patch(client, url, 0, data[:FRAME]).status_code == 204
        before = refused_uploads(api)
        held.arm()
        first = pool.submit(patch, client, url, FRAME, data[FRAME:])
        assert held.held[0].wait(timeout=60)  # its lock moved in Redis, not yet written
        second = pool.submit(patch, client, url, FRAME, data[FRAME:])
        try:
            while not (second.done() or held.held[1].is_set()):
                time.sleep(0.05)  # until it is answered, or its own lock is on its way
        finally:
            held.disarm()
            held.release(0)  # the first's write lands first
            held.release(1)  # then the second's, if it got that far

        problem(second.result(), 423, "upload-locked")
        assert first.result().status_code == 204
        completed_head(client, url, len(data))
        assert read_object(client, "up/obj").content == data
        assert refused_uploads(api) == before


def test_a_state_write_whose_answer_was_lost_is_taken_as_written(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: "RedisServer",
    moto_endpoint: str,
) -> None:
    """The store's answer to a PATCH's state write lost after the write landed: the
    client's retry finds the version moved on (412), by that very write. The state read
    back is the one written, so the step is committed and the PATCH goes on, rather than
    Redis being put back at the state before while the bucket holds the new one (every
    request after it 502)."""
    data = random_bytes(3 * FRAME, seed=46)
    with (
        S3FaultProxy(moto_endpoint) as proxy,
        api_through(proxy, request, tmp_path, redis_server) as api,
        api.client() as client,
    ):
        create_key(client)
        url = create(client, len(data))
        assert patch(client, url, 0, data[:FRAME]).status_code == 204
        before = refused_uploads(api)
        proxy.drop_answer(STATE_PUT)  # the next PATCH's lock

        assert patch(client, url, FRAME, data[FRAME : 2 * FRAME]).status_code == 204

        assert offset_of(client, url) == 2 * FRAME
        assert patch(client, url, 2 * FRAME, data[2 * FRAME :]).status_code == 204
        assert read_object(client, "up/obj").content == data
        assert refused_uploads(api) == before


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
            completed_head(client, url, len(data))


def test_a_step_in_flight_is_taken_over_only_from_the_state_it_replaces(
    redis_server: "RedisServer",
) -> None:
    """The anchor's moves on their own: a request goes on from the state a step in
    flight replaces once that step's hold is over (superseding it, whose commit then
    fails), never before it, nor from an older state, nor once the step is marked
    written; an undo puts back what its advance replaced, a lapsed step in flight
    included, which its writer may then still commit; an anchor of the form before
    digests is taken at its generation."""
    client = redis_client(redis_server.url, "")
    anchor = UploadAnchor(client)
    g1, g2, g3, other = (1, "a1"), (2, "b2"), (3, "c3"), (2, "d4")
    held, lapsed = timedelta(minutes=5), timedelta(0)
    client.set(f"{KEY_PREFIX}up", "1")
    live = anchor.advance("up", g1, g2, held)  # from the bare generation
    assert live is not None
    assert anchor.advance("up", g1, other, held) is None  # its writer is live
    assert anchor.advance("up", (0, "a1"), other, held) is None
    anchor.undo("up", live)
    assert anchor.current("up") == Anchored(1, "")

    dead = anchor.advance("up", g1, g2, lapsed)
    assert dead is not None
    taking = anchor.advance("up", g1, other, held)  # g2's writer died in flight
    assert taking is not None
    assert not anchor.commit("up", dead)
    anchor.undo("up", taking)  # its write failed: g2's landed after all
    assert anchor.commit("up", dead)
    assert anchor.current("up") == Anchored(*g2)
    assert anchor.advance("up", g1, other, lapsed) is None  # written: g1 is refused

    step = anchor.advance("up", g2, g3, lapsed)
    assert step is not None
    taking = anchor.advance("up", g2, other, held)
    assert taking is not None
    assert anchor.commit("up", taking)
    current = anchor.current("up")
    assert isinstance(current, Anchored)
    assert current.accepts(*other) and not current.accepts(*g2)
    assert not anchor.commit("up", step)
    anchor.undo("up", step)  # no longer in flight: nothing put back
    assert anchor.current("up") == Anchored(*other)


def test_a_patch_cancelled_while_a_write_is_sealing_waits_for_it(tmp_path: Path) -> None:
    """The request task cancelled (a server's shutdown) while the body's last handoff is
    being sealed on a thread: `_feed` ends only once that write has, so the PATCH's
    abandon never runs beside it (two threads would use one upload's state)."""
    sealing, release = threading.Event(), threading.Event()

    class Blocking:
        def write_chunks(self, chunks: list[bytes]) -> None:
            sealing.set()
            release.wait(timeout=30)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x" * HANDOFF_BYTES, "more_body": False}

    async def main() -> tuple[bool, bool]:
        request = Request({"type": "http", "method": "PATCH", "headers": []}, receive)
        svc = SimpleNamespace(settings=local_settings(tmp_path), transfers=CapacityLimiter(2))
        feeding = asyncio.create_task(
            _feed(cast("Services", svc), request, cast("Appending", Blocking()))
        )
        await asyncio.to_thread(sealing.wait, 30)
        feeding.cancel()
        await asyncio.sleep(0.5)
        ended_while_sealing = feeding.done()
        release.set()
        with suppress(asyncio.CancelledError):
            await feeding
        return ended_while_sealing, feeding.cancelled()

    ended_while_sealing, cancelled = asyncio.run(main())
    assert not ended_while_sealing
    assert cancelled
