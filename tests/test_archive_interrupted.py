"""An archive streamed in with hidden names (`POST /api/crypto/stream/encrypt-archive`,
`"names": "encrypted"`) whose upload is cut off mid-archive, over real HTTP, then sent
again. The route cannot resume (the archive is the request's body, gone with its
connection), so what it promises is tested: the uploader's connection dropped ends the
run cleanly (the members sealed before stay, listed in a manifest marked incomplete; no
object or pending upload of the member being read), a server killed mid-archive leaves
only whole members, and the archive sent again with `overwrite` lands on the same
objects, every member once, with a complete manifest mapping the names back. What the
killed server left in flight on its local directory (its temporary files) the lifecycle
sweep removes once old enough, never the file of a live writer however long it stalls.
"""

import json
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from sealstream.settings import Settings
from tests.conftest import Api
from tests.support.data import random_bytes, tar_archive
from tests.support.http import (
    FORM_TYPE,
    create_key,
    dechunked,
    form_bytes,
    raw_upload,
    read_object,
    read_response,
)
from tests.support.jobs import finished_job
from tests.support.services import sealstream_serve
from tests.support.waiting import wait_until
from tests.test_api_archives import manifest

ARCHIVE = "/api/crypto/stream/encrypt-archive"
FILES = {f"hr/{n:02d}/person-{n}.pdf": random_bytes(150_000 + n, seed=n) for n in range(12)}
SEALED_BEFORE_THE_CUT = 3  # members stored before the connection is dropped
_JOB_ID = re.compile(rb'"jobId": "(job_[0-9a-f]+)"')


def metadata(overwrite: bool = False, prefix: str = "out/") -> dict[str, Any]:
    destination = {"prefix": prefix, "overwrite": overwrite}
    return {"kid": "mySymKey", "destination": destination, "names": "encrypted"}


def send_part(sock: socket.socket, body: bytes) -> str:
    """Send three quarters of `body` (the tenth member cut in its middle: small members
    are started a wave at a time, up to one per sealer, so the nine read whole start);
    the job's id, from the first progress line."""
    sock.sendall(body[: len(body) * 3 // 4])
    received = b""
    while (job := _JOB_ID.search(received)) is None:
        chunk = sock.recv(65536)
        assert chunk, received.decode(errors="replace")
        received += chunk
    return job.group(1).decode()


def some_sealed(client: httpx.Client) -> list[str]:
    """Wait until a few members are stored (each is visible only once whole); their keys."""
    wait_until(lambda: len(stored_names(client)) >= SEALED_BEFORE_THE_CUT, "members sealed")
    return stored_names(client)


def drop(sock: socket.socket) -> None:
    """Reset the connection, as a client killed mid-upload leaves it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def send_again(client: httpx.Client, body: bytes) -> dict[str, Any]:
    response = client.post(ARCHIVE, content=body, headers={"Content-Type": FORM_TYPE})
    assert response.status_code == 200, response.text
    finished: dict[str, Any] = json.loads(response.text.splitlines()[-1])
    assert finished["status"] == "succeeded", finished
    return finished


def stored_names(client: httpx.Client) -> list[str]:
    """The keys of the tenant's objects under out/, as the API lists them."""
    listed = client.get("/api/objects", params={"prefix": "out/", "limit": 1000})
    assert listed.status_code == 200, listed.text
    return [entry["key"] for entry in listed.json()["objects"]]


def check_once_each(client: httpx.Client, earlier: dict[str, str]) -> None:
    """Every member of the source exactly once under out/, at the key the run before
    gave it (if it sealed it), readable, and mapped back by a complete manifest."""
    document = manifest(client)
    assert document["complete"] is True and document["nameKeyVersion"] == 1
    keys = {m["path"]: m["key"] for m in document["members"] if m["status"] == "sealed"}
    assert set(keys) == set(FILES)
    assert {path: keys[path] for path in earlier} == earlier, "the same names as before"
    assert sorted(stored_names(client)) == sorted([*keys.values(), "out/manifest.json"])
    for path, key in keys.items():
        assert read_object(client, key).content == FILES[path], path


def test_an_uploader_dropped_mid_archive_leaves_whole_members_and_a_resend_completes(
    api: Api,
) -> None:
    first, again = (
        form_bytes(metadata(), tar_archive(FILES)),
        form_bytes(metadata(True), tar_archive(FILES)),
    )
    with api.client() as client:
        create_key(client)
        with raw_upload(api.url, ARCHIVE, len(first)) as sock:
            job_id = send_part(sock, first)
            seen = some_sealed(client)
            drop(sock)
        job = finished_job(client, job_id)
        assert job["status"] == "failed", job
        document = manifest(client)
        assert document["complete"] is False and document["error"] is not None
        sealed = {m["path"]: m["key"] for m in document["members"] if m["status"] == "sealed"}
        assert set(seen) <= set(sealed.values()) and set(sealed) < set(FILES)
        assert sorted(stored_names(client)) == sorted([*sealed.values(), "out/manifest.json"])
        assert api.objects.pending_uploads("tenants/default/out/") == []
        for path, key in sealed.items():
            assert read_object(client, key).content == FILES[path], path

        send_again(client, again)
        check_once_each(client, sealed)


def killed_mid_archive(cwd: Path, body: bytes) -> list[str]:
    """Send `sealstream serve`, started in `cwd`, most of `body` and kill it with SIGKILL
    once some members are stored; their keys."""
    with sealstream_serve(cwd) as served:
        headers = {"Authorization": f"Bearer {served.admin_token}"}
        with (
            httpx.Client(base_url=served.url, headers=headers, timeout=60) as client,
            raw_upload(served.url, ARCHIVE, len(body), served.admin_token) as sock,
        ):
            create_key(client)
            send_part(sock, body)
            seen = some_sealed(client)
            served.process.kill()
            served.process.wait()
    return seen


@pytest.mark.timeout(300)
def test_a_server_killed_mid_archive_leaves_whole_members_and_a_resend_completes(
    tmp_path: Path,
) -> None:
    first, again = (
        form_bytes(metadata(), tar_archive(FILES)),
        form_bytes(metadata(True), tar_archive(FILES)),
    )
    seen = killed_mid_archive(tmp_path, first)
    with sealstream_serve(tmp_path) as restarted:
        headers = {"Authorization": f"Bearer {restarted.admin_token}"}
        with httpx.Client(base_url=restarted.url, headers=headers, timeout=60) as client:
            left = stored_names(client)
            assert "out/manifest.json" not in left  # the killed run wrote none
            assert set(seen) <= set(left)
            for key in left:  # only whole, authentic members
                assert read_object(client, key).content in FILES.values(), key
            send_again(client, again)
            check_once_each(client, {})
            paths = {m["path"]: m["key"] for m in manifest(client)["members"]}
            assert set(left) <= set(paths.values()), "the resend found what the killed run wrote"


def temporaries(directory: Path) -> set[Path]:
    """The temporary files of writes in flight (or left) in the served local directory."""
    return set(directory.glob("**/.tmp-*"))


def stored(directory: Path) -> list[Path]:
    """The objects' files in a directory of the served local directory."""
    return [path for path in directory.glob("*") if not path.name.startswith(".tmp-")]


def backdate(paths: set[Path], seconds: float) -> None:
    """Make files look last written `seconds` ago, as a writer stalled that long leaves
    its file (the sweep's bound is hours: the test cannot wait it out)."""
    then = next(iter(paths)).stat().st_mtime - seconds
    for path in paths:
        os.utime(path, (then, then))


@pytest.mark.timeout(300)
def test_the_sweep_removes_what_a_killed_server_left_in_flight_but_no_live_write(
    tmp_path: Path,
) -> None:
    """Files a killed server left are removed once past SEALSTREAM_LOCAL_TEMP_EXPIRY; a
    live writer's, stalled as long, stays, and its archive completes."""
    live = form_bytes(metadata(prefix="live/"), tar_archive(FILES))
    killed_mid_archive(tmp_path, form_bytes(metadata(), tar_archive(FILES)))
    left = temporaries(tmp_path)
    assert left, "the killed server left its writes in flight"
    sweeping = {"SEALSTREAM_LIFECYCLE_INTERVAL": "0.2"}
    with sealstream_serve(tmp_path, sweeping) as restarted:
        with raw_upload(restarted.url, ARCHIVE, len(live), restarted.admin_token) as sock:
            sock.sendall(live[: len(live) * 3 // 4])
            # The eight members read whole are stored: the ninth, cut off, and the manifest
            # are the writes left in flight.
            members = tmp_path / ".sealstream" / "tenants" / "default" / "live"
            wait_until(lambda: len(stored(members)) == 8, "the whole members stored")
            writing = temporaries(tmp_path) - left
            assert len(writing) == 2, writing
            expiry = 7 * 24 * 3600  # the setting's default
            backdate(writing, expiry + 3600)
            backdate(left, expiry + 3600)
            wait_until(lambda: not temporaries(tmp_path) & left, "the sweep")
            # One more sweep, begun once both were old: it too leaves the live file.
            sentinel = next(iter(writing)).with_name(".tmp-" + "0" * 32 + "-left")
            sentinel.write_bytes(b"")
            backdate({sentinel}, expiry + 3600)
            wait_until(lambda: not sentinel.exists(), "another sweep")
            assert writing <= temporaries(tmp_path), "a live write's file was removed"
            sock.sendall(live[len(live) * 3 // 4 :])
            sock.settimeout(60)
            lines = dechunked(read_response(sock)).splitlines()
        assert json.loads(lines[-1])["status"] == "succeeded", lines[-1]
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            client.headers["Authorization"] = f"Bearer {restarted.admin_token}"
            sealed = manifest(client, "live/")["members"]
            assert all(member["status"] == "sealed" for member in sealed)
            assert len(sealed) == len(FILES)


def test_temporaries_outlive_a_resumable_upload_left_between_its_patches() -> None:
    """No live resumable upload's file (held by no writer between PATCHes) is old enough."""
    with pytest.raises(ValidationError, match="SEALSTREAM_UPLOAD_EXPIRY"):
        Settings(upload_expiry=7200, local_temp_expiry=7200)
    assert Settings(upload_expiry=7200, local_temp_expiry=7201).local_temp_expiry == 7201
