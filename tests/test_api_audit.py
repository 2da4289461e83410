"""The audit of a live API (uvicorn over HTTP, on each storage backend): an event for
every authenticated or refused request, on every route; no secret anywhere in the trail;
`GET /api/audit` for tenants and the operator; and fail-closed (or open) when the audit
store cannot be written."""

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from audit import AUDIT_KEY_PURPOSE, EVENTS_PREFIX, Event, checkpoint_lines, verify_trail
from audit.reading import authentic_events
from audit.signing import AuditSigner
from keystore import KeyStore
from sealstream.server import create_app
from sealstream.settings import Settings
from sealstream.wiring import Parts, build_parts
from storage import ObjectStore
from tests.conftest import ADMIN_TOKEN, api_settings, local_settings
from tests.support.http import create_key, decrypt, encrypt, problem
from tests.support.jobs import (
    JOBS,
    JobStack,
    finished_job,
    no_job_queued,
    start_verify,
    store_object,
)
from tests.support.s3_proxy import S3FaultProxy
from tests.support.services import api_server
from tests.support.waiting import wait_until
from workers.lifecycle import run_sweeps

PLAINTEXT = b"PLANTED-PLAINTEXT-" + os.urandom(8).hex().encode() + b"-" * 3000
CONTEXT_VALUE = "PLANTED-CONTEXT-VALUE-" + os.urandom(8).hex()
# Flushed often, so that a test sees its events within a fraction of a second.
QUICK = {"audit_flush_ms": 50}


@contextmanager
def served(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(settings)
    with api_server(app, settings=settings) as url:
        yield url, app


def client(url: str, token: str | None = ADMIN_TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def events_of(app: FastAPI) -> list[Event]:
    return events_of_store(app.state.services)


def events_of_store(services: Parts) -> list[Event]:
    key = services.records.key.derive(AUDIT_KEY_PURPOSE)
    return list(authentic_events(services.objects, key))


def issue(http: httpx.Client, tenant: str, *scopes: str) -> dict[str, Any]:
    response = http.post("/api/admin/tokens", json={"tenant": tenant, "scopes": list(scopes)})
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


def whole_trail(store: ObjectStore) -> bytes:
    return b"\n".join(store.get(info.key) for info in store.list("sealstream/audit/"))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_requests_are_audited_and_no_secret_reaches_the_trail(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = api_settings(backend, tmp_path, request).model_copy(update=QUICK)
    with served(settings) as (url, app), client(url) as admin:
        create_key(admin, kid="exportable", exportable=True)
        create_key(admin)
        token = issue(admin, "tenant-a", "crypto:encrypt", "crypto:decrypt")
        exported = admin.get("/api/key-management/keys/exportable/export").json()
        with client(url, token["token"]) as tenant:
            sealed = encrypt(tenant, PLAINTEXT, encryptionContext={"purpose": CONTEXT_VALUE})
            assert sealed.status_code == 404  # tenant-a has no mySymKey
            problem(tenant.get("/api/key-management/keys"), 403, "insufficient-scope")
        sealed = encrypt(admin, PLAINTEXT, encryptionContext={"purpose": CONTEXT_VALUE})
        assert sealed.status_code == 200
        request_id = sealed.headers["X-Request-Id"]
        opened = decrypt(admin, sealed.content, encryptionContext={"purpose": CONTEXT_VALUE})
        assert opened.content == PLAINTEXT
        for n in range(5):
            with client(url, f"sst_{'x' * 16}_{'y' * 43}{n}") as stranger:
                problem(stranger.get("/api/key-management/keys"), 401, "invalid-token")
        services = app.state.services
    # The app has stopped: its chain is closed and flushed.
    trail = whole_trail(services.objects)
    for secret in (
        ADMIN_TOKEN,
        token["token"],
        CONTEXT_VALUE,
        PLAINTEXT[:40].decode(),
        exported["k"],
    ):
        assert secret.encode() not in trail
    events = events_of(app)
    by_request = {e.get("requestId"): e for e in events}
    stream = by_request[request_id]
    assert stream["key"] == "mySymKey#1"
    assert stream["contextKeys"] == ["purpose"]
    assert stream["bytesIn"] > len(PLAINTEXT) and stream["bytesOut"] > len(PLAINTEXT)
    assert stream["operation"] == "encrypt" and stream["route"] == "/api/crypto/stream/encrypt"
    assert stream["status"] == 200 and stream["tokenId"] == "admin"
    assert stream["client"] == "127.0.0.1"
    refused_scope = [e for e in events if e.get("code") == "insufficient-scope"]
    assert refused_scope[0]["tenant"] == "tenant-a"
    assert refused_scope[0]["tokenId"] == token["id"]
    [refusals] = [e for e in events if e["type"] == "refusals"]
    assert refusals["count"] == 5 and refusals["code"] == "invalid-token"
    exported_event = next(e for e in events if e.get("operation") == "export_key")
    assert exported_event["key"] == "exportable#1"
    signer = AuditSigner(services.records, services.kek)
    report = verify_trail(
        services.objects,
        audit_key=services.records.key.derive(AUDIT_KEY_PURPOSE),
        public_keys=[signer.stored_public_key()],
        checkpoints=None,
    )
    assert report.ok and not any("no close" in note for note in report.notes), report.lines()


def _path(template: str) -> str:
    """A concrete path for a route template: each parameter a plausible value."""
    path = template
    for name, value in {"{kid}": "mySymKey", "{job_id}": "0" * 32, "{token_id}": "a" * 16}.items():
        path = path.replace(name, value)
    return path.replace("{", "").replace("}", "")


def test_every_route_that_takes_a_token_leaves_its_event(tmp_path: Path) -> None:
    """Every route of the app that takes a token (its OpenAPI document declares the
    bearer scheme on each): a route added later is covered without touching this test."""
    settings = local_settings(tmp_path).model_copy(update=QUICK)
    with served(settings) as (url, app), client(url) as admin:
        routes = [
            (method.upper(), template)
            for template, operations in app.openapi()["paths"].items()
            for method, operation in operations.items()
            if operation.get("security")
        ]
        assert len(routes) > 20
        create_key(admin)
        for method, template in routes:
            admin.request(method, _path(template))
    audited = {(e.get("method"), e.get("route")) for e in events_of(app)}
    assert [route for route in routes if route not in audited] == []


def test_tenants_read_their_own_events_and_the_operator_reads_all(tmp_path: Path) -> None:
    settings = local_settings(tmp_path).model_copy(update={**QUICK, "audit_refusal_window": 0.01})
    with served(settings) as (url, app), client(url) as admin:
        create_key(admin)
        a = issue(admin, "tenant-a", "keys:read", "audit:read")
        b = issue(admin, "tenant-b", "keys:read", "audit:read")
        with client(url, a["token"]) as reader_a, client(url, b["token"]) as reader_b:
            for _ in range(3):
                reader_a.get("/api/key-management/keys/nokey")
            reader_b.get("/api/key-management/keys")
            with client(url, "not-a-token") as stranger:
                stranger.get("/api/audit")
            app.state.services.audit.flush()
            page = reader_a.get("/api/audit", params={"limit": 2}).json()
            seen = page["events"]
            while page["next"]:
                page = reader_a.get("/api/audit", params={"limit": 2, "after": page["next"]}).json()
                seen += page["events"]
            assert {e["tenant"] for e in seen} == {"tenant-a"}
            assert {e["tokenId"] for e in seen} == {a["id"]}
            assert sum(e.get("code") == "key-not-found" for e in seen) == 3
            times = [e["time"] for e in seen]
            assert times == sorted(times)
            failures = reader_a.get("/api/audit", params={"outcome": "failure"}).json()["events"]
            assert {e["status"] for e in failures} == {404}
            by_kid = reader_a.get("/api/audit", params={"kid": "nokey"}).json()["events"]
            assert len(by_kid) == 3
            b_view = reader_b.get("/api/audit", params={"operation": "list_keys"}).json()
            assert [e["tenant"] for e in b_view["events"]] == ["tenant-b"]
            problem(reader_a.get("/api/audit", params={"after": "bm9wZQ"}), 422, "invalid-cursor")
            # A tenant reads at most 7 days at once; by default the last 24 hours.
            a_month = {"since": "2026-01-01T00:00:00Z", "until": "2026-02-01T00:00:00Z"}
            problem(reader_a.get("/api/audit", params=a_month), 422, "audit-range-too-wide")
            for hostile in (
                {"since": "9999-12-31T23:00:00Z"},
                {"until": "0001-01-01T01:00:00Z"},
                {"since": "1969-12-31T23:00:00Z", "until": "1970-01-02T00:00:00Z"},
            ):
                problem(reader_a.get("/api/audit", params=hostile), 422, "audit-time-out-of-range")
            since_only = {"since": "2026-01-01T00:00:00Z"}
            assert reader_a.get("/api/audit", params=since_only).json()["events"] == []
            last_day = reader_a.get("/api/audit", params={"limit": 1000}).json()["events"]
            assert {e["seq"] for e in seen} <= {e["seq"] for e in last_day}
        app.state.services.audit.flush()
        everyone = admin.get("/api/audit", params={"limit": 1000}).json()["events"]
        assert {"tenant-a", "tenant-b", "default"} <= {e.get("tenant") for e in everyone}
        assert any(e["type"] == "refusals" for e in everyone)
        later = admin.get("/api/audit", params={"since": "2999-01-01T00:00:00Z"}).json()
        assert later == {"events": [], "next": None}
        assert admin.get("/api/audit", params=a_month).status_code == 200  # the operator's
        year_one = {"since": "0001-01-01T00:00:00+05:00"}
        problem(admin.get("/api/audit", params=year_one), 422, "audit-time-out-of-range")


def test_key_management_events_name_the_version_they_touch(tmp_path: Path) -> None:
    """Creating, importing and rotating a key name the version made; exporting, the
    version exported (the primary unless one is asked for); changes to the whole key
    name the kid alone."""
    settings = local_settings(tmp_path).model_copy(update=QUICK)
    with served(settings) as (url, app), client(url) as admin:
        create_key(admin, kid="k", exportable=True)
        admin.post("/api/key-management/keys/k/rotate").raise_for_status()
        jwk = admin.get("/api/key-management/keys/k/export").json()
        admin.get("/api/key-management/keys/k/export", params={"version": 1}).raise_for_status()
        imported = admin.post("/api/key-management/keys/import", json={"kid": "imp", "jwk": jwk})
        assert imported.status_code == 201, imported.text
        admin.post("/api/key-management/keys/k/disable").raise_for_status()
        app.state.services.audit.flush()
        events = events_of(app)
    named = [(e["operation"], e.get("key")) for e in events if e.get("status") in (200, 201)]
    assert named == [
        ("create_key", "k#1"),
        ("rotate_key", "k#2"),
        ("export_key", "k#2"),
        ("export_key", "k#1"),
        ("import_key", "imp#1"),
        ("disable_key", "k"),
    ]


def test_deleting_an_object_names_it_and_the_key_version_it_was_sealed_under(
    tmp_path: Path,
) -> None:
    settings = local_settings(tmp_path).model_copy(update=QUICK)
    with served(settings) as (url, app), client(url) as admin:
        create_key(admin)
        destination = {"destination": {"key": "plans/merger.bin"}}
        assert encrypt(admin, PLAINTEXT, **destination).status_code in (200, 201)
        assert admin.delete("/api/objects/plans/merger.bin").status_code == 204
        assert admin.delete("/api/objects/plans/merger.bin").status_code == 404
        app.state.services.audit.flush()
        events = events_of(app)
    deletions = [e for e in events if e.get("operation") == "delete_stored_object"]
    assert [(e["status"], e.get("object"), e.get("key")) for e in deletions] == [
        (204, "plans/merger.bin", "mySymKey#1"),
        (404, "plans/merger.bin", None),
    ]
    assert all(e.get("bucket") for e in deletions)


class AuditWrites:
    """Fails the audit's segment writes while `failing`: an S3 that has stopped taking them."""

    failing = False

    def __call__(self, head: bytes, length: int) -> bool:
        return self.failing and EVENTS_PREFIX.encode() in head.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_crypto_requests_are_refused_while_the_audit_cannot_be_written(
    fail_open: bool, tmp_path: Path, request: pytest.FixtureRequest, moto_endpoint: str
) -> None:
    writes = AuditWrites()
    with S3FaultProxy(moto_endpoint, writes) as proxy:
        settings = api_settings("s3", tmp_path, request).model_copy(
            update={
                **QUICK,
                "s3_endpoint_url": proxy.url,
                "audit_fail_after": 0.2,
                "audit_fail_open": fail_open,
            }
        )
        with served(settings) as (url, app), client(url) as admin:
            create_key(admin)
            assert encrypt(admin, b"before").status_code == 200
            writes.failing = True
            trail = app.state.services.audit
            wait_until(lambda: not trail.available(), "the audit to fail", timeout=60)
            answer = encrypt(admin, b"during")
            if fail_open:
                assert answer.status_code == 200
            else:
                problem(answer, 503, "audit-unavailable")
            # Reading stays open, and is still audited.
            assert admin.get("/api/key-management/keys").status_code == 200
            writes.failing = False
            wait_until(trail.available, "the audit to recover", timeout=60)
            assert encrypt(admin, b"after").status_code == 200
        events = events_of(app)
    statuses = [e.get("status") for e in events if e.get("operation") == "encrypt"]
    assert statuses == [200, 200 if fail_open else 503, 200]


@pytest.mark.parametrize(
    ("opened", "fail_open"),
    [(False, False), (True, False), (False, True)],
    ids=["sweep-held", "announcement-unwritten", "fail-open"],
)
def test_the_sweeps_destroy_nothing_the_audit_cannot_record_first(
    opened: bool,
    fail_open: bool,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    moto_endpoint: str,
) -> None:
    from tests.test_keystore import Clock, spec

    writes = AuditWrites()
    with S3FaultProxy(moto_endpoint, writes) as proxy:
        settings = api_settings("s3", tmp_path, request).model_copy(
            update={**QUICK, "s3_endpoint_url": proxy.url, "audit_fail_open": fail_open}
        )
        parts = build_parts(settings, role="worker")
        clock = Clock()
        keys = KeyStore(parts.records, parts.kek, clock=clock)
        keys.create("t1", spec("doomed"))
        keys.schedule_deletion("t1", "doomed", pending_days=7)
        clock.advance(days=8)
        swept = replace(parts, keys=keys)
        # With the chain opened and written, the sweep finds the trail writable, and the
        # announcement of the destruction is what cannot be written.
        if opened:
            assert parts.audit.writable()
        writes.failing = True
        during = run_sweeps(swept, no_job_queued)
        if fail_open:
            assert during["destroyed"] == ["t1/doomed"]
        else:
            assert during.get("destroyed", []) == []
            assert keys.get("t1", "doomed").kid == "doomed"
            writes.failing = False
            assert run_sweeps(swept, no_job_queued)["destroyed"] == ["t1/doomed"]
        writes.failing = False
        parts.audit.close()
        actions = [e["action"] for e in events_of_store(parts) if e["type"] == "lifecycle"]
    # Announced, and the announcement written, before the key was destroyed; one not
    # written held the destruction back, to be announced again.
    assert actions[-2:] == ["destroying", "destruction"]
    assert actions.count("destroying") == (2 if opened else 1)


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_a_job_waits_while_the_audit_cannot_be_written(
    fail_open: bool, tmp_path: Path, request: pytest.FixtureRequest, moto_endpoint: str
) -> None:
    writes = AuditWrites()
    with S3FaultProxy(moto_endpoint, writes) as proxy:
        settings = api_settings("s3", tmp_path, request).model_copy(
            update={
                **QUICK,
                "s3_endpoint_url": proxy.url,
                "audit_fail_after": 3600,  # the API takes the job; its runner holds it
                "audit_fail_open": fail_open,
            }
        )
        with served(settings) as (url, _), client(url) as admin:
            create_key(admin)
            stored = store_object(admin, "held.bin", b"held back")
            assert finished_job(admin, stored["verifyJob"])["status"] == "succeeded"
            writes.failing = True
            job = start_verify(admin, "held.bin")["id"]
            if fail_open:
                assert finished_job(admin, job)["status"] == "succeeded"
                return
            time.sleep(1.0)
            assert admin.get(f"{JOBS}/{job}").json()["status"] == "queued"
            writes.failing = False
            assert finished_job(admin, job)["status"] == "succeeded"


def test_a_celery_worker_keeps_a_chain_of_its_own_with_each_job(job_stack: JobStack) -> None:
    """The job's start and end in the worker's chain; the worker's warm shutdown closes
    it; the whole trail, API's and worker's, verifies against the worker's shipped
    checkpoint lines."""
    with job_stack.client() as admin:
        stored = store_object(admin, "audited/one", b"x" * 1000)
        job = finished_job(admin, stored["verifyJob"])
        assert job["status"] == "succeeded"
    [worker] = job_stack.workers
    # A warm shutdown: the worker's main process alone is told, and ends its pool itself
    # (SIGTERM to the whole group would kill the pool process first, as a crash does).
    os.kill(worker.process.pid, signal.SIGTERM)
    worker.process.wait(timeout=60)
    services = job_stack.services
    events = events_of_store(services)
    job_events = [e for e in events if e.get("job") == stored["verifyJob"]]
    assert [e["action"] for e in job_events] == ["job-started", "job-ended"]
    assert job_events[1]["outcome"] == "succeeded" and job_events[0]["tenant"] == "default"
    chain = job_events[0]["chain"]
    assert chain.startswith("worker-")
    assert [e["type"] for e in events if e["chain"] == chain][-1] == "chain-closed"
    checkpoints = checkpoint_lines(worker.output().splitlines())
    assert {c["chain"] for c in checkpoints} == {chain}
    report = verify_trail(
        services.objects,
        audit_key=services.records.key.derive(AUDIT_KEY_PURPOSE),
        public_keys=[AuditSigner(services.records, services.kek).stored_public_key()],
        checkpoints=checkpoints,
    )
    # Only the worker's log lines were given: the API's chain is checked, but unanchored.
    assert {(f.chain.split("-")[0], f.problem) for f in report.findings} == {
        ("api", "unanchored")
    }, report.lines()
