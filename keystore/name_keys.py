"""Name keys: what hides the names of a tenant's archive members, and their digests.

Each tenant has one name key, made the first time it is needed and versioned: rotating
it (`NameKeys.rotate`) adds a version, current from then on, without moving what an
earlier one named; no version is ever removed, since the names, records and reruns made
under it need it for as long as they exist. It is independent
of every data key: rotating, re-encrypting or retiring a data key never changes where an
object lives, and keys with no symmetric material (RSA, ML-KEM, partner, multi-recipient)
need none. Its 32 bytes of material are wrapped under the KEK, bound to the tenant and
version, in one sealed record, `sealstream/name-keys/<tenant>.json`.

From the material come two keys (HMAC-SHA256 as the KDF, one label each):
- a 64-byte AES-SIV key, which turns a member's path into its object key: deterministic,
  so a rerun finds the objects it wrote, with [tenant, bucket, prefix] as associated data;
- an HMAC-SHA256 key, which stands in an object's record for its plaintext's size and
  SHA-256, so the record no longer lets anyone confirm a known file;
and a fingerprint, which commits to the material without revealing it: the records of
what a version named hold it beside the version number, since a bucket writer who
deletes the name key record makes the next run issue that number again, of other
material, and a rerun must not name under it (`NameKeyMismatch`).

docs/FORMAT.md describes the construction and what it still reveals.
"""

import base64
import hmac
import os
import struct
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from pydantic import Field

from keystore.errors import ConcurrentUpdate, InvalidKeyState, KeystoreError
from keystore.kek import Kek
from keystore.persistence import UPDATE_ATTEMPTS, back_off, check_tenant
from keystore.records import Base64Bytes
from storage import ObjectExists, ObjectNotFound, PreconditionFailed
from storage.documents import FrozenCamelModel
from storage.integrity import Records

RECORD_KIND = "name-key"
RECORD_PREFIX = "sealstream/name-keys/"
MATERIAL_LENGTH = 32
MATERIAL_AAD_PREFIX = "sealstream/name-key/v1"
NAME_PAD = 16  # a name's plaintext is padded to a multiple of this many bytes
SEGMENT_CHARS = 192  # between slashes: a local store takes 200 bytes, a record adds ".json"
MAX_NAME_BYTES = 1024
# Every version is kept and the record read on every hidden-name run: a cap keeps it small.
DEFAULT_MAX_VERSIONS = 100


class NameTooLong(KeystoreError):
    """A member path whose encrypted name would be longer than storage keys may be."""

    code = "name-too-long"


class NameUnreadable(KeystoreError):
    """An encrypted name that this tenant's name key did not make for this place."""

    code = "name-unreadable"


class NameKeyMismatch(NameUnreadable):
    """A version of the tenant's name key other than the one a record says named it: the
    same number, issued again of other material after its record was deleted."""

    code = "name-key-mismatch"


class NameKeyVersionsExhausted(InvalidKeyState):
    """A rotation past the most versions a tenant's name key may have."""

    code = "name-key-versions-exhausted"


class NameKeyVersion(FrozenCamelModel):
    version: int = Field(ge=1)
    created_at: datetime
    wrapped_material: Base64Bytes = Field(repr=False)


class NameKeyRecord(FrozenCamelModel):
    tenant: str
    versions: list[NameKeyVersion] = Field(min_length=1)


def record_name(tenant: str) -> str:
    return f"{RECORD_PREFIX}{tenant}.json"


def material_aad(tenant: str, version: int) -> bytes:
    return f"{MATERIAL_AAD_PREFIX}|{tenant}|{version}".encode()


def _derive(material: bytes, label: str) -> bytes:
    return hmac.digest(material, b"sealstream/name-key/" + label.encode(), "sha256")


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class NameKey:
    """One version of a tenant's name key, unwrapped."""

    def __init__(self, tenant: str, version: int, material: bytes, created_at: datetime) -> None:
        self.tenant = tenant
        self.version = version
        self.created_at = created_at
        self.fingerprint = _derive(material, "fingerprint")[:16].hex()
        self._siv = AESSIV(_derive(material, "siv-1") + _derive(material, "siv-2"))
        self._mac_key = _derive(material, "plaintext-mac")

    def __repr__(self) -> str:
        return f"NameKey({self.tenant}, v{self.version})"

    def encrypt_name(self, path: str, bucket: str, prefix: str) -> str:
        """`path`'s object name under `prefix`: lowercase base32 of its AES-SIV, cut by
        '/' into segments of at most `SEGMENT_CHARS`; `NameTooLong` past 1,024 bytes."""
        plain = path.encode()
        padded = plain + b"\x00" * (-len(plain) % NAME_PAD)
        sealed = self._siv.encrypt(padded, self._place(bucket, prefix))
        text = base64.b32encode(sealed).decode("ascii").rstrip("=").lower()
        name = "/".join(text[i : i + SEGMENT_CHARS] for i in range(0, len(text), SEGMENT_CHARS))
        if len(name) > MAX_NAME_BYTES:
            raise NameTooLong(f"the encrypted name would be {len(name)} bytes, over 1024")
        return name

    def decrypt_name(self, name: str, bucket: str, prefix: str) -> str:
        """The path `encrypt_name` made `name` of; `NameUnreadable` otherwise."""
        text = name.replace("/", "").upper()
        try:
            sealed = base64.b32decode(text + "=" * (-len(text) % 8))
            return self._siv.decrypt(sealed, self._place(bucket, prefix)).rstrip(b"\x00").decode()
        except (ValueError, InvalidTag):
            raise NameUnreadable("not a name this key made for this place") from None

    def plaintext_mac(self, bucket: str, storage_key: str, size: int, sha256: str) -> str:
        """What an object's record holds of its plaintext: bound to the object's place."""
        message = b"".join(
            [
                b"sealstream/plaintext-mac/v1\x00",
                *(_lp(part.encode()) for part in (self.tenant, bucket, storage_key)),
                struct.pack(">Q", size),
                bytes.fromhex(sha256),
            ]
        )
        return hmac.digest(self._mac_key, message, "sha256").hex()

    def _place(self, bucket: str, prefix: str) -> list[bytes]:
        return [self.tenant.encode(), bucket.encode(), prefix.encode()]


class NameKeys:
    """Every tenant's name keys, each of at most `max_versions` versions; thread-safe.
    `count_wrap` counts a wrap a KEK drawing random IVs is about to make, as for key
    material."""

    def __init__(
        self,
        records: Records,
        kek: Kek,
        count_wrap: Callable[[], None],
        max_versions: int = DEFAULT_MAX_VERSIONS,
    ) -> None:
        self._records = records
        self._kek = kek
        self._count_wrap = count_wrap
        self._max_versions = max_versions
        self._lock = threading.Lock()
        self._unwrapped: dict[tuple[str, int], NameKey] = {}

    def current(self, tenant: str) -> NameKey:
        """The tenant's newest name key version, made (version 1) if it has none."""
        record = self._read_or_create(tenant)
        return self._key(record, record.versions[-1])

    def version(self, tenant: str, version: int, fingerprint: str | None = None) -> NameKey:
        """Version `version` of the tenant's name key; `NameUnreadable` if it has none,
        `NameKeyMismatch` if its fingerprint is not `fingerprint` (where one was recorded)."""
        key = self._unwrapped.get((tenant, version)) or self._stored_version(tenant, version)
        if fingerprint is not None and not hmac.compare_digest(key.fingerprint, fingerprint):
            raise NameKeyMismatch(
                f"the tenant's name key version {version} is not the one recorded: "
                "its record was deleted and the version issued again"
            )
        return key

    def _stored_version(self, tenant: str, version: int) -> NameKey:
        try:
            record = self._records.get(RECORD_KIND, record_name(tenant), NameKeyRecord)
        except ObjectNotFound:
            raise NameUnreadable("the tenant has no name key") from None
        self._checked(tenant, record)
        for entry in record.versions:
            if entry.version == version:
                return self._key(record, entry)
        raise NameUnreadable(f"the tenant has no name key version {version}")

    def record(self, tenant: str) -> NameKeyRecord | None:
        """The tenant's name key record (versions and dates, the material wrapped), if it
        has one."""
        check_tenant(tenant)
        try:
            return self._checked(
                tenant, self._records.get(RECORD_KIND, record_name(tenant), NameKeyRecord)
            )
        except ObjectNotFound:
            return None

    def rotate(self, tenant: str) -> NameKeyRecord:
        """Add a version after the tenant's newest, which names what runs name from now on
        (version 1 if it has none); every earlier version is kept, for the names and
        records made under it."""
        check_tenant(tenant)
        name = record_name(tenant)
        for attempt in range(UPDATE_ATTEMPTS):
            try:
                etag = self._records.store.head(name).etag  # before the read: a change wins
            except ObjectNotFound:
                etag = None
            record = self.record(tenant) if etag is not None else None
            if record is not None and len(record.versions) >= self._max_versions:
                raise NameKeyVersionsExhausted(
                    f"the name key has {len(record.versions)} versions, the most it may have"
                )
            rotated = self._with_version(tenant, record)
            try:
                if etag is None:
                    self._records.put(RECORD_KIND, name, rotated, if_absent=True)
                else:
                    self._records.put(RECORD_KIND, name, rotated, if_match=etag)
            except (PreconditionFailed, ObjectNotFound):  # ObjectExists is one
                back_off(attempt)
                continue
            return rotated
        raise ConcurrentUpdate("the name key record kept changing")

    def _read_or_create(self, tenant: str) -> NameKeyRecord:
        check_tenant(tenant)
        name = record_name(tenant)
        for attempt in range(UPDATE_ATTEMPTS):
            try:
                return self._checked(tenant, self._records.get(RECORD_KIND, name, NameKeyRecord))
            except ObjectNotFound:
                pass
            record = self._with_version(tenant, None)
            try:
                self._records.put(RECORD_KIND, name, record, if_absent=True)
            except ObjectExists:  # another process made it first: read theirs
                back_off(attempt)
                continue
            return record
        raise ConcurrentUpdate("the name key record kept changing")

    @staticmethod
    def _checked(tenant: str, record: NameKeyRecord) -> NameKeyRecord:
        # The MAC binds the record to its name, hence its tenant; the field must agree.
        if record.tenant != tenant:
            raise NameUnreadable("the name key record is another tenant's")
        return record

    def _with_version(self, tenant: str, record: NameKeyRecord | None) -> NameKeyRecord:
        """`record` with a new version after its newest (a record of version 1 if None)."""
        versions = [] if record is None else record.versions
        version = versions[-1].version + 1 if versions else 1
        if self._kek.draws_random_ivs:
            self._count_wrap()
        wrapped = self._kek.wrap(os.urandom(MATERIAL_LENGTH), material_aad(tenant, version))
        added = NameKeyVersion(
            version=version, created_at=datetime.now(UTC), wrapped_material=wrapped
        )
        return NameKeyRecord(tenant=tenant, versions=[*versions, added])

    def _key(self, record: NameKeyRecord, entry: NameKeyVersion) -> NameKey:
        cached = self._unwrapped.get((record.tenant, entry.version))
        if cached is not None:
            return cached
        material = self._kek.unwrap(
            entry.wrapped_material, material_aad(record.tenant, entry.version)
        )
        key = NameKey(record.tenant, entry.version, material, entry.created_at)
        with self._lock:
            return self._unwrapped.setdefault((record.tenant, entry.version), key)
