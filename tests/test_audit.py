"""The audit trail's chains on each storage backend: written as sealed, signed segments,
verified intact, and every tampering found, with the KEK or with the public key alone;
checkpoints kept in Redis and in a second (Object Lock) bucket."""

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

import audit.trail
from audit import (
    AUDIT_KEY_PURPOSE,
    EVENTS_PREFIX,
    AuditOptions,
    AuditSigner,
    AuditTrail,
    BucketSink,
    CheckpointSink,
    RedisSink,
    Report,
    checkpoint_lines,
    load_public_key,
    public_pem,
    verify_trail,
)
from audit.alarms import AUDIT_ALARMS
from audit.chain import LARGEST_SEGMENT, NAME_TAKEN, PLANTED, segment_name
from audit.reading import AuditQuery, InvalidCursor, authentic_events, query_events
from audit.signing import KEY_MISSING, SIGNING_KEY_NAME, SigningKeyPresent, fingerprint
from audit.sinks import REDIS_HASH
from cli.exits import EXIT_UNANCHORED
from keystore import KeyStore, LocalKek
from sealstream.wiring import build_parts, open_checkpoint_sink
from services.stored_objects import NOTE_KIND, DeletionNote
from storage import LocalStore, ObjectNotFound, ObjectStore, S3Store, StorageUnavailable
from storage.integrity import RecordKey, Records
from tests.conftest import local_settings
from tests.support.jobs import no_job_queued
from tests.support.ports import LOCALHOST
from tests.support.sentinel import MASTER as SENTINEL_MASTER
from tests.support.waiting import wait_until
from workers.lifecycle import run_sweeps

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tests.support.services import RedisServer

# Flushed by hand in these tests: the flusher's own timer never fires first.
MANUAL = AuditOptions(flush_interval=3600, flush_events=10**6)


class ListSink(CheckpointSink):
    """Checkpoints kept in a list, as a log shipper would keep the stdout sink's lines."""

    def __init__(self) -> None:
        self.kept: list[dict[str, Any]] = []

    def publish(self, checkpoint: dict[str, Any]) -> None:
        self.kept.append(checkpoint)

    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self.kept)


@dataclass
class Trail:
    store: ObjectStore
    records: Records
    kek: LocalKek
    sink: CheckpointSink

    def open(self, role: str = "api", options: AuditOptions = MANUAL) -> AuditTrail:
        return AuditTrail(
            self.store,
            lambda: self.records.key.derive(AUDIT_KEY_PURPOSE),
            AuditSigner(self.records, self.kek),
            self.sink,
            options,
            role=role,
        )

    def verify(self, *, with_kek: bool = True, anchored: bool = True) -> Report:
        signer = AuditSigner(self.records, self.kek)
        return verify_trail(
            self.store,
            audit_key=self.records.key.derive(AUDIT_KEY_PURPOSE) if with_kek else None,
            public_keys=signer.stored_public_keys(),
            checkpoints=self.sink.checkpoints() if anchored else None,
        )

    def segments(self, chain: str) -> list[str]:
        return sorted(
            info.key for info in self.store.list(EVENTS_PREFIX) if f"/{chain}." in info.key
        )

    def rewrite(self, key: str, change: Callable[[dict[str, Any]], None]) -> None:
        document = json.loads(self.store.get(key))
        change(document)
        self.store.put(key, json.dumps(document).encode())


@pytest.fixture
def trail(store: ObjectStore) -> Trail:
    return Trail(
        store, Records(store, RecordKey(os.urandom(32))), LocalKek(os.urandom(32)), ListSink()
    )


def written_chain(trail: Trail, *, close: bool = True) -> AuditTrail:
    """A chain of three segments: its opening, then two of three requests each."""
    log = trail.open()
    for segment in range(2):
        for n in range(3):
            log.record({"type": "request", "tenant": "t1", "route": f"/r/{segment}/{n}"})
        assert log.flush()
    if close:
        log.close()
    return log


def test_an_untouched_trail_verifies_with_the_kek_and_with_the_public_key_alone(
    trail: Trail,
) -> None:
    api, worker = written_chain(trail), trail.open("worker")
    worker.job("job-started", tenant="t1", job="j1", kind="verify")
    worker.close()
    for with_kek in (True, False):
        report = trail.verify(with_kek=with_kek)
        assert report.ok, report.lines()
        assert report.chains == 2
        assert report.events == 1 + 6 + 1 + 3  # api: open, 6, close; worker: open, job, close
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    assert [e["seq"] for e in events if e["chain"] == api.chain] == list(range(8))
    assert {e["type"] for e in events} >= {"chain-opened", "chain-closed", "request", "job"}


def test_a_chain_still_open_is_noted_not_failed(trail: Trail) -> None:
    log = written_chain(trail, close=False)
    report = trail.verify()
    assert report.ok
    assert any(log.chain in note and "no close" in note for note in report.notes)


def _alter(document: dict[str, Any]) -> None:
    document["events"][1]["tenant"] = "someone-else"


def _remove(document: dict[str, Any]) -> None:
    del document["events"][1]


def _reorder(document: dict[str, Any]) -> None:
    events = document["events"]
    events[0], events[1] = events[1], events[0]


@pytest.mark.parametrize(
    ("change", "problem"),
    [(_alter, "altered"), (_remove, "removed"), (_reorder, "reordered")],
)
@pytest.mark.parametrize("with_kek", [True, False], ids=["kek", "public-key"])
def test_an_event_altered_removed_or_reordered_is_found(
    trail: Trail, change: Callable[[dict[str, Any]], None], problem: str, with_kek: bool
) -> None:
    log = written_chain(trail)
    trail.rewrite(trail.segments(log.chain)[1], change)
    report = trail.verify(with_kek=with_kek)
    assert problem in report.problems(), report.lines()


def test_an_event_altered_with_its_hash_chain_redone_fails_its_mac(trail: Trail) -> None:
    """Without the KEK a forger can recompute digests, but not MACs nor the signature."""
    log = written_chain(trail)
    trail.rewrite(trail.segments(log.chain)[1], _alter)
    assert "altered" in trail.verify(with_kek=True, anchored=False).problems()


@pytest.mark.parametrize("with_kek", [True, False], ids=["kek", "public-key"])
def test_a_missing_segment_is_found(trail: Trail, with_kek: bool) -> None:
    log = written_chain(trail)
    trail.store.delete(trail.segments(log.chain)[1])
    assert "missing-segment" in trail.verify(with_kek=with_kek).problems()


@pytest.mark.parametrize("with_kek", [True, False], ids=["kek", "public-key"])
def test_a_tail_deleted_beyond_the_last_flush_is_found_by_the_checkpoints(
    trail: Trail, with_kek: bool
) -> None:
    log = written_chain(trail)
    for key in trail.segments(log.chain)[-2:]:
        trail.store.delete(key)
    assert "truncated" in trail.verify(with_kek=with_kek).problems()
    # Without the anchor, it reads as a chain whose process crashed.
    unanchored = trail.verify(with_kek=with_kek, anchored=False)
    assert unanchored.ok and any("no close" in note for note in unanchored.notes)
    assert not unanchored.anchored and "UNANCHORED" in unanchored.lines()[-1]


@pytest.mark.parametrize("with_kek", [True, False], ids=["kek", "public-key"])
def test_a_deleted_chain_is_found_by_the_checkpoints(trail: Trail, with_kek: bool) -> None:
    log = written_chain(trail)
    trail.open("worker").close()
    for key in trail.segments(log.chain):
        trail.store.delete(key)
    report = trail.verify(with_kek=with_kek)
    assert [f.chain for f in report.findings if f.problem == "deleted-chain"] == [log.chain]


def test_a_forged_checkpoint_or_segment_signature_is_found(trail: Trail) -> None:
    log = written_chain(trail)
    forged = {**trail.sink.checkpoints()[-1], "seq": 99}
    assert isinstance(trail.sink, ListSink)
    trail.sink.kept.append(forged)
    trail.rewrite(trail.segments(log.chain)[0], lambda d: d["checkpoint"].update(time="x"))
    report = trail.verify()
    assert {"forged-checkpoint", "altered"} <= report.problems()


def test_an_event_read_back_is_served_only_if_its_mac_holds(trail: Trail) -> None:
    log = written_chain(trail)
    trail.rewrite(trail.segments(log.chain)[1], _alter)
    audit_key = trail.records.key.derive(AUDIT_KEY_PURPOSE)
    tenants = [event.get("tenant") for event in authentic_events(trail.store, audit_key)]
    assert tenants.count("t1") == 4 and "someone-else" not in tenants  # nor the one after


def test_events_past_the_buffer_limit_are_counted_as_lost_then_recorded(trail: Trail) -> None:
    """While nothing can be written (here the record key cannot be had, as when the store
    is down at start), events wait up to the limit; those past it are counted, and the
    count is recorded once writing works."""
    down = True

    def audit_key() -> bytes:
        if down:
            raise StorageUnavailable("the store is down")
        return trail.records.key.derive(AUDIT_KEY_PURPOSE)

    options = replace(MANUAL, buffer_limit=4, fail_after=3600)
    log = AuditTrail(
        trail.store, audit_key, AuditSigner(trail.records, trail.kek), None, options, role="api"
    )
    for n in range(6):
        log.record({"type": "request", "route": f"/r/{n}"})
    assert not log.flush()
    assert log.available()  # failing, but not for longer than allowed
    down = False
    log.close()
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    assert [e["type"] for e in events] == [
        "chain-opened", "request", "request", "request", "events-lost", "chain-closed"
    ]  # fmt: skip
    assert events[4]["count"] == 3


@pytest.mark.parametrize("with_kek", [True, False], ids=["kek", "public-key"])
def test_a_segment_name_taken_by_someone_else_is_an_alarm_and_the_chain_goes_on(
    trail: Trail, with_kek: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Names are random, but should a bucket writer get one first, the object there is
    never overwritten, the alarm is raised, the segment goes under a fresh name, and verify
    finds the chain whole, the planted object, and the alarm (even once that object is
    gone)."""
    log = trail.open()
    log.record({"type": "request", "route": "/before"})
    assert log.flush()
    planted: list[str] = []

    def guessed(chain: str, first: int, hour: str) -> str:
        name = segment_name(chain, first, hour)
        if not planted:  # a bucket writer who got to this name first
            trail.store.put(name, b"planted")
            planted.append(name)
        return name

    monkeypatch.setattr(audit.trail, "segment_name", guessed)
    alarms = AUDIT_ALARMS.labels(NAME_TAKEN)
    before = alarms._value.get()
    log.record({"type": "request", "route": "/after"})
    assert log.flush()
    log.close()
    assert trail.store.get(planted[0]) == b"planted"
    assert alarms._value.get() == before + 1
    assert "taken by an object this process did not write" in caplog.text
    report = trail.verify(with_kek=with_kek)
    assert [f.problem for f in report.findings] == ["planted", "planted"], report.lines()
    assert report.events == 5  # opened, /before, /after, the alarm, closed
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    assert [e["type"] for e in events][-2:] == ["alarm", "chain-closed"]
    trail.store.delete(planted[0])
    assert [f.problem for f in trail.verify(with_kek=with_kek).findings] == ["planted"]


def test_the_public_key_exported_checks_the_trail(trail: Trail, tmp_path: Path) -> None:
    written_chain(trail)
    pem = public_pem(AuditSigner(trail.records, trail.kek).public_key)
    key = load_public_key(pem)
    report = verify_trail(trail.store, audit_key=None, public_keys=[key], checkpoints=None)
    assert report.ok


# Sinks outside the bucket


def redis_sink(tmp_path: Path, url: str, master: str = "mymaster") -> CheckpointSink:
    """The sink the settings make of a Redis URL."""
    settings = local_settings(tmp_path).model_copy(
        update={"redis_url": url, "redis_sentinel_master": master, "audit_checkpoints": "redis"}
    )
    sink = open_checkpoint_sink(settings)
    assert isinstance(sink, RedisSink)
    return sink


def test_checkpoints_in_redis_anchor_the_tail(
    trail: Trail, redis_server: "RedisServer", tmp_path: Path
) -> None:
    trail.sink = redis_sink(tmp_path, redis_server.url)
    log = written_chain(trail)
    assert trail.verify().ok
    trail.store.delete(trail.segments(log.chain)[-1])
    assert "truncated" in trail.verify().problems()


def test_checkpoints_go_to_the_primary_redis_sentinels_name(
    trail: Trail, sentinel: tuple[str, list[int]], tmp_path: Path
) -> None:
    """A `sentinel://` URL (real redis-server and redis-sentinel processes): checkpoints
    reach the primary, are read back through the sentinels, and anchor the tail."""
    url, (primary, _, _) = sentinel
    trail.sink = redis_sink(tmp_path, url, SENTINEL_MASTER)
    log = written_chain(trail)
    direct = redis.Redis(host=LOCALHOST, port=primary, decode_responses=True)
    assert direct.hkeys(REDIS_HASH) == [log.chain]
    direct.close()
    assert trail.verify().ok
    trail.store.delete(trail.segments(log.chain)[-1])
    assert "truncated" in trail.verify().problems()


@pytest.fixture
def locked_bucket(moto_s3: "S3Client", s3_bucket: str) -> str:
    """A second bucket with Object Lock: each object kept for a day, in compliance mode."""
    name = f"{s3_bucket}-checkpoints"
    moto_s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    moto_s3.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
        },
    )
    return name


def test_checkpoints_in_an_object_lock_bucket_cannot_be_removed_and_anchor_the_chains(
    trail: Trail, locked_bucket: str, moto_endpoint: str, moto_s3: "S3Client"
) -> None:
    trail.sink = BucketSink(S3Store(locked_bucket, endpoint_url=moto_endpoint))
    log = written_chain(trail)
    assert trail.verify().ok
    stored = moto_s3.list_object_versions(Bucket=locked_bucket)["Versions"]
    assert len(stored) >= 3
    version = stored[0]
    with pytest.raises(moto_s3.exceptions.ClientError, match="AccessDenied"):
        moto_s3.delete_object(
            Bucket=locked_bucket, Key=version["Key"], VersionId=version["VersionId"]
        )
    for key in trail.segments(log.chain):
        trail.store.delete(key)
    assert "deleted-chain" in trail.verify().problems()


def test_the_stdout_sink_writes_lines_verify_reads_back(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    from audit import StdoutSink

    trail.sink = StdoutSink()
    log = written_chain(trail)
    lines = capsys.readouterr().out.splitlines()
    checkpoints = checkpoint_lines(["some other log line", *lines])
    seqs = [c["seq"] for c in checkpoints]
    assert seqs == sorted(seqs) and seqs[-2:] == [6, 7]
    signer = AuditSigner(trail.records, trail.kek)
    trail.store.delete(trail.segments(log.chain)[-1])
    report = verify_trail(
        trail.store,
        audit_key=None,
        public_keys=[signer.stored_public_key()],
        checkpoints=checkpoints,
    )
    assert "truncated" in report.problems()


def test_the_lifecycle_sweeps_record_rotations_and_destructions(tmp_path: Path) -> None:
    """What the sweeps do on their own is in the trail of the process that ran them."""
    from tests.test_keystore import Clock, spec

    parts = build_parts(local_settings(tmp_path), role="worker")
    clock = Clock()
    keys = KeyStore(parts.records, parts.kek, clock=clock)
    keys.create("t1", spec("hourly", rotationPeriod=3600))
    keys.create("t1", spec("doomed"))
    keys.schedule_deletion("t1", "doomed", pending_days=7)
    clock.advance(days=8)
    # A deletion of an object that a crash cut short.
    stored = parts.objects.put("tenants/t1/docs/gone", b"an object")
    note = DeletionNote(
        tenant="t1",
        bucket=parts.objects.bucket,
        storage_key=stored.key,
        etag=stored.etag,
        versions=(),
        created_at=datetime.now(UTC),
    )
    parts.records.put(NOTE_KIND, note.name, note)
    run_sweeps(replace(parts, keys=keys), no_job_queued)
    parts.audit.close()
    audit_key = parts.records.key.derive(AUDIT_KEY_PURPOSE)
    actions = {
        (e["action"], e["tenant"], e.get("key") or e.get("object"))
        for e in authentic_events(parts.objects, audit_key)
        if e["type"] == "lifecycle"
    }
    assert actions == {
        ("scheduled-rotation", "t1", "hourly"),
        ("destroying", "t1", "doomed"),
        ("destruction", "t1", "doomed"),
        ("finishing-deletion", "t1", "docs/gone"),
        ("deletion-finished", "t1", "docs/gone"),
    }


def sealstream(*args: str, env: dict[str, str]) -> "subprocess.CompletedProcess[str]":
    command = [str(Path(sys.executable).with_name("sealstream")), *args]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}
    return subprocess.run(
        command, env={**inherited, **env}, capture_output=True, text=True, timeout=120
    )


def test_the_audit_commands_verify_with_the_kek_or_the_exported_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sealstream audit public-key` and `sealstream audit verify`, run as an operator
    would, against the store; exit 0 on an intact trail, 1 once a segment is gone."""
    settings = local_settings(tmp_path).model_copy(update={"audit_stdout": True})
    parts = build_parts(settings)
    parts.audit.record({"type": "request", "tenant": "t1"})
    assert parts.audit.flush()
    parts.audit.record({"type": "request", "tenant": "t1"})
    parts.audit.close()
    shipped = tmp_path / "shipped.log"
    lines = capsys.readouterr().out
    shipped.write_text(lines)
    assert '"sealstreamAudit"' in lines  # the events themselves, as JSON lines
    env = {"SEALSTREAM_STORAGE_URL": settings.storage_url}
    public = sealstream("audit", "public-key", env=env)
    assert public.returncode == 0 and public.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    (tmp_path / "audit.pub").write_text(public.stdout)
    auditor = ["--public-key", str(tmp_path / "audit.pub"), "--checkpoints", str(shipped)]
    for args in (["--checkpoints", str(shipped)], auditor):
        run = sealstream("audit", "verify", *args, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.endswith("1 chain, 4 events: intact\n")
    # With the stdout sink and no shipped lines, nothing anchors the tails: not a pass.
    run = sealstream("audit", "verify", env=env)
    assert run.returncode == EXIT_UNANCHORED == 8, run.stdout + run.stderr
    assert "1 chain, 4 events: intact but UNANCHORED" in run.stdout
    last = sorted(info.key for info in parts.objects.list(EVENTS_PREFIX))[-1]
    parts.objects.delete(last)
    run = sealstream("audit", "verify", *auditor, env=env)
    assert run.returncode == 1
    assert run.stdout.startswith("truncated: chain ")


def test_a_store_with_a_signing_key_and_no_chain_left_is_a_deleted_trail(trail: Trail) -> None:
    written_chain(trail)
    for info in list(trail.store.list(EVENTS_PREFIX)):
        trail.store.delete(info.key)
    for anchored in (True, False):
        assert "deleted-chain" in trail.verify(anchored=anchored).problems()


def test_a_chain_the_sink_holds_no_checkpoint_of_is_unanchored(trail: Trail) -> None:
    log = written_chain(trail)
    assert isinstance(trail.sink, ListSink)
    trail.sink.kept.clear()  # the sink lost its data: nothing anchors the chain's end
    report = trail.verify()
    assert [f.chain for f in report.findings if f.problem == "unanchored"] == [log.chain]


def test_a_planted_segment_with_huge_bounds_or_a_nan_is_reported_not_a_crash(
    trail: Trail,
) -> None:
    log = written_chain(trail)
    first, second = trail.segments(log.chain)[1:3]

    def huge_bounds(document: dict[str, Any]) -> None:
        document["checkpoint"]["seq"] = 10**11

    def not_a_number(document: dict[str, Any]) -> None:
        document["events"][0]["route"] = float("nan")

    trail.rewrite(first, huge_bounds)
    trail.rewrite(second, not_a_number)
    for with_kek in (True, False):
        report = trail.verify(with_kek=with_kek)
        assert not report.ok
        assert report.problems() >= {"removed", "altered"}, report.lines()


class CountingStore(LocalStore):
    """A local store that counts the objects read whole."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetched: list[str] = []

    def get(self, key: str) -> bytes:
        self.fetched.append(key)
        return super().get(key)


def test_an_object_too_large_for_a_segment_is_one_alarm_and_is_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CountingStore(tmp_path / "bucket")
    trail = Trail(
        store, Records(store, RecordKey(os.urandom(32))), LocalKek(os.urandom(32)), ListSink()
    )
    log = written_chain(trail)
    hour = trail.segments(log.chain)[0].removeprefix(EVENTS_PREFIX).split("/")[0]
    planted = segment_name(log.chain, 1, hour)
    store.put(planted, b'{"events":[' + b"{}," * (LARGEST_SEGMENT // 3) + b"{}]}")
    alarms = AUDIT_ALARMS.labels(PLANTED)
    before = alarms._value.get()
    events = list(authentic_events(store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    assert len(events) == 8 and alarms._value.get() == before + 1
    assert planted not in store.fetched and planted in caplog.text
    report = trail.verify()
    assert [f.problem for f in report.findings] == ["planted"], report.lines()
    assert planted not in store.fetched


def test_a_segment_of_forged_events_is_refused_once_not_per_event(
    trail: Trail, caplog: pytest.LogCaptureFixture
) -> None:
    log = written_chain(trail)
    hour = trail.segments(log.chain)[0].removeprefix(EVENTS_PREFIX).split("/")[0]
    forged = {"format": "sealstream-audit/1", "events": [{}] * 1000, "checkpoint": {}}
    trail.store.put(segment_name(log.chain, 1, hour), json.dumps(forged).encode())
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    assert len(events) == 8
    assert caplog.text.count("refused a audit-event record") == 1, caplog.text


def test_a_checkpoint_with_no_canonical_form_is_forged_not_a_crash(
    trail: Trail, redis_server: "RedisServer", tmp_path: Path
) -> None:
    """A NaN in a checkpoint, in the sink or in a planted segment, is a finding."""
    trail.sink = redis_sink(tmp_path, redis_server.url)
    log = written_chain(trail)
    client = redis.Redis.from_url(redis_server.url)
    nan = json.dumps({"chain": "api-nan", "seq": 1, "signature": "AA==", "x": float("nan")})
    client.hset(REDIS_HASH, "api-nan", nan)
    assert trail.verify().problems() == {"forged-checkpoint"}
    client.hdel(REDIS_HASH, "api-nan")
    first = trail.segments(log.chain)[0]
    document = json.loads(trail.store.get(first))
    document["checkpoint"]["x"] = float("nan")
    hour = first.removeprefix(EVENTS_PREFIX).split("/")[0]
    trail.store.put(segment_name(log.chain, 0, hour), json.dumps(document).encode())
    for with_kek in (True, False):
        report = trail.verify(with_kek=with_kek)
        assert report.problems() == {"planted"}, report.lines()


def test_the_reader_serves_each_event_once_and_refuses_one_with_no_canonical_form(
    trail: Trail,
) -> None:
    log = written_chain(trail)
    first, second = trail.segments(log.chain)[1:3]
    day = first.removeprefix(EVENTS_PREFIX).split("/")[0]
    another_day = first.replace(f"/{day}/", "/1999-01-01T00/")
    trail.store.put(another_day, trail.store.get(first))

    def not_a_number(document: dict[str, Any]) -> None:
        document["events"][0]["route"] = float("nan")

    # How the chain falls into segments depends on when its flusher ran, the opening
    # alone or with the first requests: what is lost is the spoiled segment, whatever it held.
    spoiled = len(json.loads(trail.store.get(second))["events"])
    trail.rewrite(second, not_a_number)
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    places = [(event["chain"], event["seq"]) for event in events]
    assert len(places) == len(set(places))
    assert len(places) == 8 - spoiled  # open, six requests, close; less the spoiled segment


def test_an_event_is_small_whatever_context_keys_a_client_sends(trail: Trail) -> None:
    """At most 32 context keys are kept (the others counted), and one longer than 64
    bytes is kept as a MAC of it: the same key gives the same MAC, and no reader can test
    guesses against it without the KEK."""
    log = trail.open()
    names = sorted(["K" * 65536, "L" * 65536, *(f"key-{n:03d}" for n in range(100))])
    for _ in range(2):
        log.record({"type": "request", "tenant": "t1", "contextKeys": names})
    log.close()
    trail_bytes = b"".join(trail.store.get(key) for key in trail.segments(log.chain))
    assert b"KKKKKKKK" not in trail_bytes and len(trail_bytes) < 16 * 1024
    audit_key = trail.records.key.derive(AUDIT_KEY_PURPOSE)
    first, second = [e for e in authentic_events(trail.store, audit_key) if e["type"] == "request"]
    assert len(first["contextKeys"]) == 32 and first["contextKeysOmitted"] == 102 - 32
    digests = first["contextKeys"][:2]
    assert all(name.startswith("hmac-sha256:") for name in digests)
    assert digests[0] != digests[1] and first["contextKeys"] == second["contextKeys"]
    assert first["contextKeys"][2:] == names[2:32]
    assert trail.verify().ok


def _down_until_closed(trail: Trail, options: AuditOptions) -> tuple[AuditTrail, list[bool]]:
    """A trail that cannot write (its key cannot be had) while the flag it returns is set."""
    down = [True]

    def audit_key() -> bytes:
        if down[0]:
            raise StorageUnavailable("the store is down")
        return trail.records.key.derive(AUDIT_KEY_PURPOSE)

    signer = AuditSigner(trail.records, trail.kek)
    return AuditTrail(trail.store, audit_key, signer, trail.sink, options, role="api"), down


def test_the_buffer_and_each_segment_are_bounded_in_bytes(trail: Trail) -> None:
    """While the store fails, events wait up to the buffer's bytes (those past it are
    counted as lost); once it works, they are written in segments of at most the segment
    bound."""
    options = replace(MANUAL, buffer_bytes=64 * 1024, segment_bytes=16 * 1024, fail_after=3600)
    log, down = _down_until_closed(trail, options)
    for n in range(100):  # about 1.3 KB each, 130 KB in all
        log.record({"type": "request", "route": f"/r/{n}", "object": "o" * 1000})
    assert not log.flush()
    down[0] = False
    log.close()
    segments = [trail.store.get(key) for key in trail.segments(log.chain)]
    assert len(segments) >= 4
    assert max(len(segment) for segment in segments) <= 16 * 1024 + 1024  # and its checkpoint
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    kept = sum(e["type"] == "request" for e in events)
    [lost] = [e for e in events if e["type"] == "events-lost"]
    assert 40 <= kept <= 50 and lost["count"] == 100 - kept
    assert trail.verify().ok


def test_a_segments_worth_of_bytes_waiting_flushes_at_once(trail: Trail) -> None:
    log = trail.open(options=replace(MANUAL, segment_bytes=16 * 1024))
    log.record({"type": "request", "route": "/first"})
    # The flusher's first flush, at the chain's opening, has written; it now waits an hour.
    wait_until(lambda: len(trail.segments(log.chain)) == 1, "the opening flush", timeout=30)
    for n in range(20):  # over 16 KB, in far fewer events than flush_events
        log.record({"type": "request", "route": f"/r/{n}", "object": "o" * 1000})
    wait_until(lambda: len(trail.segments(log.chain)) >= 2, "a flush of its own", timeout=30)
    log.close()


def test_a_page_reads_the_hours_it_shows_not_the_whole_trail(
    trail: Trail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments are filed by the hour of their events and listed in order: a page stops
    listing once it is full of events no later hour can precede, and a range reads its
    own hours only."""
    log = trail.open()
    for hour in range(6):
        moment = f"2026-01-01T{hour:02d}:30:00.000000+00:00"
        monkeypatch.setattr(audit.trail, "now_iso", lambda moment=moment: moment)
        for n in range(3):
            log.record({"type": "request", "tenant": "t1", "route": f"/{hour}/{n}"})
        assert log.flush()
    log.close()
    read: list[str] = []
    get = trail.store.get

    def counted_get(key: str) -> bytes:
        read.append(key)
        return get(key)

    monkeypatch.setattr(trail.store, "get", counted_get)
    audit_key = trail.records.key.derive(AUDIT_KEY_PURPOSE)

    def hours_read() -> set[str]:
        hours = {key.removeprefix(EVENTS_PREFIX).split("/")[0] for key in read}
        read.clear()
        return hours

    page, cursor = query_events(trail.store, audit_key, AuditQuery(tenant=None, limit=2))
    assert [e["type"] for e in page] == ["chain-opened", "request"]
    assert hours_read() == {"2026-01-01T00"}
    seen = page
    while cursor is not None:
        page, cursor = query_events(
            trail.store, audit_key, AuditQuery(tenant=None, limit=2, after=cursor)
        )
        seen += page
    assert [e["seq"] for e in seen] == list(range(1 + 18 + 1))
    ranged = AuditQuery(
        tenant="t1",
        since=datetime.fromisoformat("2026-01-01T03:00:00+00:00"),
        until=datetime.fromisoformat("2026-01-01T03:59:00+00:00"),
    )
    read.clear()
    page, cursor = query_events(trail.store, audit_key, ranged)
    assert [e["route"] for e in page] == ["/3/0", "/3/1", "/3/2"] and cursor is None
    assert hours_read() == {"2026-01-01T03"}


def test_a_page_reads_a_bounded_number_of_segments_and_goes_on_with_a_cursor(
    trail: Trail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter that matches nothing reads `segments` segments (rounded up to whole
    hours) per page, not the whole range: an empty page with a cursor goes on."""
    log = trail.open()
    for hour in range(6):
        moment = f"2026-01-01T{hour:02d}:30:00.000000+00:00"
        monkeypatch.setattr(audit.trail, "now_iso", lambda moment=moment: moment)
        log.record({"type": "request", "tenant": "t1", "route": f"/{hour}"})
        assert log.flush()
    log.close()
    audit_key = trail.records.key.derive(AUDIT_KEY_PURPOSE)
    for tenant, routes in (("t2", []), ("t1", [f"/{hour}" for hour in range(6)])):
        cursor, pages, seen = None, 0, []
        while pages == 0 or cursor is not None:
            query = AuditQuery(tenant=tenant, segments=2, after=cursor)
            page, cursor = query_events(trail.store, audit_key, query)
            pages += 1
            seen += page
        assert [e["route"] for e in seen if e["type"] == "request"] == routes
        assert pages == 3


def test_a_cursor_with_a_time_out_of_range_or_without_offset_is_invalid(trail: Trail) -> None:
    audit_key = trail.records.key.derive(AUDIT_KEY_PURPOSE)
    for moment in ("2026-12-07T16:00:00", "0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00Z"):
        cursor = base64.urlsafe_b64encode(f"{moment}|api-x|1".encode()).decode()
        query = AuditQuery(tenant="t", since=datetime.now(UTC), after=cursor)
        with pytest.raises(InvalidCursor):
            query_events(trail.store, audit_key, query)


def test_a_deleted_signing_key_is_tampering_not_a_reason_to_make_one(trail: Trail) -> None:
    """Once the trail has segments, a process that finds no signing key raises the alarm
    and writes nothing (so the service fails closed); the operator starts a new key, which
    keeps the lost one's public half, and verify checks old and new chains with both."""
    written_chain(trail)
    old = AuditSigner(trail.records, trail.kek).stored_public_key()
    trail.store.delete(SIGNING_KEY_NAME)
    alarms = AUDIT_ALARMS.labels(KEY_MISSING)
    before = alarms._value.get()
    log = trail.open(options=replace(MANUAL, fail_after=0.01))
    log.record({"type": "request", "route": "/during"})
    assert not log.flush()
    wait_until(log.refuses_requests, "the trail to fail closed", timeout=10)
    assert alarms._value.get() > before
    with pytest.raises(ObjectNotFound):
        trail.store.head(SIGNING_KEY_NAME)
    new = AuditSigner(trail.records, trail.kek).new_key([old])
    with pytest.raises(SigningKeyPresent):
        AuditSigner(trail.records, trail.kek).new_key([])
    assert log.flush() and not log.refuses_requests()
    log.close()
    report = trail.verify()
    assert report.ok and report.chains == 2, report.lines()
    only_new = verify_trail(trail.store, audit_key=None, public_keys=[new], checkpoints=None)
    assert "altered" in only_new.problems()


def test_the_operator_starts_a_new_signing_key_by_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = local_settings(tmp_path)
    env = {"SEALSTREAM_STORAGE_URL": settings.storage_url}
    parts = build_parts(settings)
    parts.audit.record({"type": "request", "tenant": "t1"})
    parts.audit.close()
    (tmp_path / "old.pub").write_text(sealstream("audit", "public-key", env=env).stdout)
    parts.objects.delete(SIGNING_KEY_NAME)
    for command in (["public-key"], ["verify"]):
        refused = sealstream("audit", *command, env=env)
        assert refused.returncode == 2 and "new-signing-key" in refused.stderr, refused.stderr
    previous = ["--previous-public-key", str(tmp_path / "old.pub")]
    started = sealstream("audit", "new-signing-key", *previous, env=env)
    assert started.returncode == 0, started.stderr
    assert "a new audit signing key is started" in started.stdout
    again = sealstream("audit", "new-signing-key", env=env)
    assert again.returncode == 1 and "has an audit signing key" in again.stderr
    run = sealstream("audit", "verify", env=env)
    assert run.returncode == EXIT_UNANCHORED and "2 chains" in run.stdout, run.stdout
    audit_key = parts.records.key.derive(AUDIT_KEY_PURPOSE)
    [event] = [e for e in authentic_events(parts.objects, audit_key) if e["type"] == "signing-key"]
    old = load_public_key((tmp_path / "old.pub").read_bytes())
    new = load_public_key(sealstream("audit", "public-key", env=env).stdout.encode())
    assert event["publicKey"] == fingerprint(new)
    assert event["previousPublicKeys"] == [fingerprint(old)]


def test_a_rotation_on_the_usage_limit_is_recorded_by_the_process_that_made_it(
    tmp_path: Path,
) -> None:
    from tests.test_keystore import spec

    parts = build_parts(local_settings(tmp_path))
    parts.keys.create("t1", spec("busy", softUsageLimit=2, rotateOnUsageLimit=True))
    for _ in range(2):
        parts.keys.sealing_keyring("t1", "busy")
    parts.keys.flush_usage()
    assert parts.keys.get("t1", "busy").primary_version == 2
    parts.audit.close()
    audit_key = parts.records.key.derive(AUDIT_KEY_PURPOSE)
    rotations = [
        (e["action"], e["tenant"], e["key"], e["primaryVersion"])
        for e in authentic_events(parts.objects, audit_key)
        if e["type"] == "lifecycle"
    ]
    assert rotations == [("usage-rotation", "t1", "busy", 2)]
