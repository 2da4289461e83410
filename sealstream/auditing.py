"""`sealstream audit verify` and `sealstream audit public-key`, against the store the
settings name: the trail is read from the bucket directly, not through a running API.

With the KEK, every event's MAC is checked and the public key comes from the store's
sealed signing-key record; with `--public-key` alone (an auditor's case) the KEK is never
touched, and the signed checkpoints and the hash chain are checked. The checkpoints a
sink holds are read from Redis or the checkpoint bucket as configured, or, for the
`stdout` sink, from the shipped log lines given as a file.
"""

from pathlib import Path
from typing import Any

from audit import (
    AUDIT_KEY_PURPOSE,
    AuditSigner,
    Report,
    checkpoint_lines,
    load_public_key,
    public_pem,
    verify_trail,
)
from sealstream.settings import Settings
from sealstream.wiring import (
    ConfigurationError,
    open_checkpoint_sink,
    open_kek,
    open_object_store,
    open_service_records,
)
from storage import ObjectNotFound


def verify_audit(
    settings: Settings, *, public_key_file: Path | None, checkpoints_file: Path | None
) -> Report:
    """Check the trail in the store `settings` name (see the module docstring)."""
    objects = open_object_store(settings)
    if public_key_file is not None:
        try:
            public_key = load_public_key(public_key_file.read_bytes())
        except (OSError, ValueError) as error:
            raise ConfigurationError(f"--public-key: {error}") from None
        audit_key = None
    else:
        kek = open_kek(settings)
        records = open_service_records(settings, objects, kek)
        try:
            public_key = AuditSigner(records, kek).stored_public_key()
        except ObjectNotFound:
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
        objects, audit_key=audit_key, public_key=public_key, checkpoints=checkpoints
    )


def audit_public_key(settings: Settings) -> bytes:
    """The audit signing key's public half (PEM), made now if the store has none yet."""
    objects = open_object_store(settings)
    kek = open_kek(settings)
    return public_pem(AuditSigner(open_service_records(settings, objects, kek), kek).public_key)
