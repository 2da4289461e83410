"""Batch-encrypt jobs fanned out into chunks, on the embedded default (jobs in the API
process, local storage): a prefix and a zip in storage split into chunks that run as jobs
of their own, every member sealed once and listed once in the manifest; progress added up
in the job; chunks kept out of listings and out of other tenants' reach; a job rerun
after its process died finds its chunks again; hidden names stay hidden in the chunks'
records. Two Celery workers, one of them killed, are in tests/test_jobs_celery.py."""

import io
import json
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import workers.fanout
from sealstream.wiring import build_parts
from services.inventory import RUN_MARKER_KIND, RunMarker
from services.inventory import version_prefix as index_prefix
from services.jobs import BatchEncryptParams, JobKind, JobRecord, JobStatus, PrefixTarget
from tests.conftest import Api, live_api, local_settings
from tests.support.data import random_bytes
from tests.support.http import KEYS, create_key, read_object
from tests.test_jobs_batch import (
    TENANT,
    batch_params,
    check_members,
    put,
    run_batch,
    stored_keys,
)
from workers.execution import run_job
from workers.fanout import ChunkSlice, Plan, _chunk_record, batch_chunk, batch_job
from workers.journal import Journal

CHUNK = 4  # members per chunk


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = local_settings(tmp_path).model_copy(update={"batch_chunk_members": CHUNK})
    with live_api(settings) as api:
        yield api


def sources(count: int) -> dict[str, bytes]:
    return {f"f/{n:03d}.bin": random_bytes(100 + n * 37, seed=n) for n in range(count)}


def manifest(client: httpx.Client, key: str) -> dict[str, Any]:
    response = read_object(client, key)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = json.loads(response.content)
    return document


def chunk_records(api: Api, job_id: str) -> list[JobRecord]:
    """The chunks' final reports (their live records are in the API's memory)."""
    prefix = f"sealstream/jobs/default/{job_id}-"
    return [
        api.records.get("job-report", info.key, JobRecord)
        for info in api.objects.list(prefix)
        if info.key.endswith(".json") and "/" not in info.key.removeprefix(prefix)
    ]


def test_a_prefix_is_sealed_in_chunks_each_member_once(api: Api) -> None:
    files = sources(4 * CHUNK + 3)  # five chunks, the last one short
    for path, data in files.items():
        put(api, f"src/{path}", data)
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"prefix": "src/"}, destination={"prefix": "out/"})
        assert job["status"] == "succeeded", job
        document = manifest(client, "out/manifest.json")
        check_members(client, document, files)
        listed = client.get("/api/jobs", params={"limit": 500}).json()["jobs"]
        chunks = client.get("/api/jobs", params={"kind": "batch-encrypt-chunk"}).json()["jobs"]

    result = job["result"]
    assert result["chunks"] == 5
    assert result["counts"] == {
        "items": len(files),
        "sealed": len(files),
        "skipped": 0,
        "refused": 0,
        "failed": 0,
    }
    progress = job["progress"]
    assert progress["itemsDone"] == progress["itemsTotal"] == len(files)
    assert progress["bytesDone"] == progress["bytesTotal"] == sum(map(len, files.values()))
    # One object per member and the manifest, no more; the journals are gone.
    assert stored_keys(api) == {f"src/{p}" for p in files} | {f"out/{p}" for p in files} | {
        "out/manifest.json"
    }
    journals = f"sealstream/jobs/default/{job['id']}"
    kept = [i.key for i in api.objects.list(journals) if ".partial/" in i.key]
    assert kept == [f"{journals}.partial/final.json"]
    assert api.objects.pending_uploads("tenants/") == []
    # The chunks are jobs of their own, listed only when asked for by kind.
    assert job["id"] in {j["id"] for j in listed}
    assert {j["kind"] for j in listed} <= {"batch-encrypt", "verify"}, listed
    assert sorted(j["id"] for j in chunks) == [f"{job['id']}-{n:04d}" for n in range(5)]
    reports = chunk_records(api, job["id"])
    assert {r.status for r in reports} == {JobStatus.SUCCEEDED}
    assert sum(r.progress.items_done for r in reports) == len(files)


def test_a_fanned_out_job_is_one_run_in_the_index_settled_after_its_manifest(api: Api) -> None:
    """Its chunks write the job's objects under one run marker, which the job settles
    once its manifest is written: a count takes one listing, not one expansion a chunk."""
    files = sources(3 * CHUNK)
    for path, data in files.items():
        put(api, f"src/{path}", data)
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"prefix": "src/"}, destination={"prefix": "out/"})
        assert job["status"] == "succeeded" and job["result"]["chunks"] == 3, job
        view = client.get(f"{KEYS}/mySymKey").json()
    prefix = index_prefix("default", "mySymKey", 1)
    (run_name,) = [info.key for info in api.objects.list(prefix)]
    run = api.records.get(RUN_MARKER_KIND, run_name, RunMarker)
    assert run.job_id == job["id"]
    assert run.members == len(files) + 1 and run.listing is not None  # and the manifest
    assert [v["objectCount"] for v in view["versions"]] == [len(files) + 1]


def zip_with_a_twin() -> bytes:
    """A zip of 11 entries: files, a refused one, and a second `f/000.bin` in a later chunk."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, data in sources(9).items():
            archive.writestr(path, data)
        archive.writestr("../evil", b"outside")
        with warnings.catch_warnings(action="ignore"):  # zipfile warns of the twin
            archive.writestr("f/000.bin", b"the twin")
    return buffer.getvalue()


def test_a_zip_in_storage_is_sealed_in_chunks_its_twins_refused(api: Api) -> None:
    archive = zip_with_a_twin()
    put(api, "in/a.zip", archive)
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"key": "in/a.zip"}, destination={"prefix": "out/"})
        assert job["status"] == "succeeded", job
        document = manifest(client, "out/manifest.json")
        check_members(client, document, sources(9))

    assert job["result"]["chunks"] == 3
    assert job["result"]["counts"]["refused"] == 2
    reasons = {(entry["path"], entry["reason"]) for entry in document["refused"]}
    assert reasons == {
        ("../evil", "a path with a '..' segment"),
        ("f/000.bin", "a second member of the same name"),
    }
    assert document["format"] == "zip"
    assert job["progress"]["itemsDone"] == job["progress"]["itemsTotal"] == 11


def test_another_tenant_cannot_see_or_cancel_a_chunk(api: Api) -> None:
    for path, data in sources(2 * CHUNK).items():
        put(api, f"src/{path}", data)
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"prefix": "src/"}, destination={"prefix": "out/"})
        token = client.post(
            "/api/admin/tokens", json={"tenant": "acme", "scopes": ["jobs:read", "jobs:write"]}
        ).json()["token"]
        chunk = f"{job['id']}-0000"
        assert client.get(f"/api/jobs/{chunk}").json()["kind"] == "batch-encrypt-chunk"
    with api.client(token) as acme:
        assert acme.get(f"/api/jobs/{chunk}").status_code == 404
        assert acme.post(f"/api/jobs/{chunk}/cancel").status_code == 404
        listed = acme.get("/api/jobs", params={"kind": "batch-encrypt-chunk"}).json()["jobs"]
        assert listed == []


class Crash(BaseException):
    """The process running the job killed: not an `Exception`, so nothing after it runs."""


@pytest.mark.parametrize("names", ["plain", "encrypted"])
def test_a_job_rerun_after_its_process_died_finds_its_chunks_again(api: Api, names: str) -> None:
    """The job dies once two of its chunks have ended; run again (as a redelivered task
    is), it keeps the same chunks, runs the rest, and each member is sealed once, its
    name hidden or not."""
    files = seeded(api, 4 * CHUNK)
    # Run here, on services of the test's own over the server's storage, so that the
    # job's process can "die" and the job be run again, as a redelivered task is.
    services = build_parts(api.settings)
    record = JobRecord.new(JobKind.BATCH_ENCRYPT, "default", prefix_params(api, names))
    services.jobs.save(record)
    ended: list[str] = []

    def dies_after_two_chunks(context: Any, parts: Any) -> dict[str, Any]:
        original = context.progress

        def progress(**changes: Any) -> None:
            done = [f"{record.id}-{n:04d}" for n in range(4)]
            ended[:] = [j for j in done if (r := services.jobs.load(j)) and r.status.finished]
            if len(ended) >= 2:
                raise Crash
            original(**changes)

        context.progress = progress
        return batch_job(context, parts)

    with pytest.raises(Crash):
        run_job(record.id, services, {JobKind.BATCH_ENCRYPT: dies_after_two_chunks})
    assert len(ended) >= 2
    run_job(record.id, services, {JobKind.BATCH_ENCRYPT: batch_job})

    final = services.jobs.load(record.id)
    assert final is not None and final.status is JobStatus.SUCCEEDED, final
    assert final.result is not None and final.result["counts"]["sealed"] == len(files)
    with api.client() as client:
        read_back(client, manifest(client, "out/manifest.json"), files)
    assert len([k for k in stored_keys(api) if k.startswith("out/")]) == len(files) + 1


def prefix_params(api: Api, names: str) -> BatchEncryptParams:
    """What `POST /api/jobs/batch-encrypt` makes of src/ → out/."""
    source = PrefixTarget(bucket=api.objects.bucket, prefix="src/", storage_prefix=TENANT + "src/")
    return batch_params(api).model_copy(update={"source": source, "names": names})


def seeded(api: Api, count: int) -> dict[str, bytes]:
    """`sources(count)` put under src/, and the key to seal them with; the sources."""
    files = sources(count)
    for path, data in files.items():
        put(api, f"src/{path}", data)
    with api.client() as client:
        create_key(client)
    return files


def read_back(client: httpx.Client, document: dict[str, Any], files: dict[str, bytes]) -> None:
    """Each member once in the manifest, and its object (however named) decrypts to it."""
    keys = {entry["path"]: entry["key"] for entry in document["members"]}
    assert sorted(keys) == sorted(entry["path"] for entry in document["members"])
    assert keys.keys() == files.keys()
    for path, key in keys.items():
        assert read_object(client, key).content == files[path]


def test_hidden_names_stay_hidden_in_the_chunks(api: Api) -> None:
    """With hidden names, the chunks' journals, records and reports name no member (a
    refused one included); the sealed manifest maps the names back."""
    files = {f"hr/jane-doe-{n}.pdf": random_bytes(200 + n, seed=n) for n in range(2 * CHUNK + 1)}
    for path, data in files.items():
        put(api, f"src/{path}", data)
    put(api, "src/manifest.json", b"clashes with the manifest")
    with api.client() as client:
        create_key(client)
        job = run_batch(
            client, source={"prefix": "src/"}, destination={"prefix": "out/"}, names="encrypted"
        )
        assert job["status"] == "succeeded", job
        document = manifest(client, "out/manifest.json")
        read_back(client, document, files)

    assert job["result"]["chunks"] == 3
    assert document["refused"] == [{"path": "manifest.json", "reason": "the manifest's name"}]
    assert len(chunk_records(api, job["id"])) == 3
    for info in api.objects.list("sealstream/jobs/"):
        written = api.objects.get(info.key)
        assert b"jane-doe" not in written, (info.key, written)
        if info.key.endswith("-0000.json"):  # a chunk's report
            assert b"manifest.json" not in written
    assert not any("jane-doe" in key for key in stored_keys(api) if key.startswith("out/"))


def test_a_source_changed_after_the_split_is_reported_never_sealed_twice(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket writer adds an object inside a chunk's range of keys and deletes another
    once the job is split: the chunks seal what they find, each once, and the job lists
    the two ranges as `source-changed`; a zip replaced after the split fails its chunks
    (`archive-changed`) rather than sealing another index's members."""
    files = sources(3 * CHUNK)
    for path, data in files.items():
        put(api, f"src/{path}", data)
    put(api, "in/a.zip", zip_with_a_twin())
    split = workers.fanout._split

    def split_then_change(context: Any, services: Any, params: BatchEncryptParams) -> Any:
        plan = split(context, services, params)
        if isinstance(params.source, PrefixTarget):
            put(api, "src/f/000.5.bin", b"planted")  # inside the first chunk's range
            api.objects.delete(TENANT + "src/f/009.bin")  # in the third's
        else:
            put(api, "in/a.zip", zip_archive_of(sources(12)))
        return plan

    monkeypatch.setattr(workers.fanout, "_split", split_then_change)
    with api.client() as client:
        create_key(client)
        job = run_batch(client, source={"prefix": "src/"}, destination={"prefix": "out/"})
        document = manifest(client, "out/manifest.json")
        zipped = run_batch(client, source={"key": "in/a.zip"}, destination={"prefix": "zip/"})

    assert job["status"] == "succeeded", job
    sealed = sorted(entry["path"] for entry in document["members"])
    expected = sorted({*files, "f/000.5.bin"} - {"f/009.bin"})
    assert sealed == expected  # each once
    changed = [entry for entry in document["failed"] if entry["code"] == "source-changed"]
    assert [entry["path"] for entry in changed] == ["..f/003.bin", "f/007.bin..f/011.bin"]
    assert (zipped["status"], zipped["error"]["code"]) == ("failed", "archive-changed"), zipped
    assert {key for key in stored_keys(api) if key.startswith("zip/")} <= {"zip/manifest.json"}


def zip_archive_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return buffer.getvalue()


def test_a_chunk_whose_job_has_ended_seals_nothing(api: Api) -> None:
    """A job failed without its body running (killed in every run, or stale) leaves its
    plan and its queued chunks: a chunk taken then fails `job-ended`, sealing nothing."""
    files = seeded(api, 2 * CHUNK)
    services = build_parts(api.settings)
    job = JobRecord.new(JobKind.BATCH_ENCRYPT, "default", prefix_params(api, "plain"))
    plan = Plan(format="prefix", chunks=[ChunkSlice(start=0, count=len(files), bytes=1)])
    Journal(services.records, "default", job.id).save_plan(plan)
    chunk = _chunk_record(services.jobs, job, plan, 0)
    services.jobs.save(job.model_copy(update={"status": JobStatus.FAILED}))

    run_job(chunk.id, services, {JobKind.BATCH_CHUNK: batch_chunk})

    final = services.jobs.load(chunk.id)
    assert final is not None and final.status is JobStatus.FAILED, final
    assert final.error is not None and final.error["code"] == "job-ended"
    assert not any(key.startswith("out/") for key in stored_keys(api))
