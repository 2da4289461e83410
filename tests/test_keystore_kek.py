"""Key-encryption keys: the local AES-GCM KEK and its file forms, and the KMS KEK against
moto's KMS served over HTTP, alone and under a KeyStore."""

import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from keystore import KekError, KeySpec, KeyStore, KmsKek, LocalKek
from keystore.recordkey import DOCUMENT_KEY, RecordKeyMissing
from sealstream.settings import Settings
from sealstream.wiring import ConfigurationError, open_records, open_service_records
from storage import LocalStore
from tests.support.envelope import decrypt_all, encrypt_all

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

AAD = b"sealstream/key-material/v1|acme|k|1"
MATERIAL = os.urandom(2400)  # about an RSA-4096 PKCS#8 key: the largest material there is


@pytest.fixture
def local_kek() -> LocalKek:
    return LocalKek(os.urandom(32))


def test_local_kek_round_trips_and_binds_the_aad(local_kek: LocalKek) -> None:
    blob = local_kek.wrap(MATERIAL, AAD)
    assert blob[0] == 1 and len(blob) == 1 + 12 + len(MATERIAL) + 16
    assert local_kek.unwrap(blob, AAD) == MATERIAL
    assert local_kek.wrap(MATERIAL, AAD) != blob  # a fresh nonce each time
    with pytest.raises(KekError):
        local_kek.unwrap(blob, AAD.replace(b"|1", b"|2"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: b"\x02" + blob[1:],
        lambda blob: blob[:20],
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),
        lambda blob: b"",
    ],
)
def test_local_kek_refuses_damaged_blobs(
    local_kek: LocalKek, damage: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(KekError):
        local_kek.unwrap(damage(local_kek.wrap(MATERIAL, AAD)), AAD)


def test_another_local_kek_cannot_unwrap(local_kek: LocalKek) -> None:
    with pytest.raises(KekError, match="does not open"):
        LocalKek(os.urandom(32)).unwrap(local_kek.wrap(MATERIAL, AAD), AAD)


def test_local_kek_accepts_raw_hex_and_base64_forms(tmp_path: Path) -> None:
    key = os.urandom(32)
    blob = LocalKek(key).wrap(MATERIAL, AAD)
    forms: list[bytes | str] = [
        key,
        key.hex(),
        key.hex().upper() + "\n",
        base64.b64encode(key).decode() + "\n",
        base64.b64encode(key),
    ]
    for form in forms:
        assert LocalKek.from_encoded(form).unwrap(blob, AAD) == MATERIAL
    path = tmp_path / "kek"
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    assert LocalKek.from_file(path).unwrap(blob, AAD) == MATERIAL


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666])
def test_a_kek_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(KekError, match="chmod 600") as refused:
        LocalKek.from_file(path)
    assert f"{mode:04o}" in str(refused.value)
    path.chmod(0o400)
    LocalKek.from_file(path)  # its owner alone may read it: accepted


@pytest.mark.parametrize(
    "form",
    [
        b"short",
        bytes(33),
        "x" * 64,
        base64.b64encode(bytes(24)).decode(),
        "",
        b"\xff" * 40,
    ],
)
def test_local_kek_refuses_other_forms_without_quoting_them(form: bytes | str) -> None:
    with pytest.raises(KekError) as caught:
        LocalKek.from_encoded(form)
    text = form if isinstance(form, str) else form.hex()
    assert not text or text not in str(caught.value)


def test_a_missing_kek_file_is_a_kek_error(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="cannot read"):
        LocalKek.from_file(tmp_path / "absent")


def test_load_or_create_makes_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / ".kek"
    first = LocalKek.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == 32
    assert list(tmp_path.iterdir()) == [path]
    second = LocalKek.load_or_create(path)
    assert second.unwrap(first.wrap(MATERIAL, AAD), AAD) == MATERIAL


def test_local_kek_repr_hides_the_key() -> None:
    key = os.urandom(32)
    text = repr(LocalKek(key)) + str(LocalKek(key))
    assert key.hex() not in text and base64.b64encode(key).decode() not in text


# KMS, on moto's server over HTTP


@pytest.fixture(scope="module")
def kms_client(moto_endpoint: str) -> "KMSClient":
    return boto3.session.Session().client("kms", endpoint_url=moto_endpoint)


@pytest.fixture
def kms_kek(kms_client: "KMSClient") -> KmsKek:
    metadata = kms_client.create_key(Description="sealstream test KEK")["KeyMetadata"]
    return KmsKek(metadata["KeyId"], kms_client)


def test_kms_kek_round_trips_and_binds_the_aad(kms_kek: KmsKek) -> None:
    kms_kek.check()
    blob = kms_kek.wrap(MATERIAL, AAD)
    assert MATERIAL not in blob
    assert kms_kek.unwrap(blob, AAD) == MATERIAL
    with pytest.raises(KekError, match="InvalidCiphertextException"):
        kms_kek.unwrap(blob, AAD.replace(b"acme", b"evil"))


def test_kms_kek_reports_an_unusable_key(kms_client: "KMSClient", kms_kek: KmsKek) -> None:
    kms_client.disable_key(KeyId=kms_kek.key_id)
    # moto's Encrypt still serves a disabled key (real KMS answers DisabledException), so
    # only the readiness probe is checked here.
    with pytest.raises(KekError):
        kms_kek.check()
    with pytest.raises(KekError, match="NotFound"):
        KmsKek("alias/absent", kms_client).check()


def test_a_key_store_works_under_the_kms_kek(kms_kek: KmsKek, tmp_path: Path) -> None:
    keys = KeyStore(open_records(LocalStore(tmp_path / "bucket"), kms_kek), kms_kek)
    keys.create("acme", KeySpec(kid="k", kty="AKP"))
    keys.rotate("acme", "k")
    _, keyring = keys.encryption_keyring("acme", "k")
    message = encrypt_all([keyring], b"under KMS")
    # Another process: the record key comes back from its KMS-wrapped copy in the bucket.
    fresh = KeyStore(open_records(LocalStore(tmp_path / "bucket"), kms_kek), kms_kek)
    _, keyrings = fresh.decryption_keyrings("acme", "k")
    assert decrypt_all(keyrings, message) == b"under KMS"


def test_a_lost_kms_record_key_is_not_replaced_by_a_new_one(
    kms_kek: KmsKek, tmp_path: Path
) -> None:
    """With KMS the document holds the only copy of the record key: without it the store
    refuses to open, even to an upgrade, rather than seal anything under a new key."""
    store = LocalStore(tmp_path / "bucket")
    KeyStore(open_records(store, kms_kek), kms_kek).create("acme", KeySpec(kid="k", kty="oct"))
    store.delete(DOCUMENT_KEY)
    for upgrading in (False, True):
        with pytest.raises(RecordKeyMissing, match="restore it from a backup"):
            open_records(LocalStore(tmp_path / "bucket"), kms_kek, upgrading=upgrading)
    assert not store.pending_uploads() and [i.key for i in store.list(DOCUMENT_KEY)] == []


def test_a_kms_record_key_belongs_to_one_store(kms_kek: KmsKek, tmp_path: Path) -> None:
    """Two stores under one KMS key: one's record-key document, copied into the other,
    does not open there (its KMS encryption context names its own store)."""
    first, second = LocalStore(tmp_path / "first"), LocalStore(tmp_path / "second")
    open_records(first, kms_kek)
    open_records(second, kms_kek)
    second.put(DOCUMENT_KEY, first.get(DOCUMENT_KEY))
    with pytest.raises(KekError):
        open_records(second, kms_kek)
    # At a service's start: one line naming the setting, not a traceback.
    with pytest.raises(ConfigurationError, match=r"^SEALSTREAM_KMS_KEY_ID: "):
        open_service_records(Settings(kms_key_id=kms_kek.key_id), second, kms_kek)
