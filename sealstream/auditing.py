"""`sealstream audit verify`, `sealstream audit public-key` and `sealstream audit
new-signing-key`, against the store the settings name: the trail is read from the bucket
directly, not through a running API.

With the KEK, every event's MAC is checked and the public keys come from the store's
sealed signing-key record; with `--public-key` alone (an auditor's case) the KEK is never
touched, and the signed checkpoints and the hash chain are checked. The checkpoints a
sink holds are read from Redis or the checkpoint bucket as configured, or, for the
`stdout` sink, from the shipped log lines given as a file.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit import (
    AUDIT_KEY_PURPOSE,
    AuditSigner,
    Report,
    checkpoint_lines,
    load_public_key,
    public_pem,
    verify_trail,
)
from audit.signing import SigningKeyMissing, SigningKeyPresent, fingerprint
from sealstream.settings import Settings
from sealstream.wiring import (
    ConfigurationError,
    open_audit,
    open_checkpoint_sink,
    open_kek,
    open_object_store,
    open_service_records,
)
from storage import ObjectNotFound

MISSING_KEY = (
    "the audit signing key's record is gone, though the trail has segments: someone deleted "
    "it. Check the trail with --public-key (the key exported before), and start a new key "
    "with `sealstream audit new-signing-key --previous-public-key FILE`"
)


def verify_audit(
    settings: Settings, *, public_key_files: Sequence[Path], checkpoints_file: Path | None
) -> Report:
    """Check the trail in the store `settings` name (see the module docstring)."""
    objects = open_object_store(settings)
    if public_key_files:
        public_keys = _public_keys("--public-key", public_key_files)
        audit_key = None
    else:
        kek = open_kek(settings)
        records = open_service_records(settings, objects, kek)
        signer = AuditSigner(records, kek)
        try:
            public_keys = signer.stored_public_keys()
        except ObjectNotFound:
            if signer.trail_exists():
                raise ConfigurationError(MISSING_KEY) from None
            raise ConfigurationError(
                "the store has no audit signing key: nothing audited"
            ) from None
        audit_key = records.key.derive(AUDIT_KEY_PURPOSE)
    checkpoints: list[dict[str, Any]] | None = None
    if checkpoints_file is not None:
        with checkpoints_file.open(encoding="utf-8", errors="replace") as lines:
            checkpoints = checkpoint_lines(lines)
    else:
        sink = None if settings.audit_checkpoints == "stdout" else open_checkpoint_sink(settings)
        if sink is not None:
            checkpoints = sink.checkpoints()
    return verify_trail(
        objects, audit_key=audit_key, public_keys=public_keys, checkpoints=checkpoints
    )


def audit_public_key(settings: Settings) -> bytes:
    """The audit signing key's public half (PEM), made now if the store has no trail yet."""
    objects = open_object_store(settings)
    kek = open_kek(settings)
    try:
        return public_pem(AuditSigner(open_service_records(settings, objects, kek), kek).public_key)
    except SigningKeyMissing:
        raise ConfigurationError(MISSING_KEY) from None


def new_signing_key(settings: Settings, previous_key_files: Sequence[Path]) -> str:
    """Start a new audit signing key in place of one whose record is gone, keeping the
    public halves of `previous_key_files` for verify; recorded as an event in a chain of
    its own. The new key's fingerprint."""
    previous = _public_keys("--previous-public-key", previous_key_files)
    objects = open_object_store(settings)
    kek = open_kek(settings)
    records = open_service_records(settings, objects, kek)
    try:
        key = AuditSigner(records, kek).new_key(previous)
    except SigningKeyPresent as error:
        raise ConfigurationError(str(error)) from None
    trail = open_audit(settings, records, kek, "operator")
    trail.record(
        {
            "type": "signing-key",
            "action": "new-signing-key",
            "publicKey": fingerprint(key),
            "previousPublicKeys": [fingerprint(old) for old in previous],
        }
    )
    written = trail.flush()
    trail.close()
    if not written:
        raise ConfigurationError("the new signing key is made, but its event could not be written")
    return fingerprint(key)


def _public_keys(option: str, files: Sequence[Path]) -> list[Ed25519PublicKey]:
    try:
        return [load_public_key(file.read_bytes()) for file in files]
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"{option}: {error}") from None
