"""Key-encryption keys (KEKs): what wraps key material before it is stored.

`Kek` is the interface; `LocalKek` holds a 32-byte key from configuration and wraps with
AES-256-GCM; `KmsKek` asks AWS KMS to encrypt and decrypt. Both bind each blob to an AAD
(the record's identity), so a wrapped blob cannot be moved to another key, tenant or
version. Failures raise `KekError`, whose message never holds material.

Each also yields the record key, under which the service authenticates the records it
keeps in the bucket (`storage.integrity`): derived from a local KEK, so nothing needs
storing; with KMS, a data key generated once and kept in the bucket wrapped by KMS.
"""

import logging
import os
import stat
import uuid
from abc import ABC, abstractmethod
from base64 import b64decode
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keystore.errors import KekError

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

KEK_LENGTH = 32
_LOCAL_BLOB_VERSION = b"\x01"
_NONCE_LENGTH = 12
_TAG_LENGTH = 16
_KMS_CONTEXT_KEY = "sealstream:record"
RECORD_KEY_LENGTH = 32
# What the record key is bound to (with the store's id): HKDF's info for a local KEK, the
# encryption context of a KMS one.
RECORD_KEY_LABEL = b"sealstream/record-key/v1"


class Kek(ABC):
    """Wraps and unwraps key material, each blob bound to an AAD."""

    # Whether each wrap draws a random IV under the one KEK, so that its wraps must be
    # counted (`keystore.kek_wraps`).
    draws_random_ivs: ClassVar[bool]

    @abstractmethod
    def wrap(self, material: bytes, aad: bytes) -> bytes:
        """An opaque blob that only `unwrap` with the same `aad` opens."""

    @abstractmethod
    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """The material inside `blob`; `KekError` if it does not open under `aad`."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: `KekError` when the KEK cannot be used."""

    @abstractmethod
    def record_key(self, store: str, wrapped: bytes | None) -> tuple[bytes, bytes | None]:
        """The record key of the store whose id is `store`, and what must be stored to get
        it back (None if nothing): from `wrapped`, what an earlier call returned, or new
        if that is None. Another store's id gives another key, so stores that share a KEK
        (a clone restored from a backup, say) cannot pass their records off as each
        other's."""


class LocalKek(Kek):
    """AES-256-GCM under a configured key; blob = version byte, 12-byte nonce, ciphertext+tag."""

    draws_random_ivs = True

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_LENGTH:
            raise KekError(f"a local KEK takes {KEK_LENGTH} bytes, not {len(key)}")
        self._key = key
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "LocalKek(<redacted>)"

    @classmethod
    def from_encoded(cls, data: bytes | str) -> "LocalKek":
        """A KEK from 32 raw bytes, or from text (a file's content or an environment
        variable) holding 64 hex digits or standard base64 of 32 bytes."""
        if isinstance(data, bytes):
            if len(data) == KEK_LENGTH:
                return cls(data)
            try:
                data = data.decode("ascii")
            except UnicodeDecodeError:
                raise _unreadable_kek() from None
        text = data.strip()
        try:
            key = (
                bytes.fromhex(text)
                if len(text) == 2 * KEK_LENGTH
                else b64decode(text, validate=True)
            )
        except ValueError:
            raise _unreadable_kek() from None
        return cls(key)

    @classmethod
    def from_file(cls, path: str | Path) -> "LocalKek":
        """A KEK read from `path` (see `from_encoded` for the accepted forms), which no one
        but its owner may read or write."""
        try:
            with Path(path).open("rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                data = file.read()
        except OSError as error:
            raise KekError(f"cannot read the KEK file {path}: {error.strerror}") from None
        if stat.S_IMODE(mode) & 0o077:
            raise KekError(
                f"the KEK file {path} is open to its group or others "
                f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it"
            )
        return cls.from_encoded(data)

    @classmethod
    def load_or_create(cls, path: str | Path) -> "LocalKek":
        """The KEK in `path`, first writing 32 random raw bytes there (mode 0600) if the
        file does not exist: the embedded default's self-provisioned KEK."""
        path = Path(path)
        if path.exists():
            return cls.from_file(path)
        key = os.urandom(KEK_LENGTH)
        # Written aside and linked into place, so a concurrent reader never sees a partial
        # file and of two creators the first link wins.
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with temp.open("xb") as file:
                temp.chmod(0o600)
                file.write(key)
                file.flush()
                os.fsync(file.fileno())
            path.hardlink_to(temp)
        except FileExistsError:
            return cls.from_file(path)
        except OSError as error:
            raise KekError(f"cannot create the KEK file {path}: {error.strerror}") from None
        finally:
            temp.unlink(missing_ok=True)
        return cls(key)

    def wrap(self, material: bytes, aad: bytes) -> bytes:
        # A random 96-bit nonce under the one KEK: unique with overwhelming probability
        # only while the KEK wraps at most 2^32 times (NIST SP 800-38D, 8.3), once per key
        # version created, imported or rotated. The key store counts them and stops at
        # half that (`keystore.kek_wraps`).
        nonce = os.urandom(_NONCE_LENGTH)
        return _LOCAL_BLOB_VERSION + nonce + self._aead.encrypt(nonce, material, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        if not blob.startswith(_LOCAL_BLOB_VERSION) or len(blob) < 1 + _NONCE_LENGTH + _TAG_LENGTH:
            raise KekError("the wrapped material is not a local KEK blob")
        nonce, sealed = blob[1 : 1 + _NONCE_LENGTH], blob[1 + _NONCE_LENGTH :]
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise KekError(
                "the wrapped material does not open under this KEK for this record"
            ) from None

    def check(self) -> None:
        """Nothing can go wrong after construction: the key is in memory."""

    def record_key(self, store: str, wrapped: bytes | None) -> tuple[bytes, bytes | None]:
        # HKDF with its own label: the KEK itself only ever keys AES-GCM wraps.
        info = record_key_binding(store)
        hkdf = HKDF(hashes.SHA256(), RECORD_KEY_LENGTH, salt=None, info=info)
        return hkdf.derive(self._key), None


class KmsKek(Kek):
    """AWS KMS Encrypt / Decrypt under `key_id`, the AAD carried as the encryption context.

    Material is at most ≈ 2.4 KB (RSA-4096 PKCS#8), within Encrypt's 4 KiB plaintext limit,
    so no data key is needed. KMS draws its own IVs.
    """

    draws_random_ivs = False

    def __init__(self, key_id: str, client: "KMSClient") -> None:
        self.key_id = key_id
        self._client = client
        _keep_kms_plaintext_out_of_botocore_logs()

    def __repr__(self) -> str:
        return f"KmsKek({self.key_id!r})"

    def wrap(self, material: bytes, aad: bytes) -> bytes:
        try:
            response = self._client.encrypt(
                KeyId=self.key_id, Plaintext=material, EncryptionContext=_kms_context(aad)
            )
        except (BotoCoreError, ClientError) as error:
            raise KekError(f"KMS Encrypt failed: {_describe(error)}") from None
        return response["CiphertextBlob"]

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        try:
            response = self._client.decrypt(
                KeyId=self.key_id, CiphertextBlob=blob, EncryptionContext=_kms_context(aad)
            )
        except (BotoCoreError, ClientError) as error:
            raise KekError(f"KMS Decrypt failed: {_describe(error)}") from None
        return response["Plaintext"]

    def check(self) -> None:
        try:
            metadata = self._client.describe_key(KeyId=self.key_id)["KeyMetadata"]
        except (BotoCoreError, ClientError) as error:
            raise KekError(f"KMS DescribeKey failed: {_describe(error)}") from None
        usable = metadata.get("KeyState") == "Enabled" and "SYMMETRIC_DEFAULT" in metadata.get(
            "EncryptionAlgorithms", []
        )
        if not usable:
            raise KekError(f"the KMS key {self.key_id!r} is not an enabled encryption key")

    def record_key(self, store: str, wrapped: bytes | None) -> tuple[bytes, bytes | None]:
        binding = record_key_binding(store)
        if wrapped is not None:
            return self.unwrap(wrapped, binding), wrapped
        try:
            response = self._client.generate_data_key(
                KeyId=self.key_id,
                NumberOfBytes=RECORD_KEY_LENGTH,
                EncryptionContext=_kms_context(binding),
            )
        except (BotoCoreError, ClientError) as error:
            raise KekError(f"KMS GenerateDataKey failed: {_describe(error)}") from None
        return response["Plaintext"], response["CiphertextBlob"]


class _DropKmsPlaintext(logging.Filter):
    """Drops botocore records that carry a KMS request's or response's `Plaintext`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Plaintext" not in record.getMessage()


_KMS_PLAINTEXT_FILTER = _DropKmsPlaintext()


def _keep_kms_plaintext_out_of_botocore_logs() -> None:
    # At DEBUG, botocore logs every request's parameters and every response's body; for
    # KMS Encrypt and Decrypt those hold the key material itself.
    for name in ("botocore.endpoint", "botocore.parsers"):
        logger = logging.getLogger(name)
        if _KMS_PLAINTEXT_FILTER not in logger.filters:
            logger.addFilter(_KMS_PLAINTEXT_FILTER)


def record_key_binding(store: str) -> bytes:
    """What a store's record key is bound to; '|' cannot occur in the label."""
    return RECORD_KEY_LABEL + b"|" + store.encode("utf-8")


def _unreadable_kek() -> KekError:
    return KekError(
        f"a local KEK is {KEK_LENGTH} raw bytes, 64 hex digits or base64 of {KEK_LENGTH} bytes"
    )


def _kms_context(aad: bytes) -> dict[str, str]:
    return {_KMS_CONTEXT_KEY: aad.decode("utf-8")}


def _describe(error: BotoCoreError | ClientError) -> str:
    """The error's code and the service's message; botocore's own messages (parameter
    validation) may quote request values, so those are named by type only."""
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"{details.get('Code', '?')}: {details.get('Message', '')}"
    return type(error).__name__
