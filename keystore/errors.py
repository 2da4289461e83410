"""The exceptions the keystore raises: one hierarchy, rooted at `KeystoreError`.

Every class carries a stable kebab-case `code` that the API exposes in its problem
documents, so clients can branch on the code and never on the message. Messages name
keys, tenants and versions, never key material.
"""

from typing import ClassVar


class KeystoreError(Exception):
    """Base class of every error raised by the `keystore` package."""

    code: ClassVar[str] = "keystore-error"


class InvalidArgument(KeystoreError, ValueError):
    """A request argument is malformed or out of range (the caller's fault)."""

    code = "invalid-argument"


class InvalidTenant(InvalidArgument):
    """A tenant name that cannot name a key store partition."""

    code = "invalid-tenant"


class InvalidPendingWindow(InvalidArgument):
    """A deletion pending window outside the allowed days."""

    code = "invalid-pending-window"


class InvalidKeySpec(InvalidArgument):
    """A key specification (generate or import) that cannot be honoured."""

    code = "invalid-key-spec"


class UnsupportedKeyType(InvalidKeySpec):
    code = "unsupported-key-type"


class UnsupportedAlgorithm(InvalidKeySpec):
    code = "unsupported-algorithm"


class AlgorithmMismatch(InvalidKeySpec):
    """The algorithm exists, but belongs to another key type."""

    code = "algorithm-mismatch"


class InvalidKeyOps(InvalidKeySpec):
    code = "invalid-key-ops"


class MixedKeyOps(InvalidKeyOps):
    """keyOps that would both encrypt and sign with one key pair."""

    code = "mixed-key-ops"


class InvalidKid(InvalidKeySpec):
    code = "invalid-kid"


class InvalidKeySize(InvalidKeySpec):
    code = "invalid-key-size"


class InvalidJwk(InvalidKeySpec):
    """Imported key material that is malformed, inconsistent or of the wrong size."""

    code = "invalid-jwk"


class InvalidRotationPeriod(InvalidKeySpec):
    code = "invalid-rotation-period"


class InvalidExpiry(InvalidKeySpec):
    code = "invalid-expiry"


class InvalidUsageLimit(InvalidKeySpec):
    """Usage limits that cannot go together (a soft limit above the maximum, say)."""

    code = "invalid-usage-limit"


class KeyNotFound(KeystoreError):
    """No such key (or key version) for this tenant."""

    code = "key-not-found"


class KeyMismatch(KeystoreError):
    """A message is not sealed for the key the caller said it is."""

    code = "key-mismatch"


class KeyExists(KeystoreError):
    """A key with this kid already exists for this tenant."""

    code = "key-exists"


class InvalidKeyState(KeystoreError):
    """The key's state does not allow the operation (e.g. rotating a disabled key)."""

    code = "invalid-key-state"


class KeyDisabled(InvalidKeyState):
    code = "key-disabled"


class KeyPendingDeletion(InvalidKeyState):
    code = "key-pending-deletion"


class KeyExpired(InvalidKeyState):
    code = "key-expired"


class KeyVersionRetired(InvalidKeyState):
    """A retired version: it seals and opens nothing, and its material is (or is to be)
    destroyed."""

    code = "key-version-retired"


class VersionNotRetired(InvalidKeyState):
    """A retirement cancelled of a version that is not retired."""

    code = "version-not-retired"


class PrimaryVersion(InvalidKeyState):
    """The primary version cannot be retired: rotate first."""

    code = "version-is-primary"


class KeyVersionWornOut(InvalidKeyState):
    """The key's primary version has wrapped as many data keys as random IVs safely
    allow under one AES key: the key must rotate before it encrypts again."""

    code = "key-version-worn-out"


class KeyUsageExhausted(KeystoreError):
    """The key has been used `maxUsageLimit` times: it no longer encrypts (it still
    decrypts)."""

    code = "key-usage-exhausted"


class OperationNotPermitted(KeystoreError):
    """The key's keyOps do not include the operation."""

    code = "operation-not-permitted"


class NotForStreams(OperationNotPermitted):
    """The key's algorithm cannot sign or verify a stream in one pass (Ed25519)."""

    code = "not-for-streams"


class KeyNotExportable(KeystoreError):
    code = "key-not-exportable"


class ExportabilityIsOneWay(KeystoreError):
    """A non-exportable key can never become exportable."""

    code = "exportability-is-one-way"


class ConcurrentUpdate(KeystoreError):
    """Other writers kept changing the record; the update was given up after retries."""

    code = "concurrent-update"


class CorruptRecord(KeystoreError):
    """A stored record that does not parse or does not belong where it is stored."""

    code = "corrupt-record"


class KekError(KeystoreError):
    """The key-encryption key could not wrap or unwrap material, or is unusable."""

    code = "kek-error"
