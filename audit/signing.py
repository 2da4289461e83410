"""The audit signing key: an Ed25519 key pair whose private half is kept in the bucket
wrapped under the KEK (a sealed record), and whose public half lets an auditor check the
trail's checkpoints without the KEK (`sealstream audit public-key` prints it).

The first process that needs it generates it and stores it with a conditional write, so
processes racing to create it end up with the same one.
"""

import base64
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime

from audit.chain import checkpoint_message, unb64
from keystore import Kek
from storage import ObjectExists, ObjectNotFound
from storage.documents import FrozenCamelModel
from storage.integrity import Records

SIGNING_KEY_KIND = "audit-signing-key"
SIGNING_KEY_NAME = "sealstream/audit/signing-key.json"


class SigningKeyRecord(FrozenCamelModel):
    """The signing key as stored: its private half wrapped under the KEK."""

    wrapped_private_key: str
    public_key: str  # raw Ed25519, base64
    created_at: AwareDatetime


class AuditSigner:
    """Signs checkpoints with the store's audit signing key, made on first use."""

    def __init__(self, records: Records, kek: Kek) -> None:
        self._records = records
        self._kek = kek

    @cached_property
    def _private_key(self) -> Ed25519PrivateKey:
        try:
            record = self._stored()
        except ObjectNotFound:
            record = self._create()
        raw = self._kek.unwrap(base64.b64decode(record.wrapped_private_key), self._aad)
        return Ed25519PrivateKey.from_private_bytes(raw)

    def load(self) -> None:
        """Find (or make) the signing key now, so that signing cannot fail later."""
        _ = self._private_key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def public_pem(self) -> bytes:
        return public_pem(self.public_key)

    def stored_public_key(self) -> Ed25519PublicKey:
        """The public half of the key already stored (`ObjectNotFound` if there is none):
        for checking, which must never make a key of its own."""
        raw = base64.b64decode(self._stored().public_key)
        return Ed25519PublicKey.from_public_bytes(raw)

    def sign(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        signature = self._private_key.sign(checkpoint_message(checkpoint))
        return {**checkpoint, "signature": base64.b64encode(signature).decode("ascii")}

    @property
    def _aad(self) -> bytes:
        return b"sealstream/audit-signing-key/v1\x00" + self._records.store_id.encode()

    def _stored(self) -> SigningKeyRecord:
        return self._records.get(SIGNING_KEY_KIND, SIGNING_KEY_NAME, SigningKeyRecord)

    def _create(self) -> SigningKeyRecord:
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        record = SigningKeyRecord(
            wrapped_private_key=base64.b64encode(self._kek.wrap(raw, self._aad)).decode("ascii"),
            public_key=base64.b64encode(public).decode("ascii"),
            created_at=datetime.now(UTC),
        )
        try:
            self._records.put(SIGNING_KEY_KIND, SIGNING_KEY_NAME, record, if_absent=True)
        except ObjectExists:
            return self._stored()  # another process made it first: use that one
        return record


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file; `ValueError` if it holds none."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def signed_by(key: Ed25519PublicKey, checkpoint: dict[str, Any]) -> bool:
    try:
        key.verify(unb64(checkpoint.get("signature")), checkpoint_message(checkpoint))
    except InvalidSignature:
        return False
    return True
