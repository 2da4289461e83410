"""`POST /api/crypto/stream/encrypt-archive` over real HTTP, on a local directory and on
moto: each member sealed into its own object as the archive arrives, progress as NDJSON
lines and as a job, hostile members refused and listed, limits that fail the job with
the members sealed before kept, a sealed manifest read back through decrypt, and no
plaintext at rest."""

import io
import json
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage import ObjectStore
from tests.conftest import Api, live_api, local_settings
from tests.support.data import random_bytes
from tests.support.http import FORM_TYPE, create_key, form_bytes, problem, read_object

ARCHIVE = "/api/crypto/stream/encrypt-archive"
MARKER = os.urandom(16)  # in every member: found in storage only if plaintext is at rest

FILES = {
    "docs/readme.txt": b"read me\n" * 200 + MARKER,
    "./nested//deep/./data.bin": random_bytes(300_000, seed=1) + MARKER,
    "empty.txt": b"",
    "top.txt": random_bytes(5_000, seed=2) + MARKER,
}
EXPECTED = {
    "docs/readme.txt": FILES["docs/readme.txt"],
    "nested/deep/data.bin": FILES["./nested//deep/./data.bin"],
    "empty.txt": b"",
    "top.txt": FILES["top.txt"],
}
# Regular files refused all the same: escapes, and a clash with the manifest.
REFUSED_FILES = {"../evil": b"outside", "/etc/passwd": b"root:x:0:0", "manifest.json": b"{}"}
REFUSED = {"../evil", "/etc/passwd", "manifest.json", "link", "hard", "dev"}


def tar_archive(mode: str, files: dict[str, bytes] = FILES) -> bytes:
    """A tar (mode w, w:gz, w:bz2, w:xz) with `files`, refused files, a directory, links
    and a device."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        tar.addfile(_entry("docs", tarfile.DIRTYPE))
        for name, data in {**files, **REFUSED_FILES}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_entry("link", tarfile.SYMTYPE, "/etc/passwd"))
        tar.addfile(_entry("hard", tarfile.LNKTYPE, "docs/readme.txt"))
        tar.addfile(_entry("dev", tarfile.CHRTYPE))
    return buffer.getvalue()


def _entry(name: str, type_: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, target
    return info


def upload(
    client: httpx.Client, archive: bytes, prefix: str = "out/", **metadata: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """Send `archive`; the response and its progress lines."""
    fields = {"kid": "mySymKey", "destination": {"prefix": prefix}, **metadata}
    body = form_bytes(fields, archive)
    response = client.post(ARCHIVE, content=body, headers={"Content-Type": FORM_TYPE})
    lines = [json.loads(line) for line in response.text.splitlines()]
    return response, lines


def manifest(client: httpx.Client, prefix: str = "out/") -> dict[str, Any]:
    response = read_object(client, prefix + "manifest.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def stored_bytes(store: ObjectStore) -> list[bytes]:
    return [store.get(info.key) for info in store.list("")]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_each_member_is_sealed_as_the_archive_arrives(api: Api, mode: str) -> None:
    with api.client() as client:
        create_key(client)
        response, lines = upload(client, tar_archive(mode))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-ndjson"
        started, *members, finished = lines
        assert started["event"] == "started"
        assert response.headers["location"] == f"/api/jobs/{started['jobId']}"
        assert finished["event"] == "finished" and finished["status"] == "succeeded", finished
        by_status: dict[str, set[str]] = {}
        for line in members:
            by_status.setdefault(line["status"], set()).add(line["path"])
        assert by_status == {"sealed": set(EXPECTED), "refused": REFUSED, "skipped": {"docs"}}
        counts = finished["result"]["counts"]
        assert counts == {
            "items": 11,
            "sealed": 4,
            "skipped": 1,
            "refused": 6,
            "failed": 0,
            "withdrawn": 0,
        }
        for path, data in EXPECTED.items():
            opened = read_object(client, "out/" + path)
            assert opened.status_code == 200 and opened.content == data, path
        job = client.get(f"/api/jobs/{started['jobId']}").json()
        assert job["kind"] == "encrypt-archive" and job["status"] == "succeeded"
        assert job["progress"]["itemsDone"] == 11
        assert job["result"]["counts"] == counts
        document = manifest(client)
    assert document["complete"] is True and document["error"] is None
    assert document["archiveFormat"] == {"w": "tar", "w:gz": "tar.gz"}.get(
        mode, mode.replace("w:", "tar.")
    )
    assert [m["path"] for m in document["members"]] == [m["path"] for m in members]
    sealed = {m["path"]: m for m in document["members"] if m["status"] == "sealed"}
    assert {path: m["plaintextSize"] for path, m in sealed.items()} == {
        path: len(data) for path, data in EXPECTED.items()
    }
    assert not any(MARKER in data for data in stored_bytes(api.objects)), "plaintext at rest"


def test_an_archive_cut_short_keeps_what_was_sealed_in_an_incomplete_manifest(api: Api) -> None:
    archive = tar_archive("w")
    cut = archive[: archive.index(b"top.txt") + 100]  # inside the fourth file's header
    with api.client() as client:
        create_key(client)
        _, lines = upload(client, cut)
        finished = lines[-1]
        assert finished["status"] == "failed" and finished["error"]["code"] == "invalid-archive"
        assert finished["result"]["counts"]["sealed"] == 3
        assert read_object(client, "out/docs/readme.txt").content == FILES["docs/readme.txt"]
        document = manifest(client)
        job = client.get(f"/api/jobs/{lines[0]['jobId']}").json()
    assert document["complete"] is False and document["error"]["code"] == "invalid-archive"
    assert job["status"] == "failed" and job["error"]["code"] == "invalid-archive"


def test_a_bomb_is_refused_by_what_has_arrived(tmp_path: Path) -> None:
    """A tar.gz of zeros unpacks to far more than `max_expansion` times its bytes: the
    job fails as it unpacks, long before the member's declared size."""
    settings = local_settings(tmp_path).model_copy(update={"batch_max_expansion": 20.0})
    zeros = bytes(16 << 20)
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        _, lines = upload(client, tar_archive("w:gz", {"zeros.bin": zeros}))
        finished = lines[-1]
        assert finished["status"] == "failed", finished
        assert finished["error"]["code"] == "archive-expands-too-far"
        assert manifest(client)["complete"] is False
        assert read_object(client, "out/zeros.bin").status_code == 404


def test_what_would_fail_the_job_is_refused_before_it_starts(api: Api) -> None:
    with api.client() as client:
        problem(upload(client, tar_archive("w"))[0], 404, "key-not-found")
        create_key(client)
        assert upload(client, tar_archive("w"))[1][-1]["status"] == "succeeded"
        problem(upload(client, tar_archive("w"))[0], 409, "object-exists")
        problem(upload(client, b"", prefix="no-slash")[0], 400, "invalid-prefix")
        again = upload(client, tar_archive("w"), destination={"prefix": "out/", "overwrite": True})
        assert again[1][-1]["status"] == "succeeded"


# Zip, streamed from its local headers


class _Unseekable(io.RawIOBase):
    """A file that cannot seek, so `zipfile` writes each member's sizes after its data."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.buffer.write(data)


def zip_archive(*, streamed: bool = False, zip64: bool = False, link: bool = True) -> bytes:
    """A zip of FILES and the refused files, deflated; `streamed`: written as a stream,
    each member's sizes in a data descriptor after its data; `zip64`: zip64 records."""
    target = _Unseekable() if streamed else io.BytesIO()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # Deflated, each of them: a stored member with a data descriptor cannot be streamed.
        archive.writestr("docs/", b"", compress_type=zipfile.ZIP_DEFLATED)
        for name, data in {**FILES, **REFUSED_FILES}.items():
            with archive.open(name, "w", force_zip64=zip64) as member:
                member.write(data)
        if link:
            info = zipfile.ZipInfo("link")
            info.create_system = 3  # Unix: the mode in the high bits says symlink
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd", compress_type=zipfile.ZIP_DEFLATED)
    return target.buffer.getvalue() if isinstance(target, _Unseekable) else target.getvalue()


ZIP_REFUSED = {"../evil", "/etc/passwd", "manifest.json"}


@pytest.mark.parametrize(
    "options",
    [{}, {"streamed": True}, {"zip64": True}],
    ids=["sizes-in-headers", "data-descriptors", "zip64"],
)
def test_a_zip_is_sealed_as_it_arrives_and_checked_against_its_index(
    api: Api, options: dict[str, bool]
) -> None:
    archive = zip_archive(**options)
    if options.get("streamed"):
        assert struct.unpack_from("<H", archive, 6)[0] & 0x08, "no data descriptors"
    with api.client() as client:
        create_key(client)
        _, lines = upload(client, archive)
        finished = lines[-1]
        assert finished["status"] == "succeeded", finished
        statuses = {(line["event"], line["path"], line.get("status")) for line in lines[1:-1]}
        assert statuses == {
            *(("member", path, "sealed") for path in EXPECTED),
            *(("member", path, "refused") for path in ZIP_REFUSED),
            ("member", "docs/", "skipped"),
            ("member", "link", "sealed"),  # a file, as far as its local header tells
            ("withdrawn", "link", None),  # a symlink, says the central directory
        }
        assert finished["result"]["counts"]["withdrawn"] == 1
        for path, data in EXPECTED.items():
            assert read_object(client, "out/" + path).content == data, path
        assert read_object(client, "out/link").status_code == 404
        document = manifest(client)
    assert document["complete"] is True and document["archiveFormat"] == "zip"
    assert [entry["path"] for entry in document["withdrawn"]] == ["link"]
    assert not any(MARKER in data for data in stored_bytes(api.objects)), "plaintext at rest"


def test_a_zip_whose_index_disagrees_loses_every_member_sealed(api: Api) -> None:
    """The central directory names another member than the local header: to `zipfile`
    the archive holds other files than it streamed. Nothing sealed from it stays."""
    archive = zip_archive(link=False)
    at = archive.rindex(b"top.txt")  # in the central directory, which comes last
    forged = archive[:at] + b"tip.txt" + archive[at + len(b"top.txt") :]
    with api.client() as client:
        create_key(client)
        _, lines = upload(client, forged)
        finished = lines[-1]
        assert finished["status"] == "failed", finished
        assert finished["error"]["code"] == "zip-index-mismatch"
        assert finished["result"]["counts"]["sealed"] == 0
        assert finished["result"]["counts"]["withdrawn"] == len(EXPECTED)
        for path in EXPECTED:
            assert read_object(client, "out/" + path).status_code == 404, path
        document = manifest(client)
    assert document["complete"] is False
    assert document["error"]["code"] == "zip-index-mismatch"
    assert {entry["path"] for entry in document["withdrawn"]} == set(EXPECTED)
    members = [info.key for info in api.objects.list("tenants/default/out/")]
    assert members == ["tenants/default/out/manifest.json"]


def test_a_zip_that_cannot_be_streamed_is_refused_with_its_own_code(api: Api) -> None:
    """A stored (uncompressed) member whose sizes come only after its data."""
    target = _Unseekable()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a.txt", b"hello")
    with api.client() as client:
        create_key(client)
        finished = upload(client, target.buffer.getvalue(), format="zip")[1][-1]
    assert finished["status"] == "failed"
    assert finished["error"]["code"] == "zip-not-streamable"
