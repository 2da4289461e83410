"""The key a message is sealed or opened under, looked up once per message (and counted
as one use of its version) and checked again while a stream runs; and the
encryption-context pairs the service binds into every message it seals.

The service adds `sealstream:` pairs naming the tenant and the key, so a message names its
owner in authenticated data and can be refused to anyone else; and, for a message bound
for storage, the storage key it is written at, so that a copy of it put anywhere else is
refused (`services.objects.check_placement`). A client's own pairs may not use the prefix.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from anyio import to_thread

from envelope import PROVIDER_ID, Encryptor, Header, Keyring, key_names
from envelope.context import RESERVED_PREFIX as ESDK_RESERVED_PREFIX
from keystore import KeyNotFound, KeyRecord, KeyStore, Uses
from keystore.material import KEY_NAME_PATTERN
from services.provenance import Provenance, Verdict

RESERVED_CONTEXT_PREFIX = "sealstream:"
TENANT_CONTEXT_KEY = f"{RESERVED_CONTEXT_PREFIX}tenant"
OBJECT_CONTEXT_KEY = f"{RESERVED_CONTEXT_PREFIX}object"
KEY_CHECK_INTERVAL = 1.0  # seconds between checks that a streaming key is still usable


@dataclass(frozen=True)
class Recipient:
    """A further key a message is sealed for, beside its first: the primary version of a
    key of the tenant's, counted as a use of it; or a public key the service does not hold
    (`record` and `uses` None), named by its JWK thumbprint."""

    keyring: Keyring
    alg: str
    record: KeyRecord | None = None
    uses: Uses | None = None


@dataclass
class Sealing:
    """A message being written under a key's primary version (and perhaps for others)."""

    tenant: str
    key: KeyRecord
    keyring: Keyring
    encryptor: Encryptor
    uses: Uses  # the key's, this message counted
    others: tuple[Recipient, ...] = ()

    @property
    def key_names(self) -> list[str]:
        """The name of every key the message is sealed for, the first key's first."""
        return [self.keyring.key_name, *(other.keyring.key_name for other in self.others)]


def start_sealing(
    keys: KeyStore,
    tenant: str,
    kid: str,
    context: Mapping[str, str],
    frame_length: int,
    *,
    object_key: str | None = None,
    signed: bool = False,
    more_kids: Sequence[str] = (),
    partners: Sequence[tuple[Keyring, str]] = (),
) -> Sealing:
    """Check the key may encrypt now, and start a message under its primary version,
    counted as a use of it, with the service's pairs added to `context`, its proof of
    provenance among them; for a message bound for storage, naming the storage key it is
    written at (`object_key`). `signed`: a signed message (suite 0x0578).

    The message is sealed for the primary versions of `more_kids` too (each counted as a
    use of its key) and for `partners`, keyrings (and their algorithms) of public keys
    the service does not hold: any one of them opens it.

    A message is signed, whatever `signed` says, when a recipient's key may be known
    outside the service (a partner's, an imported key, one ever exportable): its holder
    learns the data key, and only the discarded signing key keeps them from writing
    other frames under the service's proof."""
    record, keyring, uses = keys.sealing_keyring(tenant, kid)
    others = [
        Recipient(k, r.alg, r, u)
        for r, k, u in (keys.sealing_keyring(tenant, m) for m in more_kids)
    ]
    others += [Recipient(partner, alg) for partner, alg in partners]
    sealed_context = {
        **context,
        TENANT_CONTEXT_KEY: tenant,
        f"{RESERVED_CONTEXT_PREFIX}kid": kid,
        f"{RESERVED_CONTEXT_PREFIX}key-version": str(record.primary_version),
    }
    if object_key is not None:
        sealed_context[OBJECT_CONTEXT_KEY] = object_key
    encryptor = Encryptor(
        [keyring, *(other.keyring for other in others)],
        context=sealed_context,
        frame_length=frame_length,
        signed=signed or known_outside(record, others),
        endorse=provenance(keys).endorse,
    )
    return Sealing(tenant, record, keyring, encryptor, uses, tuple(others))


def known_outside(record: KeyRecord, others: Sequence[Recipient]) -> bool:
    """Whether the key of any recipient of a message may be known outside the service: a
    partner's, or one of the tenant's imported or ever exportable."""
    return record.may_be_known_outside or any(
        other.record is None or other.record.may_be_known_outside for other in others
    )


def required_context(context: Mapping[str, str], tenant: str) -> dict[str, str]:
    """What a decrypt demands: the caller's pairs, and that the message is the tenant's."""
    return {**context, TENANT_CONTEXT_KEY: tenant}


def client_context(context: Mapping[str, str]) -> dict[str, str]:
    """A message's context without the pairs the service or the format added (a signed
    message's public key): what its client gave."""
    reserved = (RESERVED_CONTEXT_PREFIX, ESDK_RESERVED_PREFIX)
    return {k: v for k, v in context.items() if not k.startswith(reserved)}


def provenance(keys: KeyStore) -> Provenance:
    """The proofs that a message is this service's, under the store's key for them."""
    return Provenance(keys.message_proof_key())


def proven_by_proof(
    keys: KeyStore, tenant: str, header: Header, opener: KeyRecord, *, refuse_unproven: bool
) -> Verdict:
    """What an authenticated header, opened under `opener`'s key, proves this service's
    (`services.provenance`): the message read whole, and any part of it; refuses an
    invalid proof, and, if `refuse_unproven`, an unproven message."""
    held = partial(_held_only_here, keys, tenant, opener)
    return provenance(keys).proven(header, held, refuse_unproven=refuse_unproven)


def _held_only_here(
    keys: KeyStore, tenant: str, opener: KeyRecord, recipients: Sequence[tuple[str, bytes]]
) -> bool:
    """Whether every recipient is a key of the tenant's whose material only the service
    ever held; `opener`'s record is at hand, the others are read."""
    for provider, name in recipients:
        match = KEY_NAME_PATTERN.fullmatch(name.decode("utf-8", "replace"))
        if provider != PROVIDER_ID or match is None:
            return False
        try:
            record = opener if match["kid"] == opener.kid else keys.get(tenant, match["kid"])
        except KeyNotFound:
            return False
        if record.may_be_known_outside:
            return False
    return True


@dataclass
class KeyWatch:
    """Re-checks, at most once per interval, that a key may still serve a running stream, so
    that disabling a key stops long transfers too (within the key cache's TTL)."""

    check: Callable[[], object]
    last: float = field(default_factory=time.monotonic)

    @classmethod
    def for_sealing(cls, keys: KeyStore, sealing: Sealing) -> "KeyWatch":
        """The watch on every key of the service's a message is being sealed for."""
        kids = [sealing.key.kid, *(o.record.kid for o in sealing.others if o.record)]
        return cls(partial(_check_encryption_keys, keys, sealing.tenant, kids))

    def due(self) -> bool:
        return time.monotonic() - self.last >= KEY_CHECK_INTERVAL

    def check_if_due(self) -> None:
        """Re-check now if the interval has passed: for a loop on a thread of its own (a
        job's); a stream on the event loop awaits the watch instead."""
        if self.due():
            self.check()
            self.last = time.monotonic()

    async def __call__(self) -> None:
        if self.due():
            await to_thread.run_sync(self.check_if_due)


def _check_encryption_keys(keys: KeyStore, tenant: str, kids: list[str]) -> None:
    for kid in kids:
        keys.encryption_keyring(tenant, kid)


@dataclass
class OpeningKeys:
    """The keyrings that may open a message, the key they are versions of, and its watch;
    `opened` counts the message once one of them has opened it."""

    key: KeyRecord
    keyrings: list[Keyring]
    watch: KeyWatch
    count: Callable[[KeyRecord, int], Uses]

    def opened(self, keyring: Keyring) -> Uses:
        """Count the message `keyring` (one of these) opened; the key's uses with it."""
        return self.count(self.key, version_of(keyring))


def version_of(keyring: Keyring) -> int:
    """The version of its key a keyring the key store made is (named `kid#version`)."""
    match = KEY_NAME_PATTERN.fullmatch(keyring.key_name)
    assert match is not None, "the key store names its keyrings kid#version"
    return int(match["version"])


def opening_keys(
    keys: KeyStore,
    tenant: str,
    header: Header,
    expected_kid: str | None = None,
    *,
    counted: bool = True,
) -> OpeningKeys:
    """The tenant's keyrings for the keys a message's header names (`kid#version`); the
    first usable one, which must be `expected_kid` if given. Unless `counted` is false
    (the verify job reading back what the service just wrote, which is no use of the
    key by anyone), opening the message counts as a use of its version."""
    record, keyrings = keys.opening_keyrings(tenant, key_names(header), expected_kid=expected_kid)
    watch = KeyWatch(partial(keys.decryption_keyrings, tenant, record.kid))
    return OpeningKeys(record, keyrings, watch, keys.count_opened if counted else _uncounted)


def _uncounted(record: KeyRecord, _version: int) -> Uses:
    return record.uses
