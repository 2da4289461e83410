"""The bucket is not a root of trust: records written straight into it, by anyone who can
write the bucket but holds no KEK (a backup job, a storage admin), are refused on the live
API over both backends; a store from before records were sealed is upgraded only by an
operator's explicit step; and what an admin token may do is bounded by its tenant."""

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, ConfigDict

from api.problems import from_domain_error
from api.tokens import (
    SCOPES,
    ExpiredToken,
    TokenError,
    TokenRecord,
    TokenStore,
    token_record_key,
)
from envelope import Encryptor, HeaderReader, RsaKeyring
from keystore import KekMismatch, LocalKek, StoreNeedsUpgrade, record_key
from keystore.algorithms import jwk_bytes
from keystore.recordkey import DOCUMENT_KEY
from sealstream.server import create_app
from sealstream.upgrade import AlreadySealed, upgrade_records
from sealstream.wiring import ConfigurationError, open_records
from storage import LocalStore, ObjectInfo, ObjectStore, SmallObject
from storage.integrity import MAX_RECORD_BYTES, RecordTampered, seal
from storage.records import ObjectRecord
from storage.records import record_key as object_record_key
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api, local_settings
from tests.support.http import (
    ENCRYPT,
    KEYS,
    create_key,
    decrypt,
    encrypt,
    post_form,
    problem,
    read_object,
)
from tests.support.jobs import finished_job, start_verify
from tests.support.waiting import wait_until

TOKENS = "/api/admin/tokens"
TENANT_SCOPES = ["keys:read", "keys:write", "crypto:encrypt", "crypto:decrypt", "admin"]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def document(objects: ObjectStore, key: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(objects.get(key))
    return loaded


def write(objects: ObjectStore, key: str, value: dict[str, Any]) -> None:
    objects.put(key, json.dumps(value).encode())


def issue(client: httpx.Client, tenant: str, scopes: list[str], **fields: Any) -> dict[str, Any]:
    response = client.post(TOKENS, json={"tenant": tenant, "scopes": scopes, **fields})
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


def refused_eventually(api: Api, token: str, path: str, code: str, status: int = 502) -> None:
    """`path` answers `code` once the record cached before the forgery has expired."""

    def refused() -> bool:
        with api.client(token) as client:
            response = client.get(path)
        return response.status_code == status and response.json().get("code") == code

    wait_until(refused, f"{path} to be refused with {code}", timeout=10)


def assert_names_no_storage_key(body: dict[str, Any]) -> None:
    for leak in ("sealstream/", "tenants/", ".json"):
        assert leak not in body["detail"], body


# Tokens


def test_a_forged_token_record_is_refused(api: Api) -> None:
    with api.client() as admin:
        victim = issue(admin, "acme", ["keys:read"])
    chosen = f"sst_{victim['id']}_{'A' * 43}"
    # The record of a real token id, rewritten in the old plain form with the writer's
    # own token hash and every scope: what once gave a working admin token.
    forged = {
        "id": victim["id"],
        "tenant": "default",
        "scopes": sorted(SCOPES),
        "name": "",
        "createdAt": datetime.now(UTC).isoformat(),
        "hash": sha256(chosen),
    }
    write(api.objects, token_record_key(victim["id"]), forged)
    refused_eventually(api, chosen, KEYS, "record-tampered")
    with api.client(chosen) as attacker:
        body = problem(attacker.get(f"{KEYS}/anything/export"), 502, "record-tampered")
    assert_names_no_storage_key(body)


def test_a_sealed_token_record_altered_or_moved_is_refused(api: Api) -> None:
    with api.client() as admin:
        token = issue(admin, "acme", ["keys:read"])["token"]
        other = issue(admin, "acme", ["keys:read"])
    key = token_record_key(token.split("_")[1])
    sealed = document(api.objects, key)
    sealed["record"]["scopes"] = sorted(SCOPES)  # the MAC left as it was
    write(api.objects, key, sealed)
    refused_eventually(api, token, KEYS, "record-tampered")
    # An authentic record, moved under another token's name: bound to its own.
    write(api.objects, token_record_key(other["id"]), document(api.objects, key))
    refused_eventually(api, other["token"], KEYS, "record-tampered")


def test_a_made_up_token_id_is_refused_whatever_the_bucket_holds(api: Api) -> None:
    made_up = "q" * 16
    token = f"sst_{made_up}_{'B' * 43}"
    forged = {
        "id": made_up,
        "tenant": "default",
        "scopes": sorted(SCOPES),
        "createdAt": datetime.now(UTC).isoformat(),
        "hash": sha256(token),
    }
    write(api.objects, token_record_key(made_up), forged)
    with api.client(token) as attacker:
        problem(attacker.get(KEYS), 401, "invalid-token")


def test_a_real_token_id_with_another_secret_is_refused(api: Api) -> None:
    with api.client() as admin:
        issued = issue(admin, "acme", ["keys:read"])
    wrong = f"sst_{issued['id']}_{secrets.token_urlsafe(32)}"
    with api.client(wrong) as attacker:
        problem(attacker.get(KEYS), 401, "invalid-token")
    with api.client(issued["token"]) as owner:
        assert owner.get(KEYS).status_code == 200


# Keys


def test_a_key_record_made_exportable_in_the_bucket_is_refused(api: Api) -> None:
    with api.client() as admin:
        create_key(admin, kid="locked", exportable=False)
        problem(admin.get(f"{KEYS}/locked/export"), 403, "key-not-exportable")
        create_key(admin, kid="off")
        assert admin.post(f"{KEYS}/off/disable").status_code == 200
    for kid, change in (("locked", {"exportable": True}), ("off", {"status": "enabled"})):
        key = record_key("default", kid)
        sealed = document(api.objects, key)
        sealed["record"].update(change)
        write(api.objects, key, sealed)
        write(api.objects, f"{key}.plain", sealed["record"])
    refused_eventually(api, ADMIN_TOKEN, f"{KEYS}/locked/export", "record-tampered")
    with api.client() as admin:
        assert_names_no_storage_key(
            problem(encrypt(admin, b"data", kid="off"), 502, "record-tampered")
        )
        problem(admin.get(f"{KEYS}/locked"), 502, "record-tampered")
        # The same change written in the old, plain form: refused as well.
        plain = api.objects.get(f"{record_key('default', 'off')}.plain")
        api.objects.put(record_key("default", "off"), plain)
        problem(encrypt(admin, b"data", kid="off"), 502, "record-tampered")
        metrics = admin.get("/metrics").text
    assert 'sealstream_records_refused_total{kind="key"}' in metrics


def store(client: httpx.Client, key: str, data: bytes) -> dict[str, Any]:
    response = post_form(client, ENCRYPT, {"kid": "mySymKey", "destination": {"key": key}}, data)
    assert response.status_code == 201, response.text
    stored: dict[str, Any] = response.json()
    return stored


def test_an_object_record_altered_in_the_bucket_is_refused(api: Api) -> None:
    with api.client() as admin:
        create_key(admin)
        stored = store(admin, "o", os.urandom(5000))
    key = object_record_key(api.objects.bucket, stored["storageKey"])
    sealed = document(api.objects, key)
    sealed["record"]["plaintextSize"] += 1000
    write(api.objects, key, sealed)
    with api.client() as admin:
        assert_names_no_storage_key(problem(read_object(admin, "o"), 502, "record-tampered"))


def test_an_object_copied_over_another_is_refused(api: Api) -> None:
    # Two authentic objects of one size, under one key: only the place each message
    # names tells them apart once one is copied over the other.
    data = {"a": os.urandom(70_000), "b": os.urandom(70_000)}
    with api.client() as admin:
        create_key(admin)
        stored = {name: store(admin, name, content) for name, content in data.items()}
        api.objects.put(stored["a"]["storageKey"], api.objects.get(stored["b"]["storageKey"]))
        for range_ in (None, "bytes=0-99", "bytes=-100"):
            body = problem(read_object(admin, "a", range_), 502, "object-damaged")
            assert "sealed for another object" in body["detail"]
            assert_names_no_storage_key(body)
        verified = finished_job(admin, start_verify(admin, "a")["id"])
        assert (verified["status"], verified["error"]["code"]) == ("failed", "object-misplaced")
        assert read_object(admin, "b").content == data["b"]


def test_a_message_made_with_a_public_key_is_not_served_in_a_stored_objects_place(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone can seal a message for an RSA key from its public half, with any context
    and any message ID: the stored object's own pairs and ID, its frame length, and so its
    size. Only the sealed record, which names the message the service stored, tells the
    two apart."""
    data, forged_data = os.urandom(70_000), os.urandom(70_000)
    with api.client() as admin:
        create_key(admin, kid="rsa", kty="RSA", alg="RSA-OAEP-256", keySize=2048)
        stored = post_form(admin, ENCRYPT, {"kid": "rsa", "destination": {"key": "r"}}, data).json()
        jwk = admin.get(f"{KEYS}/rsa").json()["publicJwk"]
        message = api.objects.get(stored["storageKey"])
        header = HeaderReader().feed(message)
        assert header is not None
        public = rsa.RSAPublicNumbers(
            int.from_bytes(jwk_bytes(jwk, "e")), int.from_bytes(jwk_bytes(jwk, "n"))
        ).public_key()
        draws = iter([os.urandom(32), header.message_id])  # a data key, then the ID
        monkeypatch.setattr("envelope.message.os.urandom", lambda _: next(draws))
        forger = Encryptor(
            [RsaKeyring("rsa#1", public)], context=header.context, frame_length=header.frame_length
        )
        monkeypatch.undo()
        assert forger.header.message_id == header.message_id
        forged = b"".join([*forger.update(forged_data), *forger.finish()])
        assert len(forged) == len(message)
        api.objects.put(stored["storageKey"], forged)
        for range_ in (None, "bytes=0-99", "bytes=-100"):
            body = problem(read_object(admin, "r", range_), 502, "object-damaged")
            assert "not the one stored there" in body["detail"]
        verified = finished_job(admin, start_verify(admin, "r")["id"])
        assert (verified["status"], verified["error"]["code"]) == ("failed", "object-replaced")


# Who may manage tokens


@pytest.fixture
def local_api(tmp_path: Path) -> Iterator[Api]:
    with live_api(local_settings(tmp_path)) as api:
        yield api


def test_a_tenant_admin_manages_only_its_own_tenant(local_api: Api) -> None:
    with local_api.client() as operator:
        acme_admin = issue(operator, "acme", TENANT_SCOPES)["token"]
        beta = issue(operator, "beta", ["keys:read"])
    with local_api.client(acme_admin) as acme:
        problem(
            acme.post(TOKENS, json={"tenant": "beta", "scopes": ["keys:read"]}),
            403,
            "operator-required",
        )
        problem(
            acme.post(TOKENS, json={"tenant": "acme", "scopes": ["keys:export"]}),
            403,
            "scope-not-held",
        )
        problem(
            acme.post(TOKENS, json={"tenant": "acme", "scopes": ["operator"]}),
            403,
            "scope-not-held",
        )
        problem(acme.get(TOKENS, params={"tenant": "beta"}), 403, "operator-required")
        problem(acme.delete(f"{TOKENS}/{beta['id']}"), 404, "token-not-found")
        own = issue(acme, "acme", ["keys:read", "keys:write"])
        listed = acme.get(TOKENS).json()["tokens"]
        assert {token["tenant"] for token in listed} == {"acme"}
        assert own["id"] in {token["id"] for token in listed}
        assert acme.delete(f"{TOKENS}/{own['id']}").status_code == 200
    with local_api.client(beta["token"]) as still_valid:
        assert still_valid.get(KEYS).status_code == 200
    # Nor can it reach above itself in its own tenant: a token with scopes it lacks.
    with local_api.client() as operator:
        above = issue(operator, "acme", [*TENANT_SCOPES, "keys:export", "operator"])
    with local_api.client(acme_admin) as acme:
        assert above["id"] not in {token["id"] for token in acme.get(TOKENS).json()["tokens"]}
        problem(acme.delete(f"{TOKENS}/{above['id']}"), 404, "token-not-found")
    with local_api.client(above["token"]) as unrevoked:
        assert unrevoked.get(KEYS).status_code == 200
    with local_api.client() as operator:
        listed = operator.get(TOKENS).json()["tokens"]
        assert {"acme", "beta"} <= {token["tenant"] for token in listed}
        delegate = issue(operator, "beta", ["admin", "operator", "keys:read"])["token"]
    with local_api.client(delegate) as second_operator:
        issue(second_operator, "acme", ["keys:read"])  # an operator it granted manages any tenant


def test_token_expiry_must_be_an_aware_time_in_the_future(local_api: Api) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    with local_api.client() as operator:
        naive = later.replace(tzinfo=None).isoformat()
        problem(
            operator.post(
                TOKENS, json={"tenant": "acme", "scopes": ["keys:read"], "expiresAt": naive}
            ),
            422,
            "invalid-request",
        )
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        problem(
            operator.post(
                TOKENS, json={"tenant": "acme", "scopes": ["keys:read"], "expiresAt": past}
            ),
            422,
            "invalid-expiry",
        )
        issued = issue(operator, "acme", ["keys:read"], expiresAt=later.isoformat())
    with local_api.client(issued["token"]) as holder:
        assert holder.get(KEYS).status_code == 200


def test_a_disabled_or_pending_deletion_key_is_not_exported(local_api: Api) -> None:
    with local_api.client() as admin:
        create_key(admin, kid="x", exportable=True)
        assert admin.get(f"{KEYS}/x/export").status_code == 200
        admin.post(f"{KEYS}/x/disable")
        problem(admin.get(f"{KEYS}/x/export"), 409, "key-disabled")
        admin.delete(f"{KEYS}/x")
        problem(admin.get(f"{KEYS}/x/export"), 409, "key-pending-deletion")


# The KEK and the record key


def test_another_kek_is_refused_at_start_and_by_readiness(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    with live_api(settings) as api:
        with api.client() as admin:
            assert admin.get("/readyz").json()["checks"]["kek"] == "ok"
        document_of_key = document(api.objects, DOCUMENT_KEY)
        write(api.objects, DOCUMENT_KEY, {**document_of_key, "keyId": "0" * 16})
        with api.client() as admin:
            problem(admin.get("/readyz"), 503, "not-ready")
        write(api.objects, DOCUMENT_KEY, document_of_key)
    other_kek = tmp_path / "other-kek"
    LocalKek.load_or_create(other_kek)
    with pytest.raises(
        ConfigurationError, match=r"^SEALSTREAM_KEK_FILE: the KEK is not"
    ) as refused:
        create_app(settings.model_copy(update={"kek_file": other_kek}))
    assert isinstance(refused.value.__cause__, KekMismatch)


def test_a_lost_record_key_document_is_rewritten_from_a_local_kek(tmp_path: Path) -> None:
    """Deleting the document is no way to make an operator run an upgrade: with a local
    KEK the key is derived again, and the store's own sealed records confirm it."""
    settings = local_settings(tmp_path)
    with live_api(settings) as api:
        with api.client() as admin:
            token = issue(admin, "acme", ["keys:read"])["token"]
        api.objects.delete(DOCUMENT_KEY)
    with live_api(settings) as api, api.client(token) as holder:
        assert holder.get(KEYS).status_code == 200
        assert api.objects.head(DOCUMENT_KEY).size > 0
    with pytest.raises(AlreadySealed):
        upgrade_records(settings)


def test_a_sealed_store_is_never_taken_for_one_from_before_sealing(tmp_path: Path) -> None:
    """Its document deleted and unsealed records planted, ahead of every sealed one in
    listing order: the store's sealed records still say it was sealed, so the document is
    written back, and an upgrade refuses to bless what was planted unless told again."""
    settings = local_settings(tmp_path)
    with live_api(settings) as api:
        with api.client() as admin:
            create_key(admin, kid="locked", exportable=False)
            issue(admin, "acme", ["keys:read"])
        planted = {
            "id": "0000000000000000",
            "tenant": "default",
            "scopes": sorted(SCOPES),
            "createdAt": datetime.now(UTC).isoformat(),
            "hash": sha256("sst_0000000000000000_" + "P" * 43),
        }
        write(api.objects, token_record_key("0000000000000000"), planted)
        key = record_key("default", "locked")
        write(api.objects, key, {**document(api.objects, key)["record"], "exportable": True})
        api.objects.delete(DOCUMENT_KEY)
    with pytest.raises(AlreadySealed):
        upgrade_records(settings)
    dry = upgrade_records(settings, dry_run=True)
    assert [token.id for token in dry.tokens] == ["0000000000000000"]
    assert [(k.kid, k.exportable) for k in dry.keys] == [("locked", True)]
    with live_api(settings) as api, api.client() as admin:
        problem(admin.get(f"{KEYS}/locked/export"), 502, "record-tampered")
    with live_api(settings) as api, api.client("sst_0000000000000000_" + "P" * 43) as planter:
        problem(planter.get(KEYS), 401, "invalid-token")


def test_an_object_record_must_name_its_header(api: Api) -> None:
    """A record that names no header (none is written so) is refused, not read as one
    that vouches for any message."""
    with api.client() as admin:
        create_key(admin)
        stored = store(admin, "h", os.urandom(5000))
    name = object_record_key(api.objects.bucket, stored["storageKey"])
    recorded = api.records.get("object", name, ObjectRecord)
    legacy = recorded.model_dump(mode="json", by_alias=True, exclude={"header_sha256"})
    api.objects.put(name, seal(api.records.key, "object", name, _Loose.model_validate(legacy)))
    with api.client() as admin:
        problem(read_object(admin, "h"), 502, "record-tampered")


class _Loose(BaseModel):
    """Any record at all, sealed as it is: what only the record key's holder could write."""

    model_config = ConfigDict(extra="allow")


def test_a_record_key_document_with_a_mangled_mac_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    kek = LocalKek(os.urandom(32))
    open_records(store, kek)
    mangled = {**json.loads(store.get(DOCUMENT_KEY)), "mac": "é" * 44}
    store.put(DOCUMENT_KEY, json.dumps(mangled).encode())
    with pytest.raises(KekMismatch, match="not authentic"):
        open_records(store, kek)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StoreNeedsUpgrade("this store needs `sealstream upgrade-records`"), "store-needs-upgrade"),
        (KekMismatch("store 'prod' sealed under record key 0123abcd"), "kek-mismatch"),
    ],
)
def test_the_keys_not_serving_is_a_503_naming_nothing(error: Exception, code: str) -> None:
    """Found on a request (the store could not be reached at start, say): the store's
    names, key ids and documents are the operator's to read in the log."""
    answer = from_domain_error(error)
    assert (answer.status, answer.code) == (503, code)
    assert str(error) not in answer.detail and "sealstream" not in answer.detail


def test_records_of_another_store_are_refused_though_the_kek_is_the_same(
    tmp_path: Path,
) -> None:
    """A clone restored from a backup, or a staging store, sharing the KEK: a token issued
    there does not work here, since each store's records have a key of their own."""
    kek = LocalKek(os.urandom(32))
    here = open_records(LocalStore(tmp_path / "here"), kek)
    there = open_records(LocalStore(tmp_path / "there"), kek)
    token, record = TokenStore(there, ADMIN_TOKEN).issue("default", sorted(SCOPES))
    name = token_record_key(record.id)
    here.store.put(name, there.store.get(name))
    with pytest.raises(TokenError):  # its id carries a MAC under the other store's key
        TokenStore(here, ADMIN_TOKEN).authenticate(token)
    with pytest.raises(RecordTampered):  # and so does its record
        here.get("token", name, TokenRecord)


# Cheap refusals


class CountingStore(LocalStore):
    """A local store that counts the requests a remote store would make."""

    requests = 0

    def get(self, key: str) -> bytes:
        CountingStore.requests += 1
        return super().get(key)

    def head(self, key: str) -> ObjectInfo:
        CountingStore.requests += 1
        return super().head(key)

    def get_small(self, key: str, limit: int) -> SmallObject:
        CountingStore.requests += 1
        return super().get_small(key, limit)


def test_a_record_larger_than_any_is_refused_unread_in_one_request(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "bucket")
    records = open_records(store, LocalKek(os.urandom(32)))
    store.put("sealstream/keys/default/huge.json", bytes(MAX_RECORD_BYTES + 1))
    CountingStore.requests = 0
    with pytest.raises(RecordTampered, match="larger than any record"):
        records.get("key", "sealstream/keys/default/huge.json", BaseModel)
    assert CountingStore.requests == 1


def test_refusing_an_unknown_token_costs_no_storage_request(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "bucket")
    records = open_records(store, LocalKek(os.urandom(32)))
    tokens = TokenStore(records, ADMIN_TOKEN, cache_ttl=60)
    issued, _ = tokens.issue("acme", ["keys:read"])
    store.delete(token_record_key(issued.split("_")[1]))
    tokens = TokenStore(records, ADMIN_TOKEN, cache_ttl=60)  # nothing cached
    tokens.authenticate(ADMIN_TOKEN)
    CountingStore.requests = 0
    for _ in range(200):
        made_up = f"sst_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
        with pytest.raises(TokenError):
            tokens.authenticate(made_up)
    assert CountingStore.requests <= 2  # the index of ids from before ids carried a MAC
    CountingStore.requests = 0
    for _ in range(50):  # an id the service did issue, whose record is gone
        with pytest.raises(TokenError):
            tokens.authenticate(issued)
    assert CountingStore.requests == 1


def test_a_token_is_refused_from_its_expiry_on(tmp_path: Path) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    records = open_records(LocalStore(tmp_path / "bucket"), LocalKek(os.urandom(32)))
    tokens = TokenStore(records, ADMIN_TOKEN, clock=lambda: now)
    token, _ = tokens.issue("acme", ["keys:read"], expires_at=now + timedelta(hours=1))
    assert tokens.authenticate(token).tenant == "acme"
    now += timedelta(hours=1)
    with pytest.raises(ExpiredToken):
        tokens.authenticate(token)


# Upgrading a store from before records were sealed


def unseal_store(objects: ObjectStore, tokens: dict[str, str]) -> None:
    """Rewrite every sealed record as the service wrote it before records were sealed;
    `tokens` maps token ids to their tokens (records then held their plain SHA-256)."""
    objects.delete(DOCUMENT_KEY)
    for info in list(objects.list("sealstream/")):
        if info.key.startswith("sealstream/audit/"):
            objects.delete(info.key)  # no store from then had an audit trail
            continue
        record = json.loads(objects.get(info.key))["record"]
        if info.key.startswith("sealstream/tokens/"):
            record["hash"] = sha256(tokens[record["id"]])
        if info.key.startswith("sealstream/objects/"):
            del record["headerSha256"]  # records named no header then
        write(objects, info.key, record)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_store_from_before_sealing_is_upgraded_by_an_operator_only(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = api_settings(backend, tmp_path, request)
    data = os.urandom(70_000)
    with live_api(settings) as api:
        with api.client() as admin:
            create_key(admin)
            acme = issue(admin, "acme", ["keys:read"])
            store(admin, "d", data)
        objects = api.objects
    legacy_id = "legacy0000000000"
    legacy_token = f"sst_{legacy_id}_{'C' * 43}"
    unseal_store(objects, {acme["id"]: acme["token"]})
    legacy_record = {
        "id": legacy_id,
        "tenant": "default",
        "scopes": ["keys:read"],
        "createdAt": "2026-01-01T00:00:00+00:00",
        "expiresAt": "2099-01-01T00:00:00",  # naive: the service once took them
        "hash": sha256(legacy_token),
    }
    write(objects, token_record_key(legacy_id), legacy_record)

    with pytest.raises(ConfigurationError, match="upgrade-records") as refused:
        create_app(settings)
    assert isinstance(refused.value.__cause__, StoreNeedsUpgrade)
    report = upgrade_records(settings)
    lines = "\n".join(report.lines())
    assert {token.id for token in report.tokens} == {acme["id"], legacy_id}
    assert [key.kid for key in report.keys] == ["mySymKey"]
    assert legacy_id in lines and "mySymKey" in lines and "exportable false" in lines
    assert not report.refused and not report.unreadable

    with live_api(settings) as api:
        with api.client(legacy_token) as legacy, api.client(acme["token"]) as holder:
            assert legacy.get(KEYS).json()["keys"][0]["kid"] == "mySymKey"
            assert holder.get(KEYS).status_code == 200
        with api.client() as admin:
            assert read_object(admin, "d").content == data
            assert decrypt(admin, encrypt(admin, b"after").content).content == b"after"
        # A record planted after the upgrade stays refused...
        planted = dict(document(objects, token_record_key(legacy_id))["record"])
        write(objects, token_record_key(legacy_id), {**planted, "scopes": sorted(SCOPES)})
        refused_eventually(api, legacy_token, KEYS, "record-tampered")
    # ...and an upgrade will not seal it unless told to: it was not there before sealing.
    with pytest.raises(AlreadySealed):
        upgrade_records(settings)
    again = upgrade_records(settings, again=True)  # an operator's choice, for review
    assert [(token.id, token.scopes) for token in again.tokens] == [(legacy_id, sorted(SCOPES))]
    assert again.keys == [] and again.already_sealed > 0


@pytest.mark.parametrize(
    "junk",
    [
        b'{"format": "sealstream-record/1", "macKey": "%s", "mac": "", "record": {"x": 1e999}}',
        b'{"format": "sealstream-record/1", "macKey": "%s", "mac": "", "record": NaN}',
        b'{"format": "sealstream-record/1", "macKey": "%s", "mac": "A", "record": {}}',
        b"[" * 100_000,
        b"\xff\xfe not JSON",
    ],
)
def test_a_record_of_any_bytes_is_refused_not_crashed_on(tmp_path: Path, junk: bytes) -> None:
    records = open_records(LocalStore(tmp_path / "bucket"), LocalKek(os.urandom(32)))
    data = junk.replace(b"%s", records.key.key_id.encode())
    records.store.put("sealstream/tokens/x.json", data)
    with pytest.raises(RecordTampered):
        records.get("token", "sealstream/tokens/x.json", TokenRecord)
