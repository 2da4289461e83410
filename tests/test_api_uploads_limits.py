"""What a tenant's resumable uploads may take of a server: a PATCH counts against the
stream cap as the memory it can hold (its upload's parts), so a flood of PATCHes gets
503 too-many-streams as ordinary streams do; and a tenant's unfinished uploads are
capped (429 too-many-open-uploads), each freeing its place once finished, terminated or
swept, counted in Redis where uploads are anchored and from the stored states where not."""

import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from api.routes.uploads import patch_memory
from sealstream.capacity import stream_memory
from services.jobs.redis_store import redis_client
from services.resumable import PART_TARGET
from services.upload_anchor import UploadAnchor
from storage import ObjectStore
from tests.conftest import Api, api_settings, live_api, local_settings
from tests.support.data import random_bytes
from tests.support.http import create_key, encrypt, problem, read_object
from tests.support.waiting import wait_until
from tests.test_api_objects import tenant_client
from tests.test_api_uploads import FRAME, TUS, create, patch, post_upload
from tests.test_api_uploads_sweep import paused, state_of

if TYPE_CHECKING:
    from tests.support.services import RedisServer


def test_a_patch_counts_as_the_streams_its_memory_makes(tmp_path: Path) -> None:
    """A PATCH of an upload with 16 MiB parts holds about 130 MiB: 4 streams of the
    default 40 MiB. With a cap of 4, one held PATCH leaves no room for another stream or
    PATCH, and an ordinary stream under way leaves none for a PATCH (a single tenant,
    given every stream as its share)."""
    settings = local_settings(tmp_path).model_copy(
        update={"max_streams": 4, "max_streams_per_tenant": 4}
    )
    data = random_bytes(PART_TARGET + FRAME, seed=51)
    let_go = threading.Event()
    with live_api(settings) as api, api.client() as client, ThreadPoolExecutor(1) as pool:
        create_key(client)
        held, other = create(client, len(data), key="up/held"), create(client, FRAME, "up/other")
        unit = stream_memory(settings.s3_part_size, settings.s3_parts_in_flight)
        assert -(-patch_memory(state_of(api, held)) // unit) == 4
        body = paused(data[:FRAME], data[FRAME:], let_go)
        patching = pool.submit(patch, api.client(), held, 0, body)
        try:
            wait_until(lambda: state_of(api, held).held, "the PATCH to hold its upload")

            problem(encrypt(client, b"more"), 503, "too-many-streams")
            refused = patch(client, other, 0, b"x" * FRAME)
            problem(refused, 503, "too-many-streams")
            assert refused.headers["Retry-After"] == "1"
        finally:
            let_go.set()
        assert patching.result().status_code == 204
        assert patch(client, other, 0, b"x" * FRAME).status_code == 204
        assert read_object(client, "up/held").content == data


@pytest.mark.parametrize("frame_length", [FRAME, 4096])
def test_a_patch_holds_no_more_memory_than_it_is_counted_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frame_length: int
) -> None:
    """Every allocation of the process (the server's, and the client's) while a PATCH of
    five parts goes through a store slower than its body: no more than `patch_memory`,
    which admission counts it for, with the frames the service writes and with the
    smallest a client may ask for (many frames, each with its Python objects)."""
    data = random_bytes(5 * PART_TARGET + FRAME, seed=53)
    put_part = ObjectStore.put_part

    def slow_put_part(store: ObjectStore, *args: Any) -> Any:
        time.sleep(0.3)
        return put_part(store, *args)

    monkeypatch.setattr(ObjectStore, "put_part", slow_put_part)
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        create_key(client)
        url = create(client, len(data), frameLength=str(frame_length))
        counted = patch_memory(state_of(api, url))
        tracemalloc.start()
        try:
            held = tracemalloc.get_traced_memory()[0]
            chunks = (data[at : at + 64 * 1024] for at in range(0, len(data), 64 * 1024))
            assert patch(client, url, 0, chunks).status_code == 204
            peak = tracemalloc.get_traced_memory()[1] - held
        finally:
            tracemalloc.stop()
    assert peak <= counted, f"{peak / 2**20:.1f} MiB held, counted for {counted / 2**20:.1f}"


def test_a_tenant_holding_its_share_of_streams_leaves_the_others_theirs(tmp_path: Path) -> None:
    """With a cap of 8, a tenant may hold 4 streams (half): its PATCH held open, slow,
    holds them all, and its next stream or PATCH gets 429 too-many-tenant-streams, while
    another tenant's stream and PATCH run."""
    settings = local_settings(tmp_path).model_copy(update={"max_streams": 8})
    data = random_bytes(PART_TARGET + FRAME, seed=52)
    let_go = threading.Event()
    with live_api(settings) as api, api.client() as client, ThreadPoolExecutor(1) as pool:
        create_key(client)
        held, more = create(client, len(data), key="up/held"), create(client, FRAME, "up/more")
        body = paused(data[:FRAME], data[FRAME:], let_go)
        patching = pool.submit(patch, api.client(), held, 0, body)
        scopes = ("keys:write", "crypto:encrypt", "crypto:decrypt")
        try:
            wait_until(lambda: state_of(api, held).held, "the PATCH to hold its upload")

            refused = problem(encrypt(client, b"more"), 429, "too-many-tenant-streams")
            assert "(4)" in refused["detail"]
            problem(patch(client, more, 0, b"x" * FRAME), 429, "too-many-tenant-streams")
            with tenant_client(api, client, "other", *scopes) as other:
                create_key(other)
                assert encrypt(other, b"theirs").status_code == 200
                theirs = create(other, FRAME, key="up/theirs")
                assert patch(other, theirs, 0, b"y" * FRAME).status_code == 204
        finally:
            let_go.set()
        assert patching.result().status_code == 204
        assert patch(client, more, 0, b"x" * FRAME).status_code == 204
        assert encrypt(client, b"more").status_code == 200


@pytest.fixture(params=["local-unanchored", "s3-anchored"])
def capped_api(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: "RedisServer"
) -> Iterator[Api]:
    """A live server whose tenants may have two unfinished uploads each: on the embedded
    default with no Redis (counted from the states), and on S3 anchored in Redis."""
    backend, mode = request.param.split("-")
    settings = api_settings(backend, tmp_path, request)
    with live_api(settings.model_copy(update={"max_open_uploads": 2})) as api:
        if mode == "anchored":
            anchor = UploadAnchor(redis_client(redis_server.url, ""))
            api.parts.__dict__["upload_anchor"] = anchor
        yield api


def test_a_tenant_has_so_many_open_uploads_at_once(capped_api: Api) -> None:
    api = capped_api
    with api.client() as client:
        create_key(client)
        ended = create(client, FRAME, key="up/a")
        finished = create(client, FRAME, key="up/b")

        problem(post_upload(client, FRAME, "up/c"), 429, "too-many-open-uploads")

        with tenant_client(api, client, "other", "crypto:encrypt", "keys:write") as other:
            create_key(other)
            assert post_upload(other, FRAME, "up/a").status_code == 201  # its own count
        assert client.delete(ended, headers=TUS).status_code == 204
        create(client, FRAME, key="up/c")
        problem(post_upload(client, FRAME, "up/d"), 429, "too-many-open-uploads")
        assert patch(client, finished, 0, b"b" * FRAME).status_code == 204
        create(client, FRAME, key="up/d")
        problem(post_upload(client, FRAME, "up/e"), 429, "too-many-open-uploads")
        swept = api.parts.uploads().expire(datetime.now(UTC) + timedelta(days=2))
        assert sorted(state.key for state in swept.expired) == ["up/a", "up/c", "up/d"]
        create(client, FRAME, key="up/e")
        create(client, FRAME, key="up/f")
        problem(post_upload(client, FRAME, "up/g"), 429, "too-many-open-uploads")
