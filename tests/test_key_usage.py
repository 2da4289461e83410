"""Key usage: every message sealed or opened counts once, per version; the counts are
shared by every process on a store (through the sealed key records, or Redis), and
enforce the key's limits: warnings past softUsageLimit and near expiresAt, refusal to
encrypt at maxUsageLimit or once a version has wrapped its share of random IVs, and
rotation on the soft limit."""

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from keystore import KeyRecord, KeySpec, KeyStore, LocalKek, Uses
from keystore.counts import WRAP_LIMIT, VersionUses
from keystore.errors import KeyUsageExhausted
from keystore.kek_wraps import RECORD_KIND as WRAPS_KIND
from keystore.kek_wraps import RECORD_NAME as WRAPS_NAME
from keystore.kek_wraps import KekWornOut, KekWrapCount
from keystore.persistence import RECORD_KIND, KeyRecordStore, record_key
from keystore.records import KeyChange
from keystore.usage import RecordLedger, UsageMeter
from keystore.usage_redis import IMPLAUSIBLE_COUNTS
from sealstream.settings import Settings
from sealstream.wiring import build_parts, open_records
from storage.integrity import Records, RecordTampered
from storage.local import LocalStore
from tests.conftest import ADMIN_TOKEN, Api, live_api, local_settings
from tests.support.http import KEYS, create_key, decrypt, encrypt, problem, read_object
from tests.support.jobs import no_job_queued
from tests.support.services import sealstream_serve
from tests.support.waiting import wait_until
from tests.test_api_signed_messages import partner_jwks
from workers.lifecycle import run_sweeps

if TYPE_CHECKING:
    from tests.support.services import RedisServer

TENANT = "default"  # the admin token's
SOFT = "X-Key-Usage-Limit-Warning"
EXPIRY = "X-Key-Expiration-Warning"
KEY = f"{KEYS}/mySymKey"


def settings(tmp_path: Path, **changes: Any) -> Settings:
    return local_settings(tmp_path).model_copy(update=changes)


@contextmanager
def usage_api(tmp_path: Path, **changes: Any) -> Iterator[Api]:
    with live_api(settings(tmp_path, **changes)) as api:
        yield api


def stored_record(api: Api, kid: str = "mySymKey") -> KeyRecord:
    return api.records.get(RECORD_KIND, record_key(TENANT, kid), KeyRecord)


def test_each_message_sealed_or_opened_counts_once_per_version(tmp_path: Path) -> None:
    with usage_api(tmp_path) as api, api.client() as client:
        assert create_key(client)["usageCount"] == 0
        sealed = [encrypt(client, b"one").content, encrypt(client, b"two").content]
        client.post(f"{KEY}/rotate").raise_for_status()
        sealed.append(encrypt(client, b"three").content)
        for message in sealed:
            assert decrypt(client, message).status_code == 200
        stored = encrypt(client, b"kept", destination={"key": "kept.bin"})
        assert stored.status_code == 201
        assert read_object(client, "kept.bin").content == b"kept"
        assert read_object(client, "kept.bin", "bytes=0-1").content == b"ke"

        # Seen at once by the process that counted them, added or not.
        # Reading back what was stored (the verify job) is no use of the key.
        view = client.get(KEY).json()
        assert view["usageCount"] == 9
        one, two = view["versions"]
        assert (one["usageCount"], one["encryptCount"]) == (4, 2)
        assert (two["usageCount"], two["encryptCount"]) == (5, 2)
        assert one["lastUsedAt"] < two["lastUsedAt"] == view["lastUsedAt"]
        last = datetime.fromisoformat(view["lastUsedAt"])
        assert datetime.now(UTC) - last < timedelta(minutes=5)
    # The server stopped: everything it counted is in the sealed record.
    record = stored_record(api)
    assert record.usage_count == 9
    assert record.uses.of(2) == VersionUses(5, 2, last)


def test_the_soft_limit_warns_and_the_max_limit_stops_encryption_only(tmp_path: Path) -> None:
    with usage_api(tmp_path) as api, api.client() as client:
        create_key(client, softUsageLimit=2, maxUsageLimit=3)
        first = encrypt(client, b"a")
        assert SOFT not in first.headers
        second = encrypt(client, b"b", destination={"key": "b.bin"})
        assert second.status_code == 201
        assert second.headers[SOFT] == "usageCount=2; softUsageLimit=2; maxUsageLimit=3"
        opened = decrypt(client, first.content)  # the third use
        assert opened.content == b"a"
        assert opened.headers[SOFT] == "usageCount=3; softUsageLimit=2; maxUsageLimit=3"

        refused = problem(encrypt(client, b"c"), 403, "key-usage-exhausted")
        assert "maxUsageLimit" in refused["detail"]
        problem(encrypt(client, b"c", destination={"key": "c.bin"}), 403, "key-usage-exhausted")
        assert not list(api.objects.list("tenants/default/c.bin"))
        # Decryption goes on, and so does counting it.
        assert decrypt(client, first.content).headers[SOFT].startswith("usageCount=4;")
        assert read_object(client, "b.bin").headers[SOFT].startswith("usageCount=5;")

        # Raised by PATCH, the limit lets the key encrypt again.
        changed = client.patch(KEY, json={"maxUsageLimit": 10})
        assert changed.json()["maxUsageLimit"] == 10
        assert encrypt(client, b"d").status_code == 200


def test_a_batch_job_and_a_reencrypt_job_refuse_an_exhausted_key_before_starting(
    tmp_path: Path,
) -> None:
    with usage_api(tmp_path) as api, api.client() as client:
        create_key(client, maxUsageLimit=1)
        encrypt(client, b"a").raise_for_status()
        for path, body in [
            (
                "/api/jobs/batch-encrypt",
                {"kid": "mySymKey", "source": {"key": "x.tar"}, "destination": {"prefix": "o/"}},
            ),
            ("/api/jobs/reencrypt", {"kid": "mySymKey", "prefix": ""}),
        ]:
            problem(client.post(path, json=body), 403, "key-usage-exhausted")


def test_the_expiration_warning_comes_within_its_window(tmp_path: Path) -> None:
    with usage_api(tmp_path, key_expiration_warning=3600) as api, api.client() as client:
        soon = datetime.now(UTC) + timedelta(minutes=30)
        create_key(client, expiresAt=soon.isoformat())
        sealed = encrypt(client, b"a")
        assert sealed.headers[EXPIRY] == f"expiresAt={soon.isoformat().replace('+00:00', 'Z')}"
        assert EXPIRY in decrypt(client, sealed.content).headers
        assert EXPIRY in encrypt(client, b"b", destination={"key": "b.bin"}).headers

        later = datetime.now(UTC) + timedelta(days=30)
        assert client.patch(KEY, json={"expiresAt": later.isoformat()}).status_code == 200
        assert EXPIRY not in encrypt(client, b"c").headers
        assert client.patch(KEY, json={"expiresAt": None}).json()["expiresAt"] is None


def test_a_message_for_several_keys_warns_of_each_in_their_order(tmp_path: Path) -> None:
    """One value per key, in the order of X-Key-Used, `none` where the warning does not
    apply: a partner's key, which the service neither counts nor expires, always."""
    jwk, partner = partner_jwks()["rsa"]
    soon = datetime.now(UTC) + timedelta(minutes=30)
    with usage_api(tmp_path, key_expiration_warning=3600) as api, api.client() as client:
        create_key(client, kid="quiet")
        create_key(client, kid="worn", softUsageLimit=1)
        create_key(client, kid="expiring", expiresAt=soon.isoformat())
        kids = ["quiet", "worn", "expiring"]
        expires = soon.isoformat().replace("+00:00", "Z")
        for count, place in [(1, None), (2, {"key": "a"})]:
            sealed = encrypt(client, b"a", kid=kids, recipientPublicKey=jwk, destination=place)
            assert sealed.is_success, sealed.text
            used = sealed.headers["X-Key-Used"]
            assert used == f"quiet#1, worn#1, expiring#1, {partner.key_name}"
            assert sealed.headers[SOFT] == f"none, usageCount={count}; softUsageLimit=1, none, none"
            assert sealed.headers[EXPIRY] == f"none, none, expiresAt={expires}, none"
        alone = encrypt(client, b"b", kid=["quiet", "worn"])
        assert alone.headers[SOFT] == "none, usageCount=3; softUsageLimit=1"
        assert EXPIRY not in alone.headers
        assert SOFT not in encrypt(client, b"c", kid=["quiet", "expiring"]).headers


def test_an_expired_key_stops_encrypting_and_still_decrypts(tmp_path: Path) -> None:
    with usage_api(tmp_path, key_cache_ttl=0.1) as api, api.client() as client:
        create_key(client)
        sealed = encrypt(client, b"a").content
        # Expiry lies in the future when set: move the record's clock instead, as a
        # day passing would, by rewriting the sealed record the way the service does.
        saved = KeyRecordStore(api.records, lambda: datetime.now(UTC), lambda *_: None)
        past = datetime.now(UTC) - timedelta(seconds=1)
        saved.update(TENANT, "mySymKey", lambda r, _now: r.model_copy(update={"expires_at": past}))
        # The API's cached record lives 0.1 s.
        wait_until(lambda: encrypt(client, b"b").status_code == 409, "the expiry to be seen")
        problem(encrypt(client, b"b"), 409, "key-expired")
        opened = decrypt(client, sealed)
        assert opened.content == b"a"
        assert opened.headers[EXPIRY].startswith("expiresAt=")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"softUsageLimit": 5, "maxUsageLimit": 4}, "invalid-usage-limit"),
        ({"rotateOnUsageLimit": True}, "invalid-usage-limit"),
        ({"maxUsageLimit": 0}, "invalid-request"),
        ({"softUsageLimit": "many"}, "invalid-request"),
        ({"expiresAt": "2001-01-01T00:00:00Z"}, "invalid-expiry"),
        ({"rotateOnUsageLimit": None}, "invalid-request"),
        ({"usageCount": 0}, "invalid-request"),
    ],
)
def test_limits_that_cannot_be_are_refused_at_creation_and_by_patch(
    live_local_api: Api, fields: dict[str, Any], code: str
) -> None:
    with live_local_api.client() as client:
        created = client.post(KEYS, json={"kid": "bad", "kty": "oct", **fields})
        assert created.json()["code"] == code, created.text
        create_key(client, kid="k")
        changed = client.patch(f"{KEYS}/k", json=fields)
        assert changed.json()["code"] == code, changed.text


def test_patch_sets_and_clears_each_field(live_local_api: Api) -> None:
    with live_local_api.client() as client:
        create_key(client, kid="k", softUsageLimit=5)
        later = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
        steps: list[tuple[dict[str, Any], dict[str, Any]]] = [
            ({"maxUsageLimit": 9}, {"softUsageLimit": 5, "maxUsageLimit": 9}),
            ({"rotateOnUsageLimit": True}, {"rotateOnUsageLimit": True, "softUsageLimit": 5}),
            ({"softUsageLimit": 7}, {"softUsageLimit": 7, "maxUsageLimit": 9}),
            (
                {"expiresAt": later.isoformat()},
                {"expiresAt": later.isoformat().replace("+00:00", "Z")},
            ),
            ({"rotateOnUsageLimit": False, "softUsageLimit": None}, {"softUsageLimit": None}),
            (
                {"maxUsageLimit": None, "expiresAt": None},
                {"maxUsageLimit": None, "expiresAt": None},
            ),
            ({}, {"rotateOnUsageLimit": False}),
        ]
        for change, expected in steps:
            view = client.patch(f"{KEYS}/k", json=change).json()
            assert {name: view[name] for name in expected} == expected, change
        assert client.patch(f"{KEYS}/k", json={"exportable": True}).json()["code"] == (
            "exportability-is-one-way"
        )


@pytest.fixture
def live_local_api(tmp_path: Path) -> Iterator[Api]:
    with usage_api(tmp_path) as api:
        yield api


def test_a_key_rotates_when_its_primary_version_reaches_the_soft_limit(tmp_path: Path) -> None:
    # A batch of one: each use is added at once, and the key rotates as it is counted.
    with usage_api(tmp_path, usage_batch=1) as api, api.client() as client:
        create_key(client, softUsageLimit=2, rotateOnUsageLimit=True)
        first = encrypt(client, b"a")
        assert (first.headers["X-Key-Used"], SOFT in first.headers) == ("mySymKey#1", False)
        second = encrypt(client, b"b")
        assert second.headers["X-Key-Used"] == "mySymKey#1"
        assert second.headers[SOFT] == "usageCount=2; softUsageLimit=2; versionUsageCount=2"
        view = client.get(KEY).json()
        assert (view["primaryVersion"], view["usageCount"]) == (2, 2)
        # The count towards the soft limit starts again with the new version.
        third = encrypt(client, b"c")
        assert (third.headers["X-Key-Used"], SOFT in third.headers) == ("mySymKey#2", False)
        assert encrypt(client, b"d").headers[SOFT].endswith("versionUsageCount=2")
        assert client.get(KEY).json()["primaryVersion"] == 3
        # Decrypting under a version past its soft limit warns, and rotates nothing.
        assert decrypt(client, first.content).headers[SOFT].endswith("versionUsageCount=3")
        assert client.get(KEY).json()["primaryVersion"] == 3


def test_the_lifecycle_sweep_rotates_a_key_whose_record_reached_its_soft_limit(
    tmp_path: Path,
) -> None:
    with usage_api(tmp_path) as api, api.client() as client:
        create_key(client, softUsageLimit=3, rotateOnUsageLimit=True)
        saved = KeyRecordStore(api.records, lambda: datetime.now(UTC), lambda *_: None)
        counted = Uses({1: VersionUses(3, 3, datetime.now(UTC))})
        saved.update(TENANT, "mySymKey", lambda r, _now: r.counting(counted, Uses()), notify=False)
        assert run_sweeps(build_parts(api.settings), no_job_queued)["rotated"] == [
            f"{TENANT}/mySymKey"
        ]
        assert client.get(KEY).json()["primaryVersion"] == 2


def test_a_version_that_wrapped_its_share_of_random_ivs_must_rotate(tmp_path: Path) -> None:
    with usage_api(tmp_path, key_cache_ttl=0.1) as api, api.client() as client:
        create_key(client)
        create_key(client, kid="rsa", kty="RSA", alg="RSA-OAEP-256", keySize=2048)
        saved = KeyRecordStore(api.records, lambda: datetime.now(UTC), lambda *_: None)
        worn = Uses({1: VersionUses(WRAP_LIMIT, WRAP_LIMIT - 1, datetime.now(UTC))})
        for kid in ("mySymKey", "rsa"):
            saved.update(TENANT, kid, lambda r, _now: r.counting(worn, Uses()), notify=False)
        # One more wrap is allowed; the next is refused, however the request comes.
        assert encrypt(client, b"last").status_code == 200
        refused = problem(encrypt(client, b"x"), 409, "key-version-worn-out")
        assert "rotate the key" in refused["detail"]
        problem(encrypt(client, b"x", destination={"key": "x.bin"}), 409, "key-version-worn-out")
        # RSA-OAEP wraps without an IV of its own: no such bound.
        assert encrypt(client, b"x", kid="rsa").status_code == 200
        client.post(f"{KEY}/rotate").raise_for_status()
        assert encrypt(client, b"y").headers["X-Key-Used"] == "mySymKey#2"


def test_a_bucket_writer_cannot_lower_a_count_and_an_older_copy_is_noticed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with usage_api(tmp_path, usage_batch=1) as api, api.client() as client:
        create_key(client, maxUsageLimit=3)
        name = record_key(TENANT, "mySymKey")
        unused = api.objects.get(name)
        sealed = [encrypt(client, b"a").content for _ in range(3)]
        exhausted = api.objects.get(name)

        # Edited in place, the record fails its MAC and is refused.
        document = json.loads(exhausted)
        document["record"]["usageCount"] = 0
        for version in document["record"]["versions"]:
            version["usageCount"] = version["encryptCount"] = 0
        api.objects.put(name, json.dumps(document).encode())
        problem(client.get(KEY), 502, "record-tampered")

        # An older authentic copy passes its MAC; the process that counted keeps its
        # higher figures, and writes them back with its next addition.
        api.objects.put(name, unused)
        problem(encrypt(client, b"b"), 403, "key-usage-exhausted")
        assert client.get(KEY).json()["usageCount"] == 3
        assert decrypt(client, sealed[0]).status_code == 200
    assert "counts fewer uses than this process saw" in caplog.text
    assert stored_record(api).usage_count == 4


# Several processes on one store


def encrypt_many(api: Api, count: int) -> list[int]:
    """`count` encryptions through `api` from four threads; their statuses."""
    with api.client() as client, ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: encrypt(client, b"x").status_code, range(count)))


@contextmanager
def two_apis(tmp_path: Path, **changes: Any) -> Iterator[tuple[Api, Api]]:
    """Two API servers, each with its own key store and usage meter, on one store."""
    with ExitStack() as stack:
        first = stack.enter_context(usage_api(tmp_path, **changes))
        second = stack.enter_context(live_api(first.settings))
        yield first, second


@pytest.mark.parametrize("shared", ["records", "redis"])
def test_two_processes_lose_no_count_and_stop_within_the_bound(
    tmp_path: Path, shared: str, request: pytest.FixtureRequest
) -> None:
    batch = 4
    changes: dict[str, Any] = {"usage_batch": batch}
    if shared == "redis":
        changes["redis_url"] = request.getfixturevalue("redis_server").url
    with two_apis(tmp_path, **changes) as (first, second):
        with first.client() as client:
            create_key(client)
            create_key(client, kid="limited", maxUsageLimit=10)
        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(encrypt_many, (first, second), (30, 30)))
        assert statuses == [[200] * 30] * 2

        # Taking turns, the two pass maxUsageLimit by at most 2 × the batch.
        passed = 0
        for _ in range(20):
            for api in (first, second):
                with api.client() as client:
                    passed += encrypt(client, b"x", kid="limited").status_code == 200
        assert 10 <= passed <= 10 + 2 * batch
    # Stopped, each process added what it had counted: no count is lost.
    keys = build_parts(first.settings).keys
    assert keys.get(TENANT, "mySymKey").usage_count == 60
    assert keys.get(TENANT, "limited").usage_count == passed


# The local KEK's own random IVs


def test_the_local_kek_counts_its_wraps_and_wraps_no_more_at_the_limit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    kek = LocalKek(os.urandom(32))
    records = open_records(store, kek)
    keys = KeyStore(records, kek)

    def wraps() -> int:
        return records.get(WRAPS_KIND, WRAPS_NAME, KekWrapCount).wraps

    keys.create(TENANT, KeySpec(kid="a", kty="oct"))
    keys.rotate(TENANT, "a")
    keys.create(TENANT, KeySpec(kid="b", kty="oct"))
    assert wraps() == 3
    # Deleted, the count starts again from the versions the key records hold.
    store.delete(WRAPS_NAME)
    keys.create(TENANT, KeySpec(kid="c", kty="oct"))
    assert wraps() == 4
    # Edited, it is refused.
    document = json.loads(store.get(WRAPS_NAME))
    document["record"]["wraps"] = 0
    store.put(WRAPS_NAME, json.dumps(document).encode())
    with pytest.raises(RecordTampered):
        keys.create(TENANT, KeySpec(kid="d", kty="oct"))

    records.put(WRAPS_KIND, WRAPS_NAME, KekWrapCount(wraps=WRAP_LIMIT))
    with pytest.raises(KekWornOut):
        keys.create(TENANT, KeySpec(kid="d", kty="oct"))
    with pytest.raises(KekWornOut):
        keys.rotate(TENANT, "a")
    # Keys already made go on working.
    assert keys.sealing_keyring(TENANT, "a")[0].primary_version == 2
    keys.close()


def test_a_killed_process_loses_at_most_the_batch_it_had_not_added(tmp_path: Path) -> None:
    store = tmp_path / "storage"
    env = {
        "SEALSTREAM_STORAGE_URL": f"file://{store}",
        "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
        "SEALSTREAM_USAGE_BATCH": "4",
        "SEALSTREAM_USAGE_FLUSH_INTERVAL": "60",  # no addition but the batch's own
    }
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with (
        sealstream_serve(tmp_path, env) as served,
        httpx.Client(base_url=served.url, headers=headers, timeout=60) as client,
    ):
        create_key(client)
        for _ in range(10):
            encrypt(client, b"x").raise_for_status()
        served.process.kill()
        served.process.wait()
    keys = build_parts(local_settings(tmp_path)).keys
    # Added at the 4th and the 8th use; the last 2 died with the process.
    assert keys.get(TENANT, "mySymKey").usage_count == 8


def test_what_someone_writes_into_redis_cannot_lower_a_count_or_break_it(
    tmp_path: Path, redis_server: "RedisServer"
) -> None:
    with (
        usage_api(tmp_path, usage_batch=1, redis_url=redis_server.url) as api,
        api.client() as client,
    ):
        create_key(client, maxUsageLimit=5)
        for _ in range(3):
            encrypt(client, b"x").raise_for_status()
        database = redis.Redis.from_url(redis_server.url, decode_responses=True)
        [name] = database.keys("sealstream:usage:*")
        database.hset(name, mapping={"1:uses": "junk", "1:encrypts": "-7", "1:last": "9" * 30})
        assert client.get(KEY).json()["usageCount"] == 3
        encrypt(client, b"x").raise_for_status()
        assert database.hget(name, "1:uses") == "4"
        database.delete(name)  # the record's checkpoint and this process's count stand
        encrypt(client, b"x").raise_for_status()
        problem(encrypt(client, b"x"), 403, "key-usage-exhausted")


def _redis_processes(
    tmp_path: Path, url: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> tuple[Records, Callable[[], KeyStore]]:
    """The records of a store, and key stores on it as separate processes would have
    them, sharing one Redis; they believe at most 1 use a second of a key."""
    kek = LocalKek(os.urandom(32))
    records = open_records(LocalStore(tmp_path / "bucket"), kek)
    client = redis.Redis.from_url(url, decode_responses=True)
    return records, lambda: KeyStore(
        records, kek, clock=clock, usage_redis=client, usage_batch=1, usage_max_rate=1.0
    )


class _Clock:
    """A wall clock that moves only when told."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_a_count_written_into_redis_is_believed_at_most_at_the_rate_whatever_the_processes(
    tmp_path: Path, redis_server: "RedisServer"
) -> None:
    """The bound is on the time since the sealed checkpoint, one for all processes: each
    process checkpointing in turn believes no more of a forged count than one would."""
    clock = _Clock()
    records, process = _redis_processes(tmp_path, redis_server.url, clock)
    first = process()
    first.create(TENANT, KeySpec(kid="k", kty="oct", max_usage_limit=50))
    first.sealing_keyring(TENANT, "k")
    database = redis.Redis.from_url(redis_server.url, decode_responses=True)
    [name] = database.keys("sealstream:usage:*")

    def sealed() -> int:
        return records.get(RECORD_KIND, record_key(TENANT, "k"), KeyRecord).usage_count

    clock.now += timedelta(seconds=200)  # a checkpoint long after the key was made
    keys = process()
    keys.sealing_keyring(TENANT, "k")
    keys.close()
    assert sealed() == 2
    for _ in range(4):  # processes that each checkpoint once, a second apart
        clock.now += timedelta(seconds=1)
        database.hincrby(name, "1:uses", 30)
        database.hincrby(name, "1:encrypts", 30)
        keys = process()
        keys.sealing_keyring(TENANT, "k")  # its first use: a checkpoint
        keys.close()
    # 4 uses of their own, and at 1 use a second at most 4 + 1 more from Redis.
    assert sealed() <= 2 + 4 + 5
    # Given the time, the same count is the processes' own: it is believed.
    clock.now += timedelta(seconds=200)
    database.hincrby(name, "1:uses", 30)
    database.hincrby(name, "1:encrypts", 30)
    last = process()
    last.sealing_keyring(TENANT, "k")
    assert sealed() >= 30
    for keys in (first, last):
        keys.close()


def test_a_version_rotates_on_its_usage_limit_at_most_once_a_checkpoint_interval(
    tmp_path: Path, redis_server: "RedisServer"
) -> None:
    """With a shared count, what makes a version worn out is checked at checkpoints:
    counts written into Redis cannot rotate a key faster than those."""
    clock = _Clock()
    _, process = _redis_processes(tmp_path, redis_server.url, clock)
    keys = process()
    keys.create(TENANT, KeySpec(kid="k", kty="oct", soft_usage_limit=1, rotate_on_usage_limit=True))
    for _ in range(3):
        keys.sealing_keyring(TENANT, "k")
    assert keys.get(TENANT, "k").primary_version == 1
    clock.now += timedelta(seconds=61)
    for _ in range(3):
        keys.sealing_keyring(TENANT, "k")
    assert keys.get(TENANT, "k").primary_version == 2
    keys.close()


def _refused_counts() -> float:
    [family] = IMPLAUSIBLE_COUNTS.collect()
    return next(sample.value for sample in family.samples if sample.name.endswith("_total"))


def test_a_count_written_into_redis_past_what_the_processes_could_count_is_not_believed(
    tmp_path: Path, redis_server: "RedisServer"
) -> None:
    records, process = _redis_processes(tmp_path, redis_server.url)
    first = process()
    first.create(TENANT, KeySpec(kid="k", kty="oct"))
    for _ in range(3):
        first.sealing_keyring(TENANT, "k")
    database = redis.Redis.from_url(redis_server.url, decode_responses=True)
    [name] = database.keys("sealstream:usage:*")

    def write_bogus() -> None:
        database.hset(name, mapping={"1:uses": 10**6, "1:encrypts": 10**6, "7:uses": 10**6})

    refused = _refused_counts()

    # The process counting the key notices at its next addition, short of any limit.
    write_bogus()
    first.sealing_keyring(TENANT, "k")
    assert _refused_counts() == refused + 1
    assert first.get(TENANT, "k").usage_count == 4
    assert database.hgetall(name).keys() == {"1:uses", "1:encrypts", "1:last"}
    assert database.hget(name, "1:uses") == "4"

    # A process reading the key afresh goes by the sealed record, and never seals the
    # bogus count into it, even once it reaches a limit.
    write_bogus()
    second = process()
    assert second.get(TENANT, "k").usage_count <= 5
    first.change(TENANT, "k", KeyChange(max_usage_limit=100))
    second.sealing_keyring(TENANT, "k")
    assert _refused_counts() >= refused + 3
    assert second.get(TENANT, "k").usage_count <= 6
    for keys in (first, second):
        keys.close()
    # The uses the bogus count overwrote before a checkpoint are lost, as if Redis had
    # lost its data; none is made up.
    assert 1 <= process().get(TENANT, "k").usage_count <= 5
    assert records.get(RECORD_KIND, record_key(TENANT, "k"), KeyRecord).usage_count <= 5


def test_a_count_lowered_in_redis_gains_no_encryption_past_the_sealed_record(
    tmp_path: Path, redis_server: "RedisServer"
) -> None:
    _, process = _redis_processes(tmp_path, redis_server.url)
    first = process()
    first.create(TENANT, KeySpec(kid="k", kty="oct", max_usage_limit=3))
    for _ in range(3):
        first.sealing_keyring(TENANT, "k")
    database = redis.Redis.from_url(redis_server.url, decode_responses=True)
    [name] = database.keys("sealstream:usage:*")
    database.hset(name, mapping={"1:uses": "0", "1:encrypts": "0"})
    for keys in (first, process()):
        with pytest.raises(KeyUsageExhausted):
            keys.sealing_keyring(TENANT, "k")


class _CountedAdditions(RecordLedger):
    """The sealed records' ledger, noting how many uses each addition brings, each as
    slow as a few requests to a remote store: uses pile up behind it."""

    def __init__(self, saved: KeyRecordStore) -> None:
        super().__init__(saved)
        self.additions: list[int] = []

    def add(self, record: KeyRecord, floor: Uses, added: Uses) -> Uses:
        self.additions.append(added.total)
        time.sleep(0.02)
        return super().add(record, floor, added)


def test_uses_from_many_threads_are_added_a_full_batch_at_a_time(tmp_path: Path) -> None:
    """Uses that wait for a full batch to be added go on once it is: they do not each
    add the few uses counted meanwhile, a write of the key's record for a few uses."""
    store = LocalStore(tmp_path / "bucket")
    kek = LocalKek(os.urandom(32))
    records = open_records(store, kek)
    record = KeyStore(records, kek).create(TENANT, KeySpec(kid="a", kty="oct"))
    saved = KeyRecordStore(records, lambda: datetime.now(UTC), lambda *_: None)
    ledger = _CountedAdditions(saved)
    batch, threads, each = 16, 8, 64
    meter = UsageMeter(
        ledger,
        saved.read,
        lambda *_: None,
        lambda: datetime.now(UTC),
        batch=batch,
        flush_interval=3600,
    )

    def seal_many(_: int) -> None:
        for _ in range(each):
            meter.use(record, 1, "encrypt")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(seal_many, range(threads)))
    meter.close()
    assert ledger.additions == [batch] * (threads * each // batch)
    assert saved.read(TENANT, "a").usage_count == threads * each
