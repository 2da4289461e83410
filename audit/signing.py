"""The audit signing key: an Ed25519 key pair whose private half is kept in the bucket
wrapped under the KEK (a sealed record), and whose public half lets an auditor check the
trail's checkpoints without the KEK (`sealstream audit public-key` prints it).

The first process that needs it, on a store with no trail yet, generates it and stores
it with a conditional write, so processes racing to create it end up with the same one.
Once the trail has segments, the key is never made again on its own: a record gone
missing then is tampering (an alarm, and `SigningKeyMissing`, so the trail cannot be
written and the service fails closed), and only the operator starts a new key
(`new_key`, by `sealstream audit new-signing-key`), which keeps the public halves of
the keys before it for `verify` to check the older segments with.
"""

import base64
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime

from audit.alarms import raise_alarm
from audit.chain import EVENTS_PREFIX, checkpoint_message, unb64
from keystore import Kek
from storage import ObjectExists, ObjectNotFound
from storage.documents import FrozenCamelModel
from storage.integrity import Records

SIGNING_KEY_KIND = "audit-signing-key"
SIGNING_KEY_NAME = "sealstream/audit/signing-key.json"
KEY_MISSING = "signing-key-missing"


class SigningKeyMissing(Exception):
    """The trail has segments, but the signing key's record is gone."""


class SigningKeyPresent(Exception):
    """A new signing key was asked for while the store has one."""


class SigningKeyRecord(FrozenCamelModel):
    """The signing key as stored: its private half wrapped under the KEK, and the public
    halves of the keys it replaced."""

    wrapped_private_key: str
    public_key: str  # raw Ed25519, base64
    created_at: AwareDatetime
    previous_public_keys: tuple[str, ...] = ()


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
            self._check_no_trail()
            record = self._create(())
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
        return _public_key(self._stored().public_key)

    def stored_public_keys(self) -> list[Ed25519PublicKey]:
        """The stored key's public half, then those of the keys it replaced."""
        record = self._stored()
        return [_public_key(key) for key in (record.public_key, *record.previous_public_keys)]

    def trail_exists(self) -> bool:
        return next(iter(self._records.store.list(EVENTS_PREFIX)), None) is not None

    def new_key(self, previous: Sequence[Ed25519PublicKey]) -> Ed25519PublicKey:
        """Start a new signing key where the stored one has gone missing, keeping the
        public halves of `previous` keys (the lost one's, as exported before) for checking
        older segments; `SigningKeyPresent` if the store has a key."""
        try:
            self._stored()
        except ObjectNotFound:
            kept = tuple(base64.b64encode(raw_public(key)).decode("ascii") for key in previous)
            return _public_key(self._create(kept).public_key)
        raise SigningKeyPresent("the store has an audit signing key: nothing to replace")

    def sign(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        signature = self._private_key.sign(checkpoint_message(checkpoint))
        return {**checkpoint, "signature": base64.b64encode(signature).decode("ascii")}

    @property
    def _aad(self) -> bytes:
        return b"sealstream/audit-signing-key/v1\x00" + self._records.store_id.encode()

    def _stored(self) -> SigningKeyRecord:
        return self._records.get(SIGNING_KEY_KIND, SIGNING_KEY_NAME, SigningKeyRecord)

    def _check_no_trail(self) -> None:
        """Refuse to make a key of its own where a trail exists: its key was deleted."""
        if self.trail_exists():
            raise_alarm(
                KEY_MISSING,
                "the audit signing key's record is gone while the trail has segments: "
                "someone deleted it; nothing is audited until the operator runs "
                "`sealstream audit new-signing-key`",
            )
            raise SigningKeyMissing(
                "the audit signing key's record is gone while the trail has segments "
                "(run `sealstream audit new-signing-key`)"
            )

    def _create(self, previous_public_keys: tuple[str, ...]) -> SigningKeyRecord:
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        record = SigningKeyRecord(
            wrapped_private_key=base64.b64encode(self._kek.wrap(raw, self._aad)).decode("ascii"),
            public_key=base64.b64encode(raw_public(private.public_key())).decode("ascii"),
            created_at=datetime.now(UTC),
            previous_public_keys=previous_public_keys,
        )
        try:
            self._records.put(SIGNING_KEY_KIND, SIGNING_KEY_NAME, record, if_absent=True)
        except ObjectExists:
            return self._stored()  # another process made it first: use that one
        return record


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """A public key's name in events: the SHA-256 of its raw bytes."""
    return "sha256:" + hashlib.sha256(raw_public(key)).hexdigest()


def _public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


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
    except (InvalidSignature, ValueError, TypeError):  # no canonical form: never signed
        return False
    return True
