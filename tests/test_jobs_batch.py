"""Batch encryption of archives and prefixes (issue: batch-encrypt job), against a live API
on both backends: archives built in memory, members sealed one object each with a
manifest, unsafe members refused, whole-archive mode, overwrite rules, progress, verify,
a rerun after a crash, and cancel. Then hostile archives, each against one of the job's
limits, with the memory the job took measured: decompression bombs, header bombs (pax,
GNU long names and links), sparse members, member-count bombs, a zip's huge index."""

import bz2
import hashlib
import io
import json
import lzma
import os
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from itertools import chain
from pathlib import Path
from typing import Any

import httpx
import pytest

from envelope import DEFAULT_FRAME_LENGTH
from keystore import LocalKek
from sealstream.wiring import Parts, build_parts, open_records
from services.archives import MemberKind, UnsafeMember, member_path
from services.jobs import BatchEncryptParams, JobKind, JobRecord, JobStatus
from storage import LocalStore
from storage.records import object_record
from tests.conftest import Api, live_api, local_settings
from tests.support.data import random_bytes
from tests.support.http import create_key, encrypt, read_object
from tests.support.memory import MiB, PeakRss
from tests.support.storage import leave_pending
from workers.batch import batch_encrypt
from workers.execution import run_job
from workers.journal import JOURNAL_KIND, Journal, JournalEntry
from workers.registry import JOB_BODIES

TENANT = "tenants/default/"
BATCH = "/api/jobs/batch-encrypt"
FINAL = {"succeeded", "failed", "cancelled"}

# Name in the archive → what it holds; the names show the normalisation expected.
FILES = {
    "docs/readme.txt": b"read me\n" * 200,
    "./nested//deep/./data.bin": random_bytes(300_000, seed=1),
    "empty.txt": b"",
    "top.txt": random_bytes(5_000, seed=2),
}
EXPECTED = {
    "docs/readme.txt": FILES["docs/readme.txt"],
    "nested/deep/data.bin": FILES["./nested//deep/./data.bin"],
    "empty.txt": b"",
    "top.txt": FILES["top.txt"],
}
# Regular files all the same refused: escapes, and a clash with the manifest.
REFUSED_FILES = {"../evil": b"outside", "/etc/passwd": b"root:x:0:0", "manifest.json": b"{}"}


# Member names


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("a.txt", "a.txt"),
        ("./a//b", "a/b"),
        ("dir/./sub/file", "dir/sub/file"),
        ("trailing/", "trailing"),
        ("ünïcode/名前.txt", "ünïcode/名前.txt"),
    ],
)
def test_member_names_are_normalised(name: str, path: str) -> None:
    assert member_path(name, MemberKind.FILE) == path


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../evil",
        "a/../../evil",
        "a/..",
        "C:/Windows/evil",
        "c:evil",
        "a\\..\\evil",
        "nul\x00byte",
        "line\nbreak",
        "del\x7f",
        "",
        "./",
        "x" * 1025,
        "surrogate\udcff",
    ],
)
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeMember):
        member_path(name, MemberKind.FILE)


@pytest.mark.parametrize(
    "kind",
    [
        MemberKind.SYMLINK,
        MemberKind.HARDLINK,
        MemberKind.DEVICE,
        MemberKind.FIFO,
        MemberKind.ENCRYPTED,
        MemberKind.OTHER,
    ],
)
def test_members_that_are_not_regular_files_are_refused(kind: MemberKind) -> None:
    with pytest.raises(UnsafeMember):
        member_path("plain-name", kind)


def test_directories_are_skipped() -> None:
    assert member_path("docs/", MemberKind.DIRECTORY) is None


# Archives built in memory


def tar_archive(mode: str, files: dict[str, bytes] = FILES) -> bytes:
    """A tar (mode w, w:gz, w:bz2) with `files`, refused files, a directory and links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        tar.addfile(_tar_entry("docs", tarfile.DIRTYPE))
        for name, data in {**files, **REFUSED_FILES}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_tar_entry("link", tarfile.SYMTYPE, "/etc/passwd"))
        tar.addfile(_tar_entry("hard", tarfile.LNKTYPE, "docs/readme.txt"))
    return buffer.getvalue()


def _tar_entry(name: str, type_: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, target
    return info


def zip_archive() -> bytes:
    """A zip with FILES, refused files, a directory and a Unix symlink entry."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("docs/", b"")
        for name, data in {**FILES, **REFUSED_FILES}.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("link")
        link.create_system = 3  # Unix: the mode in the high bits says symlink
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


ARCHIVES: dict[str, Callable[[], bytes]] = {
    "tar": partial(tar_archive, "w"),
    "tar.gz": partial(tar_archive, "w:gz"),
    "tar.bz2": partial(tar_archive, "w:bz2"),
    "tar.xz": partial(tar_archive, "w:xz"),
    "zip": zip_archive,
}
REFUSED = {
    "tar": {*REFUSED_FILES, "link", "hard"},
    "zip": {*REFUSED_FILES, "link"},
}


# Talking to the API


def put(api: Api, key: str, data: bytes) -> None:
    """An object in the admin tenant's space, as a client's upload would leave it."""
    api.objects.put(TENANT + key, data)


def start_batch(client: httpx.Client, **body: Any) -> str:
    response = client.post(BATCH, json={"kid": "mySymKey", **body})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_for(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Poll the job until it has a final status (the deadline only guards against a hang)."""
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def run_batch(client: httpx.Client, **body: Any) -> dict[str, Any]:
    return wait_for(client, start_batch(client, **body))


def decrypted(client: httpx.Client, key: str) -> bytes:
    response = read_object(client, key)
    assert response.status_code == 200, response.text
    return response.content


def manifest_of(api: Api, prefix: str = "out/") -> dict[str, Any]:
    """The manifest, read back through decrypt: it is a sealed message."""
    with api.client() as client:
        manifest: dict[str, Any] = json.loads(decrypted(client, prefix + "manifest.json"))
    return manifest


def stored_keys(api: Api) -> set[str]:
    return {info.key.removeprefix(TENANT) for info in api.objects.list("tenants/")}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_members(
    client: httpx.Client, manifest: dict[str, Any], expected: dict[str, bytes]
) -> None:
    """Every expected member once in the manifest, and its object decrypts to it."""
    paths = [entry["path"] for entry in manifest["members"]]
    assert sorted(paths) == sorted(expected)
    for entry in manifest["members"]:
        data = expected[entry["path"]]
        assert entry["storageKey"] == TENANT + entry["key"]
        assert (entry["plaintextSize"], entry["plaintextSha256"]) == (len(data), sha256(data))
        assert decrypted(client, entry["key"]) == data


# Members mode


@pytest.mark.parametrize(
    ("kind", "format_"),
    [
        ("tar", "auto"),
        ("tar.gz", "tar.gz"),
        ("tar.bz2", "auto"),
        ("tar.xz", "auto"),
        ("zip", "auto"),
    ],
)
def test_archive_members_become_verifiable_objects(api: Api, kind: str, format_: str) -> None:
    archive = ARCHIVES[kind]()
    put(api, "in/archive", archive)
    with api.client() as client:
        create_key(client)
        job = run_batch(
            client, source={"key": "in/archive"}, destination={"prefix": "out/"}, format=format_
        )
        assert job["status"] == "succeeded", job
        manifest = manifest_of(api)
        check_members(client, manifest, EXPECTED)
        for key in ("out/nested/deep/data.bin", "out/manifest.json"):
            verify = client.post("/api/jobs/verify", json={"key": key})
            assert wait_for(client, verify.json()["id"])["status"] == "succeeded"

    refused = REFUSED["zip" if kind == "zip" else "tar"]
    reasons = {entry["path"]: entry["reason"] for entry in manifest["refused"]}
    assert set(reasons) == refused
    assert "symbolic link" in reasons["link"]
    assert "'..'" in reasons["../evil"]
    assert (manifest["format"], manifest["failed"]) == (kind, [])
    result = job["result"]
    assert (result["manifestKey"], result["refused"]) == ("out/manifest.json", manifest["refused"])
    # Sealed like the members, recorded and verifiable; nothing of it readable at rest.
    stored_manifest = api.objects.get(TENANT + "out/manifest.json")
    assert b"nested/deep" not in stored_manifest and b"members" not in stored_manifest
    entries = 1 + len(FILES) + len(refused)  # the directory is an item too, skipped
    assert result["counts"] == {
        "items": entries,
        "sealed": len(EXPECTED),
        "skipped": 1,
        "refused": len(refused),
        "failed": 0,
    }
    progress = job["progress"]
    assert progress["itemsDone"] == progress["itemsTotal"] == entries
    assert progress["bytesDone"] == progress["bytesTotal"] == len(archive)
    # Nothing landed outside the destination prefix, and nothing is left half-written.
    assert stored_keys(api) == {"in/archive", "out/manifest.json"} | {f"out/{p}" for p in EXPECTED}
    assert api.objects.pending_uploads("tenants/") == []


def test_every_object_under_a_prefix(api: Api) -> None:
    sources = {"a.txt": b"alpha", "sub/b.bin": random_bytes(70_000, seed=3), "empty": b""}
    for path, data in sources.items():
        put(api, f"src/{path}", data)
    put(api, "src/enc/old", b"earlier output, not input")
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"prefix": "src/"}, destination={"prefix": "src/enc/"})
        assert job["status"] == "succeeded", job
        check_members(client, manifest_of(api, "src/enc/"), sources)

    progress = job["progress"]
    assert progress["itemsDone"] == progress["itemsTotal"] == len(sources)
    assert progress["bytesDone"] == progress["bytesTotal"] == sum(map(len, sources.values()))


def test_an_existing_object_fails_its_member_only(api: Api) -> None:
    put(api, "out/top.txt", b"someone else's")
    put(api, "in/archive.tar", tar_archive("w"))
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"key": "in/archive.tar"}, destination={"prefix": "out/"})
        assert job["status"] == "succeeded", job
        others = {path: data for path, data in EXPECTED.items() if path != "top.txt"}
        manifest = manifest_of(api)
        check_members(client, manifest, others)

    assert [(f["path"], f["code"]) for f in manifest["failed"]] == [("top.txt", "object-exists")]
    assert job["result"]["failed"] == manifest["failed"]
    assert job["result"]["counts"]["failed"] == 1
    assert api.objects.get(TENANT + "out/top.txt") == b"someone else's"


def test_a_damaged_archive_fails_the_job_and_a_missing_one_is_refused(api: Api) -> None:
    put(api, "in/archive.tar.gz", tar_archive("w:gz")[:-300])
    put(api, "in/not-an-archive", b"just some bytes, no archive at all" * 20)
    with api.client() as client:
        create_key(client)
        damaged = run_batch(
            client, source={"key": "in/archive.tar.gz"}, destination={"prefix": "out/"}
        )
        garbage = run_batch(
            client, source={"key": "in/not-an-archive"}, destination={"prefix": "junk/"}
        )
        missing = client.post(
            BATCH,
            json={
                "kid": "mySymKey",
                "source": {"key": "in/nothing"},
                "destination": {"prefix": "junk/"},
            },
        )

    assert (damaged["status"], damaged["error"]["code"]) == ("failed", "invalid-archive")
    assert (garbage["status"], garbage["error"]["code"]) == ("failed", "invalid-archive")
    # A missing archive is refused before any job starts.
    assert missing.status_code == 404 and missing.json()["code"] == "object-not-found"
    # What was sealed before the damage is kept, listed, and reported.
    manifest = manifest_of(api)
    assert manifest["error"]["code"] == "invalid-archive"
    assert damaged["result"]["counts"]["sealed"] == len(manifest["members"])
    assert not any(key.startswith("junk/") for key in stored_keys(api))
    assert api.objects.pending_uploads("tenants/") == []


# Whole mode


def test_whole_mode_seals_the_archive_as_one_object(api: Api) -> None:
    archive = tar_archive("w:gz")
    put(api, "in/archive.tgz", archive)
    with api.client() as client:
        create_key(client)
        job = run_batch(
            client,
            mode="whole",
            source={"key": "in/archive.tgz"},
            destination={"key": "sealed/archive.tgz.enc"},
        )
        assert job["status"] == "succeeded", job
        assert decrypted(client, "sealed/archive.tgz.enc") == archive
        again = run_batch(
            client,
            mode="whole",
            source={"key": "in/archive.tgz"},
            destination={"key": "sealed/archive.tgz.enc"},
        )

    result = job["result"]
    assert (result["plaintextSize"], result["plaintextSha256"]) == (len(archive), sha256(archive))
    assert job["progress"]["bytesDone"] == job["progress"]["bytesTotal"] == len(archive)
    assert (again["status"], again["error"]["code"]) == ("failed", "object-exists")
    assert stored_keys(api) == {"in/archive.tgz", "sealed/archive.tgz.enc"}


# A rerun after a crash, and cancel


class Crash(BaseException):
    """A worker killed mid-job: not an `Exception`, so nothing after it runs."""


def crashed_at_the_third(api: Api) -> tuple[dict[str, bytes], Parts, JobRecord, list[str]]:
    """A batch job over six members of in/archive.tar whose worker was killed as it took
    the third: the members it started on, in order (the first two claimed and written, the
    third claimed only), with the job's files, services and record."""
    files = {f"part-{n}.bin": random_bytes(10_000 + n, seed=n) for n in range(6)}
    put(api, "in/archive.tar", tar_archive("w", files))
    with api.client() as client:
        create_key(client)
    # The job body runs here, on services of its own over the server's storage, so that
    # a crash can be injected and the same job run again, as a redelivered task is.
    services = build_parts(api.settings)
    record = JobRecord.new(JobKind.BATCH_ENCRYPT, "default", batch_params(api))
    services.jobs.save(record)
    started: list[str] = []

    def crash_at_the_third(path: str) -> None:
        started.append(path)
        if len(started) == 3:
            raise Crash

    crashing = partial(batch_encrypt, before_member=crash_at_the_third)
    with pytest.raises(Crash):
        run_job(record.id, services, {JobKind.BATCH_ENCRYPT: crashing})
    return files, services, record, started


def test_a_rerun_after_a_crash_seals_each_member_once(api: Api) -> None:
    files, services, record, started = crashed_at_the_third(api)
    assert stored_keys(api) >= {f"out/{path}" for path in started[:2]}
    # The second member is complete but the journal does not say so yet. Uploads of the
    # claimed keys that are not the job's stay: another writer's resumable upload between
    # two parts (which no one holds then), and one a killed writer of another left.
    claimed = TENANT + "out/" + started[1]
    resumable = api.objects.start_parts(claimed)
    part = api.objects.put_part(resumable, 1, 0, b"another writer's first part")
    dead = leave_pending(api.objects, claimed)

    run_job(record.id, services, JOB_BODIES)

    final = services.jobs.load(record.id)
    assert final is not None and final.status is JobStatus.SUCCEEDED, final
    assert final.attempts == 2
    assert api.objects.pending_uploads("tenants/") == [claimed]
    with api.client() as client:
        check_members(client, manifest_of(api), files)
    assert stored_keys(api) == {"in/archive.tar", "out/manifest.json"} | {
        f"out/{path}" for path in files
    }
    journal = f"sealstream/jobs/default/{record.id}.partial/"
    assert [info.key for info in api.objects.list(journal)] == [journal + "final.json"]
    assert api.objects.abort_pending(claimed, exact=True, upload_ids={dead}) == 1
    assert api.objects.complete_parts(resumable, [part], if_absent=False).size == part.size


def test_only_an_upload_a_killed_worker_could_leave_is_journaled(api: Api) -> None:
    """Members read whole (small) add no journal entry on either backend. A streamed one
    does on a local directory, where its writer opens a file before anything is written,
    and not on S3 while it is smaller than a part: it is then sent whole."""
    files = {
        "small-0": random_bytes(10_000, seed=0),
        "streamed": random_bytes(2 * MiB, seed=1),
        "small-1": random_bytes(10_001, seed=2),
        "small-2": random_bytes(10_002, seed=3),
    }
    put(api, "in/archive.tar", tar_archive("w", files))
    with api.client() as client:
        create_key(client)
    services = build_parts(api.settings)
    record = JobRecord.new(JobKind.BATCH_ENCRYPT, "default", batch_params(api))
    services.jobs.save(record)

    def crash_at_the_last_wave(path: str) -> None:
        if path == "small-1":
            raise Crash

    crashing = partial(batch_encrypt, before_member=crash_at_the_last_wave)
    with pytest.raises(Crash):
        run_job(record.id, services, {JobKind.BATCH_ENCRYPT: crashing})

    journal = f"sealstream/jobs/default/{record.id}.partial/"
    entries = [
        api.records.get(JOURNAL_KIND, info.key, JournalEntry) for info in api.objects.list(journal)
    ]
    assert [entry.claims for entry in entries if entry.claims] == [
        [TENANT + "out/small-0"],
        [TENANT + "out/streamed"],
        [TENANT + "out/small-1", TENANT + "out/small-2"],
    ]
    journaled = [upload.key for entry in entries for upload in entry.uploads]
    assert journaled == ([TENANT + "out/streamed"] if isinstance(api.objects, LocalStore) else [])


def test_a_rerun_finds_the_uploads_of_objects_not_sealed_since(tmp_path: Path) -> None:
    """Those of members sealed completed, and a rerun does not look for them: only the
    uploads of objects claimed and not sealed (and the manifest's) may be pending."""
    records = open_records(LocalStore(tmp_path / "store"), LocalKek(os.urandom(32)))
    journal = Journal(records, "default", "job")
    journal.claim(["out/a", "out/b"])
    journal.upload_started("out/a", "1" * 32)
    journal.upload_started("out/b", "2" * 32)
    journal.upload_started("out/b", "3" * 32)  # a second attempt's
    journal.settle({"path": "a", "storageKey": "out/a"})
    journal.claim([])
    journal.upload_started("out/manifest.json", "4" * 32)

    resumed = Journal(records, "default", "job").resume()

    assert resumed.uploads == {"out/b": {"2" * 32, "3" * 32}, "out/manifest.json": {"4" * 32}}
    assert resumed.claims == {"out/b"}


def test_a_rerun_leaves_what_another_writer_put_where_it_had_claimed(api: Api) -> None:
    """Without `overwrite`, a rerun rewrites a claimed object only if its record names the
    job: one another writer put there between the crash and the rerun (over the member
    the crashed run wrote, or where it had claimed and not yet written) is a conflict of
    that member's, and stays."""
    files, services, record, started = crashed_at_the_third(api)
    written, unwritten = started[1], started[2]  # both claimed, only the first written
    assert object_record(services.records, api.objects, TENANT + "out/" + written).job_id == (
        record.id
    )
    theirs = {path: f"another writer's {path}".encode() for path in (written, unwritten)}
    with api.client() as client:
        for path, data in theirs.items():
            stored = encrypt_to(client, f"out/{path}", data)
            assert stored.status_code == 201, stored.text

    run_job(record.id, services, JOB_BODIES)

    final = services.jobs.load(record.id)
    assert final is not None and final.status is JobStatus.SUCCEEDED, final
    manifest = manifest_of(api)
    conflicts = sorted((f["path"], f["code"]) for f in manifest["failed"])
    assert conflicts == [(written, "object-conflict"), (unwritten, "object-conflict")]
    assert final.result is not None and final.result["counts"]["failed"] == 2
    with api.client() as client:
        ours = {path: data for path, data in files.items() if path not in theirs}
        check_members(client, manifest, ours)
        for path, data in theirs.items():
            assert decrypted(client, f"out/{path}") == data


def test_a_rerun_rewrites_its_own_object_only_as_it_found_it(api: Api) -> None:
    """A claimed object the rerun found to be its own is rewritten only over that very
    version: another writer who comes between the check and the write keeps its object,
    and the member fails."""
    files, services, record, started = crashed_at_the_third(api)
    written = started[1]
    theirs = b"written between the rerun's check and its write"

    def another_writer_first(path: str) -> None:
        if path == written:
            with api.client() as client:
                assert encrypt_to(client, f"out/{path}", theirs).status_code == 201

    rerun = partial(batch_encrypt, before_member=another_writer_first)
    run_job(record.id, services, {JobKind.BATCH_ENCRYPT: rerun})

    final = services.jobs.load(record.id)
    assert final is not None and final.status is JobStatus.SUCCEEDED, final
    manifest = manifest_of(api)
    assert [(f["path"], f["code"]) for f in manifest["failed"]] == [
        (written, "precondition-failed")
    ]
    with api.client() as client:
        assert decrypted(client, f"out/{written}") == theirs
        check_members(client, manifest, {p: d for p, d in files.items() if p != written})


def encrypt_to(client: httpx.Client, key: str, data: bytes) -> httpx.Response:
    """Seal `data` into the object `key` as a client's upload does, replacing one there."""
    return encrypt(client, data, kid="mySymKey", destination={"key": key, "overwrite": True})


def batch_params(api: Api) -> BatchEncryptParams:
    """What `POST /api/jobs/batch-encrypt` makes of in/archive.tar → out/."""
    bucket = api.objects.bucket
    return BatchEncryptParams.model_validate(
        {
            "kid": "mySymKey",
            "mode": "members",
            "format": "auto",
            "encryptionContext": {},
            "frameLength": DEFAULT_FRAME_LENGTH,
            "overwrite": False,
            "source": {
                "bucket": bucket,
                "key": "in/archive.tar",
                "storageKey": TENANT + "in/archive.tar",
            },
            "destination": {"bucket": bucket, "prefix": "out/", "storagePrefix": TENANT + "out/"},
        }
    )


# Many members, each one costing a few storage writes: far more work than the second or so
# a cancel takes to arrive and be noticed, on any machine.
MEMBERS = 3000
MEMBER_SIZE = 1024


def test_cancel_stops_the_job_between_or_inside_members(api: Api) -> None:
    files = {f"m/{n:04d}": random_bytes(MEMBER_SIZE, seed=n) for n in range(MEMBERS)}
    put(api, "in/big.tar", tar_archive("w", files))
    with api.client() as client:
        create_key(client)
        job_id = start_batch(client, source={"key": "in/big.tar"}, destination={"prefix": "out/"})
        wait_until_working(client, job_id)
        response = client.post(f"/api/jobs/{job_id}/cancel")
        assert response.status_code == 202, response.text
        job = wait_for(client, job_id)

    assert job["status"] == "cancelled", job
    assert api.objects.pending_uploads("tenants/") == []
    sealed = list(api.objects.list(TENANT + "out/"))
    assert 0 < len(sealed) < len(files)
    for info in sealed:  # each one complete and recorded, none half-written
        record = object_record(api.records, api.objects, info.key)
        assert record.ciphertext_size == info.size
    assert "out/manifest.json" not in stored_keys(api)
    assert list(api.objects.list(f"sealstream/jobs/default/{job_id}.partial/")) == []


def wait_until_working(client: httpx.Client, job_id: str) -> None:
    """Until the job reports a member done (the deadline only guards against a hang)."""
    deadline = time.monotonic() + 60
    while client.get(f"/api/jobs/{job_id}").json()["progress"]["itemsDone"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# Decompression bombs

ZEROS = bytes(8 << 20)  # 8 MiB that gzip and zip shrink about a thousand times


def bomb_tar_gz(names: list[str]) -> bytes:
    """A tar.gz with a small member, then `names`, each 8 MiB of zeros."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in [("small.txt", FILES["top.txt"]), *((n, ZEROS) for n in names)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def bomb_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("small.txt", FILES["top.txt"])
        archive.writestr("zeros.bin", ZEROS)
    return buffer.getvalue()


def test_an_archive_that_unpacks_too_far_fails_before_the_bomb_is_read(tmp_path: Path) -> None:
    settings = local_settings(tmp_path).model_copy(update={"batch_max_expansion": 50.0})
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        put(api, "in/bomb.tar.gz", bomb_tar_gz(["zeros.bin"]))
        put(api, "in/hidden.tar.gz", bomb_tar_gz(["../refused-but-huge"]))
        put(api, "in/bomb.zip", bomb_zip())
        tar_job = run_batch(client, source={"key": "in/bomb.tar.gz"}, destination={"prefix": "t/"})
        hidden = run_batch(client, source={"key": "in/hidden.tar.gz"}, destination={"prefix": "h/"})
        zip_job = run_batch(client, source={"key": "in/bomb.zip"}, destination={"prefix": "z/"})
        tar_manifest = manifest_of(api, "t/")
        hidden_manifest = manifest_of(api, "h/")
        keys = stored_keys(api)
        pending = api.objects.pending_uploads("tenants/")

    for job in (tar_job, hidden, zip_job):
        assert (job["status"], job["error"]["code"]) == ("failed", "archive-expands-too-far")
    # A tar stream fails at the member that crosses the line; what came before it stays.
    assert [entry["path"] for entry in tar_manifest["members"]] == ["small.txt"]
    assert tar_manifest["error"]["code"] == "archive-expands-too-far"
    assert "t/zeros.bin" not in keys
    # A member that would be refused counts too: a tar stream unpacks it to skip it.
    assert [entry["path"] for entry in hidden_manifest["members"]] == ["small.txt"]
    # A zip is refused from its index: nothing sealed at all.
    assert not any(key.startswith("z/") for key in keys)
    assert pending == []


# Hostile archives: each crosses one limit, fails the job with that limit's code and keeps
# what was sealed before it, in memory bounded by the limit, not by what the archive claims.

SMALL = b"a small member\n" * 64
BOMB_HEADER = 64 * MiB  # what each header bomb announces; the default header limit is 16 MiB
HEADER_LIMIT_COST = 40 * MiB  # the 16 MiB of header read up to the limit, and the rest
SMALL_COST = 16 * MiB  # a job whose hostile part is refused before it is read
NO_RATIO = {"batch_max_expansion": 1e12}  # so that the limit under test is the one crossed
END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)

TarMember = Iterable[bytes]  # the blocks of one member, headers and data, as pieces


def tar_stream(members: Iterable[TarMember], compression: str = "bz2") -> bytes:
    """A tar of `members`, compressed (bz2 or gz) a piece at a time: a bomb is never whole
    in memory."""
    compressor = bz2.BZ2Compressor(9) if compression == "bz2" else zlib.compressobj(wbits=31)
    pieces = chain(chain.from_iterable(members), [END_OF_ARCHIVE])
    return b"".join(compressor.compress(piece) for piece in pieces) + compressor.flush()


def regular(name: str, data: bytes) -> TarMember:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return [info.tobuf(tarfile.GNU_FORMAT), data, bytes(-len(data) % tarfile.BLOCKSIZE)]


def extended_header(type_: bytes, size: int) -> Iterator[bytes]:
    """An extended header (pax, or GNU long name or link) of `size` bytes, read in front of
    the member that follows it; its content streamed a MiB at a time."""
    info = tarfile.TarInfo("././@PaxHeader" if type_ == tarfile.XHDTYPE else "././@LongLink")
    info.type, info.size = type_, size
    yield info.tobuf(tarfile.GNU_FORMAT)
    # A pax record is "<its length> <keyword>=<value>\n"; a long name is just bytes.
    prefix = f"{size} comment=".encode() if type_ == tarfile.XHDTYPE else b""
    suffix = b"\n" if prefix else b""
    yield prefix
    left = size - len(prefix) - len(suffix)
    while left:
        yield b"a" * min(left, MiB)
        left -= min(left, MiB)
    yield suffix + bytes(-size % tarfile.BLOCKSIZE)


def symlink(name: str) -> TarMember:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [info.tobuf(tarfile.GNU_FORMAT)]


@dataclass(frozen=True)
class HostileRun:
    """The server a hostile archive ran on (stopped), and the members its manifest lists
    as sealed (read while it ran: the manifest is sealed), None if it wrote none."""

    api: Api
    sealed: list[str] | None


def run_hostile(
    tmp_path: Path, archive: bytes, limits: dict[str, Any] | None = None
) -> tuple[dict[str, Any], int, HostileRun]:
    """Run a batch of `archive` on a server of its own with `limits` set: the job's final
    record, how far this process's peak memory (the server's and its jobs') rose, and
    what the run left."""
    settings = local_settings(tmp_path).model_copy(update=limits or {})
    peak = PeakRss()
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        put(api, "in/archive", archive)
        peak.reset()
        job = run_batch(client, source={"key": "in/archive"}, destination={"prefix": "out/"})
        growth = peak.growth()
        manifest = read_object(client, "out/manifest.json")
        sealed = None
        if manifest.status_code == 200:
            sealed = [entry["path"] for entry in manifest.json()["members"]]
        return job, growth, HostileRun(api, sealed)


def assert_failed(job: dict[str, Any], code: str) -> None:
    assert (job["status"], job["error"]["code"]) == ("failed", code), job


@cache
def header_bomb(type_: bytes) -> bytes:
    """A small member, a 64 MiB extended header, the member it belongs to: in tar.bz2."""
    bomb = extended_header(type_, BOMB_HEADER)
    return tar_stream([regular("small.txt", SMALL), bomb, regular("after", b"")])


@pytest.mark.parametrize(
    "type_", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]
)
def test_a_header_bomb_fails_the_job_at_the_header_limit(tmp_path: Path, type_: bytes) -> None:
    """A pax header, or a GNU long name or link, of 64 MiB, in a few hundred bytes of
    tar.bz2: the job stops reading it at 16 MiB (`tarfile` would read it whole before
    parsing it), and the member sealed before it stays listed."""
    archive = header_bomb(type_)
    assert len(archive) < 1024
    job, growth, hostile = run_hostile(tmp_path, archive, NO_RATIO)

    assert_failed(job, "archive-header-too-large")
    assert "16777216 bytes" in job["error"]["detail"]
    assert hostile.sealed == ["small.txt"]
    assert job["result"]["counts"]["sealed"] == 1
    assert growth < HEADER_LIMIT_COST, f"the job's memory rose by {growth / MiB:.0f} MiB"


def test_a_header_bomb_in_a_small_archive_stops_at_its_expansion_limit(tmp_path: Path) -> None:
    """The same pax bomb with the default limits: its few hundred bytes may unpack to a
    thousand times that, and the job stops reading there."""
    job, growth, hostile = run_hostile(tmp_path, header_bomb(tarfile.XHDTYPE))

    assert_failed(job, "archive-expands-too-far")
    assert hostile.sealed == ["small.txt"]
    assert growth < SMALL_COST, f"the job's memory rose by {growth / MiB:.0f} MiB"


def test_a_run_of_small_extended_headers_is_refused_too(tmp_path: Path) -> None:
    """Two thousand pax headers of 100 bytes in front of one member: within the headers'
    limit, but deeper than `tarfile`, which reads them recursively, can go."""
    run = (extended_header(tarfile.XHDTYPE, 100) for _ in range(2000))
    archive = tar_stream([regular("small.txt", SMALL), *run, regular("after", b"")])
    job, _, hostile = run_hostile(tmp_path, archive, NO_RATIO)

    assert_failed(job, "archive-header-too-large")
    assert hostile.sealed == ["small.txt"]


def test_an_xz_stream_that_asks_for_a_huge_dictionary_is_refused(tmp_path: Path) -> None:
    """An xz block header declaring a 4 GiB dictionary (`xz -9` uses 64 MiB): the
    decompressor would take that much memory as the archive unpacks; it is refused."""
    archive = bytearray(lzma.compress(tar_archive("w", {"a.txt": SMALL})))
    block = 12  # the block header follows the stream header: size, flags, filter, props
    archive[block + 4] = 40  # LZMA2's dictionary size code for 4 GiB - 1
    archive[block + 8 : block + 12] = struct.pack("<I", zlib.crc32(archive[block : block + 8]))
    job, _, hostile = run_hostile(tmp_path, bytes(archive))

    assert_failed(job, "invalid-archive")
    assert "memory usage limit" in job["error"]["detail"].lower()
    assert not any(key.startswith("out/") for key in stored_keys(hostile.api))


def test_sparse_members_count_at_their_unpacked_size(tmp_path: Path) -> None:
    """A sparse member's data area is a block; it unpacks to its declared size. Members
    that each keep under the archive's limit add up past it, and the job stops there."""
    sparse_size = 400_000
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tar_info("small.txt", len(SMALL)), io.BytesIO(SMALL))
        for n in range(3):
            info = _tar_info(f"sparse-{n}", tarfile.BLOCKSIZE)
            info.pax_headers = {
                "GNU.sparse.map": f"0,{tarfile.BLOCKSIZE}",
                "GNU.sparse.numblocks": "1",
                "GNU.sparse.size": str(sparse_size),
            }
            tar.addfile(info, io.BytesIO(bytes(tarfile.BLOCKSIZE)))
    archive = buffer.getvalue()
    # Room for one sparse member and a half.
    expansion = 1.5 * sparse_size / len(archive)
    job, _, hostile = run_hostile(tmp_path, archive, {"batch_max_expansion": expansion})

    assert_failed(job, "archive-expands-too-far")
    assert sorted(hostile.sealed or []) == ["small.txt", "sparse-0"]  # in the order sealed


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


MEMBER_LIMIT = 1000


def test_a_tar_of_too_many_members_fails_at_the_member_limit(tmp_path: Path) -> None:
    """100,000 symbolic links (each one a refusal to list) in a tar.gz: the job stops
    after the member limit, the member sealed before stays listed, and the refusals
    listed are those up to the limit."""
    links = b"".join(chain.from_iterable(symlink(f"link-{n:03d}") for n in range(1000)))
    archive = tar_stream([regular("small.txt", SMALL), [links] * 100], compression="gz")
    job, growth, hostile = run_hostile(tmp_path, archive, {"batch_max_members": MEMBER_LIMIT})

    assert_failed(job, "archive-too-many-members")
    counts = job["result"]["counts"]
    assert (counts["items"], counts["sealed"]) == (MEMBER_LIMIT, 1)
    assert counts["refused"] == MEMBER_LIMIT - 1
    assert hostile.sealed == ["small.txt"]
    assert growth < SMALL_COST, f"the job's memory rose by {growth / MiB:.0f} MiB"


def zip_index(count: int) -> bytes:
    """A zip that is nearly all index: one local header, then `count` directory entries
    of 55 bytes in its central directory, each the same one."""
    name = b"d0000000/"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0)
    entry = struct.pack(
        "<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, *[0] * 7, len(name), *[0] * 6
    )
    index = (entry + name) * count
    head = local + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(index), len(head), 0)
    return head + index + end


def test_a_zip_index_larger_than_the_header_limit_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """A 19 MiB index of 350,000 entries (`zipfile` holds an object for each, some ten
    times the index's size): refused by its size, before `zipfile` reads it."""
    archive = zip_index(350_000)
    assert len(archive) > 16 * MiB
    job, growth, hostile = run_hostile(tmp_path, archive)

    assert_failed(job, "archive-header-too-large")
    assert not any(key.startswith("out/") for key in stored_keys(hostile.api))
    assert growth < SMALL_COST, f"the job's memory rose by {growth / MiB:.0f} MiB"


def test_a_zip_of_too_many_members_is_refused_from_its_index(tmp_path: Path) -> None:
    job, _, hostile = run_hostile(
        tmp_path, zip_index(MEMBER_LIMIT + 1), {"batch_max_members": MEMBER_LIMIT}
    )

    assert_failed(job, "archive-too-many-members")
    assert not any(key.startswith("out/") for key in stored_keys(hostile.api))


def test_a_member_larger_than_a_member_may_be_fails_the_job(tmp_path: Path) -> None:
    archive = tar_stream([regular("small.txt", SMALL), regular("big.bin", bytes(2 * MiB))])
    job, _, hostile = run_hostile(tmp_path, archive, {"batch_max_member_size": MiB, **NO_RATIO})

    assert_failed(job, "archive-member-too-large")
    assert hostile.sealed == ["small.txt"]


def test_a_prefix_of_too_many_objects_is_refused_before_any_is_sealed(tmp_path: Path) -> None:
    settings = local_settings(tmp_path).model_copy(update={"batch_max_members": 5})
    with live_api(settings) as api, api.client() as client:
        create_key(client)
        for n in range(6):
            put(api, f"src/{n}.txt", b"object %d" % n)
        job = run_batch(client, source={"prefix": "src/"}, destination={"prefix": "out/"})

    assert_failed(job, "archive-too-many-members")
    assert "more than 5 objects" in job["error"]["detail"]
    assert not any(key.startswith("out/") for key in stored_keys(api))
