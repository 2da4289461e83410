"""KeyStore on real storage (a local directory and S3 on a moto server): creation, use,
rotation, life cycle, scheduled work, import and export, races, tenant isolation, the
cache, usage counting, and that no material reaches stored bytes, reprs or errors."""

import base64
import functools
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from envelope import DataKeyUnavailable, Keyring
from keystore import (
    ImportSpec,
    KekError,
    KekMismatch,
    KeyChange,
    KeyExists,
    KeyRecord,
    KeySpec,
    KeyStore,
    KeystoreError,
    KeyVersionRetired,
    LocalKek,
    PrimaryVersion,
    record_key,
)
from keystore.algorithms import b64url, jwk_bytes, key_type, resolve
from keystore.errors import InvalidPendingWindow
from sealstream.wiring import open_records
from storage import ObjectStore
from storage.integrity import Records, RecordTampered
from tests.support.envelope import decrypt_all, encrypt_all

TENANT = "acme"
PLAINTEXT = b"attack at dawn " * 1000


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kek() -> LocalKek:
    return LocalKek(os.urandom(32))


@pytest.fixture
def records(store: ObjectStore, kek: LocalKek) -> Records:
    return open_records(store, kek)


@pytest.fixture
def keys(records: Records, kek: LocalKek, clock: Clock) -> KeyStore:
    return KeyStore(records, kek, clock=clock)


def spec(kid: str = "k1", kty: str = "oct", **fields: Any) -> KeySpec:
    """A generate request as the API receives it (camelCase JSON names)."""
    return KeySpec.model_validate({"kid": kid, "kty": kty, **fields})


def round_trip(keys: KeyStore, kid: str, tenant: str = TENANT) -> bytes:
    """A message encrypted under the key's primary version, decrypted with all its versions."""
    _, keyring = keys.encryption_keyring(tenant, kid)
    message = encrypt_all([keyring], PLAINTEXT)
    return decrypt_with(keys, kid, message, tenant)


def decrypt_with(keys: KeyStore, kid: str, message: bytes, tenant: str = TENANT) -> bytes:
    _, keyrings = keys.decryption_keyrings(tenant, kid)
    return decrypt_all(keyrings, message)


def code_of(action: Callable[[], object]) -> str:
    with pytest.raises((KeystoreError, RecordTampered)) as caught:
        action()
    return str(getattr(caught.value, "code", ""))


# Creating and using keys


def test_the_documented_request_body_creates_a_usable_key(keys: KeyStore) -> None:
    body = {
        "kid": "mySymKey",
        "kty": "oct",
        "alg": "AES-256",
        "keyOps": ["encrypt", "decrypt"],
        "exportable": False,
    }
    record = keys.create(TENANT, KeySpec.model_validate(body))
    assert (record.kid, record.kty, record.alg, record.status) == (
        "mySymKey",
        "oct",
        "AES-256",
        "enabled",
    )
    assert (record.primary_version, record.origin, record.exportable) == (1, "generated", False)
    assert keys.get(TENANT, "mySymKey") == record
    _, keyring = keys.encryption_keyring(TENANT, "mySymKey")
    assert keyring.key_name == "mySymKey#1"
    assert round_trip(keys, "mySymKey") == PLAINTEXT


@pytest.mark.parametrize(
    ("fields", "kty", "alg"),
    [
        ({"kty": "oct"}, "oct", "AES-256"),
        ({"kty": "RSA", "keySize": 2048}, "RSA", "RSA-OAEP-256"),
        ({"kty": "AKP", "alg": "ML-KEM-1024"}, "ML-KEM", "ML-KEM-1024"),
        ({"kty": "ML-KEM"}, "ML-KEM", "ML-KEM-768"),
    ],
)
def test_every_key_type_encrypts_and_decrypts_through_the_store(
    keys: KeyStore, fields: dict[str, Any], kty: str, alg: str
) -> None:
    record = keys.create(TENANT, KeySpec.model_validate({"kid": "k", **fields}))
    assert (record.kty, record.alg) == (kty, alg)
    assert (record.primary.public_jwk is None) == (kty == "oct")
    assert round_trip(keys, "k") == PLAINTEXT


def test_the_stored_record_has_the_documented_json_fields(
    keys: KeyStore, store: ObjectStore
) -> None:
    keys.create(TENANT, spec("r", "RSA", keySize=2048, rotationPeriod="P30D"))
    stored = json.loads(store.get(record_key(TENANT, "r")))["record"]
    assert set(stored) == {
        "kid",
        "tenant",
        "kty",
        "alg",
        "keySize",
        "keyOps",
        "exportable",
        "everExportable",
        "status",
        "primaryVersion",
        "versions",
        "createdAt",
        "updatedAt",
        "deletionDate",
        "expiresAt",
        "rotationPeriod",
        "usageCount",
        "lastUsedAt",
        "softUsageLimit",
        "maxUsageLimit",
        "rotateOnUsageLimit",
        "origin",
    }
    assert (stored["keySize"], stored["rotationPeriod"], stored["usageCount"]) == (2048, "P30D", 0)
    assert (stored["exportable"], stored["everExportable"]) == (False, False)
    assert (stored["deletionDate"], stored["expiresAt"], stored["lastUsedAt"]) == (None,) * 3
    assert stored["createdAt"] == "2030-01-01T00:00:00Z"
    [version] = stored["versions"]
    assert set(version) == {
        "version",
        "createdAt",
        "usageCount",
        "encryptCount",
        "lastUsedAt",
        "retiredAt",
        "destructionDate",
        "destroyedAt",
        "wrappedMaterial",
        "publicJwk",
    }
    assert version["publicJwk"]["kid"] == "r#1"
    base64.b64decode(version["wrappedMaterial"], validate=True)


def test_the_public_view_shows_the_primary_public_key_and_no_wrapped_material(
    keys: KeyStore,
) -> None:
    keys.create(TENANT, spec("m", "ML-KEM"))
    view = keys.rotate(TENANT, "m").public_view()
    dumped = view.model_dump(mode="json")
    assert "wrappedMaterial" not in json.dumps(dumped)
    assert dumped["publicJwk"]["kid"] == "m#2"
    unused = {"usageCount": 0, "encryptCount": 0, "lastUsedAt": None}
    live = {"retiredAt": None, "destructionDate": None, "destroyedAt": None}
    assert dumped["versions"] == [
        {"version": 1, "createdAt": "2030-01-01T00:00:00Z", **unused, **live},
        {"version": 2, "createdAt": "2030-01-01T00:00:00Z", **unused, **live},
    ]
    assert (dumped["kid"], dumped["status"], dumped["primaryVersion"]) == ("m", "enabled", 2)


# Versions and rotation


def test_a_retired_version_opens_nothing_and_its_material_goes_after_its_window(
    keys: KeyStore, clock: Clock
) -> None:
    keys.create(TENANT, spec("k", exportable=True))
    _, first = keys.encryption_keyring(TENANT, "k")
    old_message = encrypt_all([first], PLAINTEXT)
    keys.rotate(TENANT, "k")
    with pytest.raises(PrimaryVersion):
        keys.retire_version(TENANT, "k", 2)
    with pytest.raises(InvalidPendingWindow):
        keys.retire_version(TENANT, "k", 1, pending_days=0)

    retired = keys.retire_version(TENANT, "k", 1, pending_days=2)
    assert keys.retire_version(TENANT, "k", 1, pending_days=9) == retired  # the first stands

    with pytest.raises(KeyVersionRetired):
        keys.opening_keyrings(TENANT, ["k#1"])
    _, live = keys.decryption_keyrings(TENANT, "k")
    assert [keyring.key_name for keyring in live] == ["k#2"]
    with pytest.raises(KeyVersionRetired):
        keys.export_jwk(TENANT, "k", 1)
    assert keys.versions_to_destroy() == []
    assert not keys.destroy_version(TENANT, "k", 1)  # not yet: a no-op
    assert keys.get(TENANT, "k") == retired

    clock.advance(days=2)
    assert keys.versions_to_destroy() == [(TENANT, "k", 1)]
    assert keys.destroy_version(TENANT, "k", 1)
    assert not keys.destroy_version(TENANT, "k", 1)  # once
    destroyed = keys.get(TENANT, "k").version(1)
    assert destroyed.wrapped_material == b"" and destroyed.destroyed_at == clock()
    assert keys.versions_to_destroy() == []
    with pytest.raises(DataKeyUnavailable):  # no keyring of a retired version is handed out
        decrypt_with(keys, "k", old_message)
    assert round_trip(keys, "k") == PLAINTEXT  # the primary serves on


@pytest.mark.parametrize("kty", ["oct", "ML-KEM"])
def test_rotation_adds_a_primary_version_and_old_data_stays_readable(
    keys: KeyStore, kty: str
) -> None:
    keys.create(TENANT, spec("k", kty))
    _, first = keys.encryption_keyring(TENANT, "k")
    old_message = encrypt_all([first], PLAINTEXT)
    rotated = keys.rotate(TENANT, "k")
    assert (rotated.primary_version, [v.version for v in rotated.versions]) == (2, [1, 2])
    _, second = keys.encryption_keyring(TENANT, "k")
    assert second.key_name == "k#2"
    new_message = encrypt_all([second], PLAINTEXT)
    assert decrypt_with(keys, "k", old_message) == PLAINTEXT
    assert decrypt_with(keys, "k", new_message) == PLAINTEXT
    with pytest.raises(Exception, match="data key"):
        decrypt_all([first], new_message)


# Life cycle


def test_a_disabled_key_refuses_use_and_rotation_until_enabled(keys: KeyStore) -> None:
    keys.create(TENANT, spec())
    assert keys.disable(TENANT, "k1").status == "disabled"
    assert code_of(lambda: keys.encryption_keyring(TENANT, "k1")) == "key-disabled"
    assert code_of(lambda: keys.decryption_keyrings(TENANT, "k1")) == "key-disabled"
    assert code_of(lambda: keys.rotate(TENANT, "k1")) == "key-disabled"
    assert keys.disable(TENANT, "k1").status == "disabled"  # idempotent
    assert keys.enable(TENANT, "k1").status == "enabled"
    assert round_trip(keys, "k1") == PLAINTEXT


def test_a_key_pending_deletion_refuses_everything_but_cancellation(
    keys: KeyStore, clock: Clock
) -> None:
    keys.create(TENANT, spec(exportable=True))
    record = keys.schedule_deletion(TENANT, "k1", pending_days=10)
    assert record.status == "pending-deletion"
    assert record.deletion_date == clock.now + timedelta(days=10)
    refused: list[Callable[[], object]] = [
        lambda: keys.encryption_keyring(TENANT, "k1"),
        lambda: keys.decryption_keyrings(TENANT, "k1"),
        lambda: keys.enable(TENANT, "k1"),
        lambda: keys.disable(TENANT, "k1"),
        lambda: keys.rotate(TENANT, "k1"),
        lambda: keys.export_jwk(TENANT, "k1"),
    ]
    assert {code_of(action) for action in refused} == {"key-pending-deletion"}
    assert keys.get(TENANT, "k1").status == "pending-deletion"
    cancelled = keys.cancel_deletion(TENANT, "k1")
    assert (cancelled.status, cancelled.deletion_date) == ("disabled", None)
    keys.enable(TENANT, "k1")
    assert round_trip(keys, "k1") == PLAINTEXT


def test_scheduling_deletion_again_keeps_the_first_date(keys: KeyStore, clock: Clock) -> None:
    keys.create(TENANT, spec())
    first = keys.schedule_deletion(TENANT, "k1", pending_days=7)
    clock.advance(days=1)
    assert keys.schedule_deletion(TENANT, "k1", pending_days=30) == first


def test_cancelling_needs_a_pending_key_before_its_deletion_date(
    keys: KeyStore, clock: Clock
) -> None:
    keys.create(TENANT, spec())
    assert code_of(lambda: keys.cancel_deletion(TENANT, "k1")) == "invalid-key-state"
    keys.schedule_deletion(TENANT, "k1", pending_days=1)
    clock.advance(days=1)
    assert code_of(lambda: keys.cancel_deletion(TENANT, "k1")) == "key-pending-deletion"


@pytest.mark.parametrize("days", [0, 31, -1])
def test_the_pending_window_is_one_to_thirty_days(keys: KeyStore, days: int) -> None:
    keys.create(TENANT, spec())
    assert code_of(lambda: keys.schedule_deletion(TENANT, "k1", days)) == "invalid-pending-window"
    keys.schedule_deletion(TENANT, "k1", 30)


# Scheduled work


def test_rotate_due_rotates_each_key_once_per_period(keys: KeyStore, clock: Clock) -> None:
    keys.create(TENANT, spec("monthly", rotationPeriod="P30D"))
    keys.create(TENANT, spec("hourly", rotationPeriod=3600))
    keys.create(TENANT, spec("paused", rotationPeriod="P1D"))
    keys.create(TENANT, spec("never"))
    keys.disable(TENANT, "paused")
    assert keys.rotate_due() == []
    clock.advance(hours=2)
    assert keys.rotate_due() == [(TENANT, "hourly")]
    assert keys.rotate_due() == []
    clock.advance(days=31)
    assert sorted(keys.rotate_due()) == [(TENANT, "hourly"), (TENANT, "monthly")]
    assert keys.rotate_due() == []
    assert keys.get(TENANT, "monthly").primary_version == 2
    assert keys.get(TENANT, "hourly").primary_version == 3
    assert keys.get(TENANT, "paused").primary_version == 1


def test_sweeps_skip_a_corrupt_record(
    keys: KeyStore, store: ObjectStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store.put(record_key(TENANT, "junk"), b"{not json")
    keys.create(TENANT, spec("k", rotationPeriod="PT1H"))
    clock.advance(hours=1)
    assert keys.rotate_due() == [(TENANT, "k")]
    assert keys.destroy_due() == []
    assert "skipping key 'junk'" in caplog.text
    assert code_of(lambda: keys.get(TENANT, "junk")) == "record-tampered"


def test_destroy_due_deletes_records_past_their_date_once(
    keys: KeyStore, store: ObjectStore, clock: Clock
) -> None:
    keys.create(TENANT, spec("doomed"))
    keys.create("globex", spec("later"))
    keys.create(TENANT, spec("kept"))
    keys.schedule_deletion(TENANT, "doomed", pending_days=7)
    keys.schedule_deletion("globex", "later", pending_days=9)
    clock.advance(days=6)
    assert keys.destroy_due() == []
    clock.advance(days=1)
    assert keys.destroy_due() == [(TENANT, "doomed")]
    assert keys.destroy_due() == []
    assert code_of(lambda: keys.get(TENANT, "doomed")) == "key-not-found"
    assert [info.key for info in store.list(record_key(TENANT, "doomed"))] == []
    clock.advance(days=2)
    assert keys.destroy_due() == [("globex", "later")]
    assert keys.get(TENANT, "kept").status == "enabled"


# Import and export


def _jwk_for(kty: str, alg: str | None = None, key_size: int | None = None) -> dict[str, str]:
    params = resolve(kty, alg, key_size)
    return key_type(params.kty).export_jwk("outside", params, key_type(params.kty).generate(params))


@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param(lambda: _jwk_for("oct"), id="oct"),
        pytest.param(lambda: _jwk_for("RSA", key_size=2048), id="RSA"),
        pytest.param(lambda: _jwk_for("ML-KEM", "ML-KEM-1024"), id="ML-KEM"),
    ],
)
def test_imported_keys_work_and_export_unchanged(
    keys: KeyStore, jwk: Callable[[], dict[str, str]]
) -> None:
    original = jwk()
    record = keys.import_jwk(
        TENANT,
        ImportSpec.model_validate({"kid": "byok", "exportable": True, "jwk": original}),
    )
    assert (record.origin, record.alg) == (
        "imported",
        key_type(record.kty).our_alg(original["alg"]),
    )
    assert round_trip(keys, "byok") == PLAINTEXT
    exported = keys.export_jwk(TENANT, "byok")
    assert exported == original | {"kid": "byok#1"}


def test_import_refuses_bad_jwks_and_stores_nothing(keys: KeyStore, store: ObjectStore) -> None:
    good = _jwk_for("oct")
    for jwk in [good | {"k": good["k"][:-2]}, {"kty": "oct"}, {"kty": "RSA", "n": "AQAB"}]:
        with pytest.raises(KeystoreError) as caught:
            keys.import_jwk(TENANT, ImportSpec(kid="bad", jwk=jwk))
        assert caught.value.code == "invalid-jwk"
    assert list(store.list("sealstream/keys/")) == []


def test_export_needs_an_exportable_key_and_exportability_is_one_way(keys: KeyStore) -> None:
    keys.create(TENANT, spec("locked"))
    assert code_of(lambda: keys.export_jwk(TENANT, "locked")) == "key-not-exportable"
    assert code_of(lambda: keys.change(TENANT, "locked", KeyChange(exportable=True))) == (
        "exportability-is-one-way"
    )
    keys.create(TENANT, spec("open", exportable=True))
    assert set(keys.export_jwk(TENANT, "open")) == {"kty", "kid", "alg", "k"}
    assert keys.change(TENANT, "open", KeyChange(exportable=True)).exportable
    assert not keys.change(TENANT, "open", KeyChange(exportable=False)).exportable
    assert code_of(lambda: keys.export_jwk(TENANT, "open")) == "key-not-exportable"
    assert code_of(lambda: keys.change(TENANT, "open", KeyChange(exportable=True))) == (
        "exportability-is-one-way"
    )


def test_export_picks_a_version(keys: KeyStore) -> None:
    keys.create(TENANT, spec(exportable=True))
    keys.rotate(TENANT, "k1")
    first, second = keys.export_jwk(TENANT, "k1", 1), keys.export_jwk(TENANT, "k1")
    assert (first["kid"], second["kid"]) == ("k1#1", "k1#2")
    assert first["k"] != second["k"]
    assert code_of(lambda: keys.export_jwk(TENANT, "k1", 3)) == "key-not-found"


# Invalid requests


INVALID_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"kty": "DSA"}, "unsupported-key-type"),
    ({"kty": "EC", "alg": "ES512"}, "unsupported-algorithm"),
    ({"kty": "EC", "alg": "PS256"}, "algorithm-mismatch"),
    ({"kty": "RSA", "alg": "ES256"}, "algorithm-mismatch"),
    ({"kty": "AKP", "alg": "Ed25519"}, "algorithm-mismatch"),
    ({"kty": "EC", "keyOps": ["encrypt"]}, "invalid-key-ops"),
    ({"kty": "RSA", "alg": "PS256", "keyOps": ["decrypt"]}, "invalid-key-ops"),
    ({"kty": "RSA", "keyOps": ["encrypt", "sign"]}, "mixed-key-ops"),
    ({"kty": "AKP", "alg": "ML-DSA-65", "keyOps": ["verify", "decrypt"]}, "mixed-key-ops"),
    ({"kty": "oct", "alg": "AES-128"}, "unsupported-algorithm"),
    ({"kty": "oct", "alg": "RSA-OAEP-256"}, "algorithm-mismatch"),
    ({"kty": "AKP", "alg": "AES-256"}, "algorithm-mismatch"),
    ({"kty": "RSA", "keySize": 1024}, "invalid-key-size"),
    ({"kty": "oct", "keySize": 256}, "invalid-key-size"),
    ({"kty": "oct", "keyOps": []}, "invalid-key-ops"),
    ({"kty": "oct", "keyOps": ["sign"]}, "invalid-key-ops"),
    ({"kty": "oct", "keyOps": ["encrypt", "encrypt"]}, "invalid-key-ops"),
    ({"kty": "oct", "kid": ""}, "invalid-kid"),
    ({"kty": "oct", "kid": "a/b"}, "invalid-kid"),
    ({"kty": "oct", "kid": ".."}, "invalid-kid"),
    ({"kty": "oct", "kid": ".tmp-x"}, "invalid-kid"),
    ({"kty": "oct", "kid": "a b"}, "invalid-kid"),
    ({"kty": "oct", "kid": "k" * 129}, "invalid-kid"),
    ({"kty": "oct", "kid": "k#1"}, "invalid-kid"),
    ({"kty": "oct", "rotationPeriod": "PT1M"}, "invalid-rotation-period"),
    ({"kty": "oct", "expiresAt": "2029-12-31T00:00:00Z"}, "invalid-expiry"),
]


@pytest.mark.parametrize(("fields", "code"), INVALID_SPECS)
def test_every_invalid_spec_raises_its_code_and_stores_nothing(
    keys: KeyStore, store: ObjectStore, fields: dict[str, Any], code: str
) -> None:
    request = KeySpec.model_validate({"kid": "k1", **fields})
    assert code_of(lambda: keys.create(TENANT, request)) == code
    assert list(store.list("sealstream/keys/")) == []


def test_a_kid_of_128_characters_is_fine(keys: KeyStore) -> None:
    assert keys.create(TENANT, spec("K-9._" + "k" * 123)).kid.startswith("K-9._")


def test_unknown_fields_in_a_spec_are_refused() -> None:
    with pytest.raises(ValidationError):
        KeySpec.model_validate({"kid": "k", "kty": "oct", "extractable": True})


@pytest.mark.parametrize("tenant", ["", "a/b", "..", "x" * 129])
def test_a_bad_tenant_is_refused(keys: KeyStore, tenant: str) -> None:
    assert code_of(lambda: keys.create(tenant, spec())) == "invalid-tenant"
    assert code_of(lambda: keys.get(tenant, "k1")) == "invalid-tenant"


def test_operations_outside_key_ops_are_refused(keys: KeyStore) -> None:
    keys.create(TENANT, spec("sealer", keyOps=["encrypt"]))
    keys.create(TENANT, spec("opener", keyOps=["decrypt"]))
    assert code_of(lambda: keys.decryption_keyrings(TENANT, "sealer")) == (
        "operation-not-permitted"
    )
    assert code_of(lambda: keys.encryption_keyring(TENANT, "opener")) == ("operation-not-permitted")
    keys.encryption_keyring(TENANT, "sealer")
    keys.decryption_keyrings(TENANT, "opener")


def test_an_expired_key_stops_encrypting_but_still_decrypts(keys: KeyStore, clock: Clock) -> None:
    keys.create(TENANT, spec(expiresAt=(clock.now + timedelta(hours=1)).isoformat()))
    _, keyring = keys.encryption_keyring(TENANT, "k1")
    message = encrypt_all([keyring], PLAINTEXT)
    clock.advance(hours=1)
    assert code_of(lambda: keys.encryption_keyring(TENANT, "k1")) == "key-expired"
    assert decrypt_with(keys, "k1", message) == PLAINTEXT


# Races


def _race(count: int, action: Callable[[int], object]) -> list[object]:
    """Run `action(i)` on `count` threads released together; what each returned or raised."""
    barrier = threading.Barrier(count)
    outcomes: list[object] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = action(index)
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _create_with(stores: list[KeyStore], request: KeySpec, index: int) -> KeyRecord:
    return stores[index].create(TENANT, request)


def test_of_two_creators_of_one_kid_exactly_one_wins(
    records: Records, kek: LocalKek, clock: Clock
) -> None:
    stores = [KeyStore(records, kek, clock=clock) for _ in range(2)]
    for round_number in range(5):
        request = spec(f"contested-{round_number}")
        outcomes = _race(2, functools.partial(_create_with, stores, request))
        assert sorted(type(outcome).__name__ for outcome in outcomes) == [
            "KeyExists",
            "KeyRecord",
        ]
        [winner] = [outcome for outcome in outcomes if isinstance(outcome, KeyRecord)]
        assert stores[0].get(TENANT, request.kid) == winner
        assert any(isinstance(outcome, KeyExists) for outcome in outcomes)


def test_concurrent_rotations_all_land(records: Records, kek: LocalKek, clock: Clock) -> None:
    stores = [KeyStore(records, kek, clock=clock) for _ in range(4)]
    stores[0].create(TENANT, spec())
    outcomes = _race(4, lambda i: stores[i].rotate(TENANT, "k1"))
    assert all(isinstance(outcome, KeyRecord) for outcome in outcomes)
    record = stores[0].get(TENANT, "k1")
    assert [version.version for version in record.versions] == [1, 2, 3, 4, 5]
    assert record.primary_version == 5


# Tenants and listing


def test_tenants_see_only_their_own_keys(keys: KeyStore) -> None:
    keys.create(TENANT, spec("shared", exportable=True))
    assert code_of(lambda: keys.get("globex", "shared")) == "key-not-found"
    assert code_of(lambda: keys.encryption_keyring("globex", "shared")) == "key-not-found"
    assert code_of(lambda: keys.rotate("globex", "shared")) == "key-not-found"
    assert keys.list("globex") == ([], None)
    keys.create("globex", spec("shared", exportable=True))
    assert keys.export_jwk("globex", "shared")["k"] != keys.export_jwk(TENANT, "shared")["k"]


def test_listing_pages_through_a_tenants_keys(keys: KeyStore) -> None:
    for kid in ["e", "a", "c", "b", "d"]:
        keys.create(TENANT, spec(kid))
    keys.create("acme2", spec("z"))
    pages = []
    cursor = None
    while True:
        page, cursor = keys.list(TENANT, limit=2, after=cursor)
        pages.append([record.kid for record in page])
        if cursor is None:
            break
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    assert [record.kid for record in keys.list(TENANT)[0]] == ["a", "b", "c", "d", "e"]
    assert keys.list(TENANT, limit=5) == (keys.list(TENANT)[0], None)
    assert code_of(lambda: keys.list(TENANT, limit=0)) == "invalid-argument"


# The cache


def test_another_instances_change_is_seen_within_the_cache_ttl(
    records: Records, kek: LocalKek, clock: Clock
) -> None:
    api = KeyStore(records, kek, cache_ttl=5.0, clock=clock)
    admin = KeyStore(records, kek, cache_ttl=5.0, clock=clock)
    api.create(TENANT, spec())
    api.encryption_keyring(TENANT, "k1")
    admin.disable(TENANT, "k1")
    clock.advance(seconds=4)
    api.encryption_keyring(TENANT, "k1")  # still cached
    clock.advance(seconds=2)
    assert code_of(lambda: api.encryption_keyring(TENANT, "k1")) == "key-disabled"


def test_a_version_made_elsewhere_is_found_when_a_message_needs_it(
    records: Records, kek: LocalKek, clock: Clock
) -> None:
    reader = KeyStore(records, kek, clock=clock)
    writer = KeyStore(records, kek, clock=clock)
    reader.create(TENANT, spec())
    reader.decryption_keyrings(TENANT, "k1")
    writer.rotate(TENANT, "k1")
    _, keyring = writer.encryption_keyring(TENANT, "k1")
    message = encrypt_all([keyring], PLAINTEXT)
    _, stale = reader.decryption_keyrings(TENANT, "k1")
    with pytest.raises(DataKeyUnavailable):
        decrypt_all(stale, message)
    _, fresh = reader.decryption_keyrings(TENANT, "k1", needs_version=2)
    assert decrypt_all(fresh, message) == PLAINTEXT


def test_a_primary_version_seen_elsewhere_is_found_when_asked_for(
    records: Records, kek: LocalKek, clock: Clock
) -> None:
    worker = KeyStore(records, kek, clock=clock)
    api = KeyStore(records, kek, clock=clock)
    worker.create(TENANT, spec())
    worker.encryption_keyring(TENANT, "k1")
    rotated = api.rotate(TENANT, "k1")

    assert worker.encryption_keyring(TENANT, "k1")[0].primary_version == 1  # cached
    record, keyring = worker.encryption_keyring(TENANT, "k1", min_primary=rotated.primary_version)
    assert (record.primary_version, keyring.key_name) == (2, "k1#2")
    assert worker.encryption_keyring(TENANT, "k1", min_primary=1)[0].primary_version == 2


def test_a_hot_key_is_unwrapped_once_per_ttl(store: ObjectStore, clock: Clock) -> None:
    class CountingKek(LocalKek):
        unwraps = 0

        def unwrap(self, blob: bytes, aad: bytes) -> bytes:
            CountingKek.unwraps += 1
            return super().unwrap(blob, aad)

    kek = CountingKek(os.urandom(32))
    keys = KeyStore(open_records(store, kek), kek, cache_ttl=5.0, clock=clock)
    keys.create(TENANT, spec())
    keyrings: list[Keyring] = [keys.encryption_keyring(TENANT, "k1")[1] for _ in range(20)]
    assert CountingKek.unwraps == 1 and len({id(keyring) for keyring in keyrings}) == 1
    clock.advance(seconds=6)
    keys.encryption_keyring(TENANT, "k1")
    assert CountingKek.unwraps == 2


# No material anywhere it should not be


def _encodings(secret: bytes) -> list[bytes]:
    """Ways the bytes could show up in text or JSON."""
    standard = base64.b64encode(secret)
    return [
        secret,
        standard,
        standard.rstrip(b"="),
        b64url(secret).encode(),
        secret.hex().encode(),
    ]


def _secrets_of(jwk: dict[str, str]) -> list[bytes]:
    private = {"k", "d", "p", "q", "dp", "dq", "qi", "priv"}
    return [
        encoding
        for name in private & set(jwk)
        for encoding in [*_encodings(jwk_bytes(jwk, name)), jwk[name].encode()]
    ]


@pytest.fixture
def exported_keys(keys: KeyStore) -> dict[str, dict[str, str]]:
    """One exportable key of each type, kid → its exported JWK."""
    for kid, kty, extra in [("o", "oct", {}), ("r", "RSA", {"keySize": 2048}), ("m", "AKP", {})]:
        keys.create(TENANT, spec(kid, kty, exportable=True, **extra))
    return {kid: keys.export_jwk(TENANT, kid) for kid in "orm"}


def test_stored_records_hold_no_raw_material(
    keys: KeyStore, store: ObjectStore, exported_keys: dict[str, dict[str, str]]
) -> None:
    for kid, jwk in exported_keys.items():
        stored = store.get(record_key(TENANT, kid))
        assert not [secret for secret in _secrets_of(jwk) if secret in stored], kid


def test_reprs_and_errors_hold_no_material(
    keys: KeyStore, exported_keys: dict[str, dict[str, str]]
) -> None:
    texts = []
    for kid, jwk in exported_keys.items():
        record = keys.get(TENANT, kid)
        _, keyrings = keys.decryption_keyrings(TENANT, kid)
        imported = ImportSpec.model_validate({"kid": kid, "jwk": jwk})
        texts += [repr(record), str(record), repr(record.public_view()), repr(keyrings)]
        texts += [repr(imported), str(imported)]
        for request in [imported, imported.model_copy(update={"kid": "k#"})]:
            with pytest.raises(KeystoreError) as caught:
                keys.import_jwk(TENANT, request)
            texts += [str(caught.value), repr(caught.value)]
        with pytest.raises(ValidationError) as invalid:
            ImportSpec.model_validate({"kid": kid, "keyOps": "encrypt", "jwk": jwk})
        texts.append(str(invalid.value))
        with pytest.raises(ValidationError) as invalid:
            ImportSpec.model_validate({"kid": kid, "jwk": json.dumps(jwk)})
        texts.append(str(invalid.value))
    text = "\n".join(texts).encode()
    for kid, jwk in exported_keys.items():
        assert not [secret for secret in _secrets_of(jwk) if secret in text], kid


# Binding of material to its record


def test_another_kek_cannot_open_stored_keys(
    store: ObjectStore, records: Records, kek: LocalKek, clock: Clock
) -> None:
    KeyStore(records, kek, clock=clock).create(TENANT, spec())
    stranger_kek = LocalKek(os.urandom(32))
    with pytest.raises(KekMismatch):
        open_records(store, stranger_kek)  # its records are sealed under another key
    # Even given the record key, material wrapped under another KEK stays shut.
    stranger = KeyStore(records, stranger_kek, clock=clock)
    with pytest.raises(KekError):
        stranger.encryption_keyring(TENANT, "k1")


def test_wrapped_material_cannot_move_to_another_key(keys: KeyStore, records: Records) -> None:
    # Behind the record's MAC, the wrap's AAD binds material to its key on its own: a
    # record sealed with another key's versions (a bug, or a holder of the record key
    # without the KEK) still does not open.
    keys.create(TENANT, spec("victim"))
    keys.create(TENANT, spec("thief"))
    victim = records.get("key", record_key(TENANT, "victim"), KeyRecord)
    thief = records.get("key", record_key(TENANT, "thief"), KeyRecord)
    swapped = thief.model_copy(update={"versions": victim.versions})
    records.put("key", record_key(TENANT, "thief"), swapped)
    keys.disable(TENANT, "thief")  # drops any cached entry
    keys.enable(TENANT, "thief")
    assert code_of(lambda: keys.encryption_keyring(TENANT, "thief")) == "kek-error"


def test_a_record_copied_under_another_tenant_is_refused(
    keys: KeyStore, store: ObjectStore
) -> None:
    keys.create(TENANT, spec())
    store.put(record_key("globex", "k1"), store.get(record_key(TENANT, "k1")))
    assert code_of(lambda: keys.get("globex", "k1")) == "record-tampered"
