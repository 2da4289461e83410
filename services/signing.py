"""Sign, verify and re-sign a stream: detached JWS signatures (`envelope.jws`) over the
bytes of an upload, fed into the key's digest as they arrive, in constant memory.

The key decides the algorithm: a signature is made with the algorithm of the key's
record, and checked with the algorithm of the key the caller names (or of the public JWK
it gives), never with the one the JWS header names. A stored key is looked up by the
`kid#version` the header names, or by the caller's `kid` (its primary version if the
header names none of its versions). A long stream checks again, at most once a second,
that its keys may still be used (`KeyWatch`): a key disabled meanwhile stops it.

Each signature counts as a use of the key version that makes it, counted (and refused
past the key's maxUsageLimit) before the payload is read, as an encryption is; each
signature that verifies with a stored key counts once the payload has been checked
against it, as a message that opens does. A check that fails counts for nothing: whoever
may verify would otherwise use a key up with bad signatures, so that it signs no more.
"""

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from anyio import to_thread

from envelope import DetachedJws, DetachedSigner, DetachedVerifier, parse_detached
from keystore import KeyMismatch, KeyNotFound, KeyRecord, KeyStore, Uses
from keystore.algorithms import verifying_key_from_jwk
from keystore.material import KEY_NAME_PATTERN, key_name
from services.keys import KeyWatch


@dataclass
class Signing:
    """A signature being made with a key's primary version (`key_name`, `kid#version`),
    counted: `uses` are the key's with it."""

    key: KeyRecord
    key_name: str
    alg: str
    signer: DetachedSigner
    watch: KeyWatch
    uses: Uses


@dataclass
class StoredVerifier:
    """The stored key version a signature is checked with, and how to count the check."""

    key: KeyRecord
    version: int
    watch: KeyWatch
    count: Callable[[KeyRecord, int], Uses]
    uses: Uses | None = None  # the key's, once the check is counted


@dataclass
class Verifying:
    """A signature being checked: the key that checks it (`key_name`: `kid#version`, or
    for a public JWK `jwk#<thumbprint>`), its algorithm, and the stored key version if it
    is one."""

    key_name: str
    alg: str
    verifier: DetachedVerifier
    stored: StoredVerifier | None  # None for a public JWK: no key of ours to watch or count


def start_signing(keys: KeyStore, tenant: str, kid: str) -> Signing:
    """Check the key may sign now, and start a signature by its primary version."""
    record, signing_key = keys.signing_key(tenant, kid)
    uses = keys.count_signed(record)
    name = key_name(record.kid, record.primary_version)
    watch = KeyWatch(partial(keys.signing_key, tenant, kid))
    return Signing(record, name, record.alg, DetachedSigner(signing_key, name), watch, uses)


def start_verifying(
    keys: KeyStore,
    tenant: str,
    signature: str,
    *,
    kid: str | None = None,
    public_jwk: Mapping[str, Any] | None = None,
) -> Verifying:
    """Read `signature` (a detached JWS) and start checking it with the tenant's key
    `kid`, or the key its header names, or the public JWK given: every malformed JWS, and
    a header `alg` that is not the key's, is refused here, before the payload is read."""
    jws = parse_detached(signature)
    if public_jwk is not None:
        # Named by its thumbprint: the header's kid is the signer's to choose, and may
        # name a key of this tenant's.
        verifying_key, name = verifying_key_from_jwk(public_jwk)
        verifier = DetachedVerifier(jws, verifying_key)
        return Verifying(name, verifying_key.alg, verifier, None)
    wanted, version = _named_key(jws, kid)
    record, number, verifying_key = keys.verifying_key(tenant, wanted, version)
    watch = KeyWatch(partial(keys.verifying_key, tenant, wanted, number))
    verifier = DetachedVerifier(jws, verifying_key)
    stored = StoredVerifier(record, number, watch, keys.count_verified)
    return Verifying(key_name(record.kid, number), record.alg, verifier, stored)


async def sign_stream(signing: Signing, chunks: AsyncIterator[memoryview]) -> str:
    """The detached JWS over `chunks`."""
    async for chunk in chunks:
        signing.signer.update(chunk)
        await signing.watch()
    return await to_thread.run_sync(signing.signer.finish)


async def verify_stream(verifying: Verifying, chunks: AsyncIterator[memoryview]) -> None:
    """Raise `SignatureInvalid` unless the signature covers `chunks`."""
    await _checked(verifying, None, chunks)


async def resign_stream(
    verifying: Verifying, signing: Signing, chunks: AsyncIterator[memoryview]
) -> str:
    """Check the old signature over `chunks` and sign them anew in the same pass; the new
    signature is made only once the old one has verified."""
    await _checked(verifying, signing, chunks)
    return await to_thread.run_sync(signing.signer.finish)


async def _checked(
    verifying: Verifying, signing: Signing | None, chunks: AsyncIterator[memoryview]
) -> None:
    """Feed `chunks` to the verifier (and the signer, if any), then verify: a check with
    a stored key counts if the signature verifies."""
    stored = verifying.stored
    watches: Sequence[KeyWatch] = [
        watch
        for watch in (
            None if stored is None else stored.watch,
            None if signing is None else signing.watch,
        )
        if watch is not None
    ]
    async for chunk in chunks:
        verifying.verifier.update(chunk)
        if signing is not None:
            signing.signer.update(chunk)
        for watch in watches:
            await watch()
    await to_thread.run_sync(verifying.verifier.verify)
    if stored is not None:
        stored.uses = await to_thread.run_sync(stored.count, stored.key, stored.version)


def _named_key(jws: DetachedJws, kid: str | None) -> tuple[str, int | None]:
    """The key (and version, if named) to check `jws` with: the header's `kid#version`,
    which must be a version of `kid` if the caller named one; else `kid`'s primary."""
    named = KEY_NAME_PATTERN.fullmatch(jws.kid or "")
    if named is not None and (kid is None or named["kid"] == kid):
        return named["kid"], int(named["version"])
    if kid is None:
        raise KeyNotFound("the signature names no key of this tenant: name one in 'kid'")
    if named is not None:
        raise KeyMismatch(f"the signature is by key {named['kid']!r}, not {kid!r}")
    return kid, None
