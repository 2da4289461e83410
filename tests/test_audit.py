"""The audit trail's chains on each storage backend: written as sealed, signed segments,
verified intact, and every tampering found, with the KEK or with the public key alone;
checkpoints kept in Redis and in a second (Object Lock) bucket."""

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
from audit.chain import segment_name
from audit.reading import authentic_events
from keystore import KeyStore, LocalKek
from sealstream.wiring import build_parts
from storage import ObjectStore, S3Store, StorageUnavailable
from storage.integrity import RecordKey, Records
from tests.conftest import local_settings
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
            public_key=signer.stored_public_key(),
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
    assert tenants.count("t1") == 5 and "someone-else" not in tenants


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


def test_segments_are_never_overwritten(trail: Trail) -> None:
    """Each flush writes a segment of its own, conditionally: a name already taken (by
    anyone) is not overwritten, and that flush counts as failed."""
    log = trail.open()
    log.record({"type": "request"})
    assert log.flush()
    last = json.loads(trail.store.get(trail.segments(log.chain)[-1]))["checkpoint"]["seq"]
    log.record({"type": "request"})
    planted = segment_name(log.chain, last + 1, datetime.now(UTC))
    trail.store.put(planted, b"planted")
    assert not log.flush()
    assert trail.store.get(planted) == b"planted"


def test_the_public_key_exported_checks_the_trail(trail: Trail, tmp_path: Path) -> None:
    written_chain(trail)
    pem = public_pem(AuditSigner(trail.records, trail.kek).public_key)
    key = load_public_key(pem)
    report = verify_trail(trail.store, audit_key=None, public_key=key, checkpoints=None)
    assert report.ok


# Sinks outside the bucket


def test_checkpoints_in_redis_anchor_the_tail(trail: Trail, redis_server: "RedisServer") -> None:
    trail.sink = RedisSink.from_url(redis_server.url)
    log = written_chain(trail)
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
        trail.store, audit_key=None, public_key=signer.stored_public_key(), checkpoints=checkpoints
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
    run_sweeps(replace(parts, keys=keys))
    parts.audit.close()
    audit_key = parts.records.key.derive(AUDIT_KEY_PURPOSE)
    actions = {
        (e["action"], e["tenant"], e["key"])
        for e in authentic_events(parts.objects, audit_key)
        if e["type"] == "lifecycle"
    }
    assert actions == {("scheduled-rotation", "t1", "hourly"), ("destruction", "t1", "doomed")}


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
    for args in ([], ["--checkpoints", str(shipped)], auditor):
        run = sealstream("audit", "verify", *args, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "1 chain, 4 events: intact" in run.stdout
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


def test_the_reader_serves_each_event_once_and_refuses_one_with_no_canonical_form(
    trail: Trail,
) -> None:
    log = written_chain(trail)
    first, second = trail.segments(log.chain)[1:3]
    day = first.removeprefix(EVENTS_PREFIX).split("/")[0]
    another_day = first.replace(f"/{day}/", "/1999-01-01/")
    trail.store.put(another_day, trail.store.get(first))

    def not_a_number(document: dict[str, Any]) -> None:
        document["events"][0]["route"] = float("nan")

    trail.rewrite(second, not_a_number)
    events = list(authentic_events(trail.store, trail.records.key.derive(AUDIT_KEY_PURPOSE)))
    places = [(event["chain"], event["seq"]) for event in events]
    assert len(places) == len(set(places))
    assert len(places) == 8 - 1  # open, six requests, close; less the spoiled one
