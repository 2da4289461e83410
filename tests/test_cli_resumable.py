"""`sealstream encrypt FILE --to-storage KEY --resume` against a live server: a resumable
upload that goes on through its own retries and, once those are spent, through a rerun of
the command, which finds the upload the first run kept (its path only) and finishes it."""

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import Api
from tests.support.cut_proxy import CuttingProxy
from tests.support.data import KiB, MiB, random_bytes
from tests.support.http import create_key, read_object
from tests.test_api_uploads import TUS, offset_of, patch
from tests.test_cli_commands import KID, run

FRAME = 64 * KiB
WHOLE = 1 << 40


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_a_rerun_finishes_the_upload_a_cut_off_run_left(api: Api, tmp_path: Path) -> None:
    data = random_bytes(3 * MiB + 777, seed=31)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    state = tmp_path / "state"
    args = ("encrypt", str(plain), "--kid", KID, "--to-storage", "r/big", "--resume", "--json")
    frames = ("--frame-length", str(FRAME))
    with api.client() as client:
        create_key(client)
    # POST and HEAD whole, then each PATCH cut (its HEAD whole): five in a row, which
    # spends the client's attempts; connections after the list run whole.
    cuts = [WHOLE, WHOLE] + [200 * KiB, WHOLE] * 5
    with CuttingProxy(api.url, cuts) as proxy:
        env = {"SEALSTREAM_URL": proxy.url, "XDG_STATE_HOME": str(state)}
        failed = run(api, *args, *frames, env=env)
        (note,) = (state / "sealstream" / "uploads").iterdir()
        upload = json.loads(note.read_text())["upload"]

        finished = run(api, *args, *frames, env=env)

    assert failed.returncode != 0 and proxy.cut == 5
    assert upload.startswith("/api/uploads/")  # its path, nothing of the file
    assert finished.returncode == 0, finished.stderr
    stored = json.loads(finished.stdout)
    assert stored["upload"] == upload and stored["verifyJob"]
    assert not note.exists()
    with api.client() as client:
        assert read_object(client, "r/big").content == data


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_a_head_cut_off_is_tried_again_like_a_patch(api: Api, tmp_path: Path) -> None:
    """The HEAD after a cut PATCH is cut too: the run goes on rather than failing."""
    data = random_bytes(MiB + 5, seed=32)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    args = ("encrypt", str(plain), "--kid", KID, "--to-storage", "r/head", "--resume", "--json")
    with api.client() as client:
        create_key(client)
    # POST and HEAD whole, the PATCH cut, the HEAD after it cut within its request line.
    cuts = [WHOLE, WHOLE, 200 * KiB, 10]
    with CuttingProxy(api.url, cuts) as proxy:
        env = {"SEALSTREAM_URL": proxy.url, "XDG_STATE_HOME": str(tmp_path / "state")}
        finished = run(api, *args, "--frame-length", str(FRAME), env=env)

    assert proxy.cut == 2
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["verifyJob"]
    with api.client() as client:
        assert read_object(client, "r/head").content == data


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_a_file_changed_in_place_with_its_mtime_put_back_is_not_resumed(
    api: Api, tmp_path: Path
) -> None:
    """A rerun after the file was rewritten (same size, modification time set back as a
    tool restoring it would) starts a new upload, and terminates the one the first run
    left: going on with it would store an object of old and new bytes."""
    old, new = random_bytes(3 * MiB + 777, seed=33), random_bytes(3 * MiB + 777, seed=34)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(old)
    state = tmp_path / "state"
    args = ("encrypt", str(plain), "--kid", KID, "--to-storage", "r/changed", "--resume")
    more = ("--json", "--frame-length", str(FRAME))
    with api.client() as client:
        create_key(client)
    cuts = [WHOLE, WHOLE] + [200 * KiB, WHOLE] * 5  # five PATCHes cut past their first frames
    with CuttingProxy(api.url, cuts) as proxy:
        env = {"SEALSTREAM_URL": proxy.url, "XDG_STATE_HOME": str(state)}
        failed = run(api, *args, *more, env=env)
        (note,) = (state / "sealstream" / "uploads").iterdir()
        left = json.loads(note.read_text())["upload"]
        with api.client() as client:
            assert int(client.head(left, headers=TUS).headers["upload-offset"]) > 0
        before = plain.stat()
        with plain.open("r+b") as file:  # in place: the same inode
            file.write(new)
        os.utime(plain, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = plain.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )

        finished = run(api, *args, *more, env=env)  # the proxy's connections now whole

    assert failed.returncode != 0
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["upload"] != left
    assert not note.exists()
    with api.client() as client:
        assert read_object(client, "r/changed").content == new
        assert client.head(left, headers=TUS).status_code == 404  # terminated


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_a_rerun_after_another_request_completed_the_upload_reports_it_done(
    api: Api, tmp_path: Path
) -> None:
    """The upload a cut-off run left is completed by another request (as the last PATCH
    whose answer was lost would have): the rerun reports it stored, naming the upload and
    no verify job, rather than failing on a 404 or a 409 object-exists."""
    data = random_bytes(MiB + 9, seed=35)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    state = tmp_path / "state"
    args = ("encrypt", str(plain), "--kid", KID, "--to-storage", "r/done", "--resume", "--json")
    with api.client() as client:
        create_key(client)
    with CuttingProxy(api.url, [WHOLE, WHOLE] + [200 * KiB, WHOLE] * 5) as proxy:
        env = {"SEALSTREAM_URL": proxy.url, "XDG_STATE_HOME": str(state)}
        failed = run(api, *args, "--frame-length", str(FRAME), env=env)
        (note,) = (state / "sealstream" / "uploads").iterdir()
        upload = json.loads(note.read_text())["upload"]
        with api.client() as client:
            for _ in range(50):  # until the cut PATCHes' server side has let the upload go
                offset = offset_of(client, upload)
                if (answer := patch(client, upload, offset, data[offset:])).status_code not in (
                    409,
                    423,
                ):
                    break
                time.sleep(0.1)
            assert answer.status_code == 204, answer.text

        finished = run(api, *args, "--frame-length", str(FRAME), env=env)

    assert failed.returncode != 0
    assert finished.returncode == 0, finished.stderr
    stored = json.loads(finished.stdout)
    assert (stored["key"], stored["upload"], stored["verifyJob"]) == ("r/done", upload, None)
    assert not note.exists()
    with api.client() as client:
        assert read_object(client, "r/done").content == data
