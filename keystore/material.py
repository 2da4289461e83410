"""Key material: made per version, wrapped under the KEK at rest, unwrapped into the
keyring that version seals and opens messages with, or the key it signs with.

Wrapped material is bound to its tenant, kid and version (`material_aad`), so material
moved to another version, key or tenant does not unwrap. A version's keyring is named
`kid#version`: the name messages sealed with it carry (`KEY_NAME_PATTERN`).
"""

import re
from collections.abc import Callable
from datetime import datetime

from envelope import Keyring, SigningKey
from keystore.algorithms import Jwk, KeyParams, key_type
from keystore.kek import Kek
from keystore.records import KID_PATTERN, KeyRecord, KeyVersion

MATERIAL_AAD_PREFIX = "sealstream/key-material/v1"
KEY_NAME_PATTERN = re.compile(rf"(?P<kid>{KID_PATTERN.pattern})#(?P<version>[1-9][0-9]{{0,8}})")


def material_aad(tenant: str, kid: str, version: int) -> bytes:
    """What wrapped material is bound to: '|' cannot occur in a tenant or kid."""
    return f"{MATERIAL_AAD_PREFIX}|{tenant}|{kid}|{version}".encode()


def key_name(kid: str, version: int) -> str:
    return f"{kid}#{version}"


class Material:
    """The material of key versions, wrapped and unwrapped under one KEK. `count_wrap`
    counts each wrap a KEK that draws random IVs is about to make, and refuses one too
    many."""

    def __init__(self, kek: Kek, count_wrap: Callable[[], None]) -> None:
        self._kek = kek
        self._count_wrap = count_wrap

    def new_version(
        self, tenant: str, kid: str, params: KeyParams, number: int, material: bytes, now: datetime
    ) -> KeyVersion:
        """Version `number` of a key, holding `material` wrapped."""
        if self._kek.draws_random_ivs:
            self._count_wrap()
        return KeyVersion(
            version=number,
            created_at=now,
            wrapped_material=self._kek.wrap(material, material_aad(tenant, kid, number)),
            public_jwk=key_type(params.kty).public_jwk(key_name(kid, number), params, material),
        )

    def rotated(self, record: KeyRecord, now: datetime) -> KeyRecord:
        """The record with a new version of fresh material, made primary."""
        record.check_enabled()  # only enabled keys rotate
        number = record.next_version_number()
        material = key_type(record.kty).generate(record.params)
        version = self.new_version(record.tenant, record.kid, record.params, number, material, now)
        return record.with_version(version, now)

    def keyring(self, record: KeyRecord, version: KeyVersion) -> Keyring:
        material = self._unwrap(record, version)
        return key_type(record.kty).keyring(
            key_name(record.kid, version.version), record.params, material
        )

    def signing_key(self, record: KeyRecord, version: KeyVersion) -> SigningKey:
        material = self._unwrap(record, version)
        return key_type(record.kty).signing_key(record.params, material)

    def export_jwk(self, record: KeyRecord, version: KeyVersion) -> Jwk:
        material = self._unwrap(record, version)
        return key_type(record.kty).export_jwk(
            key_name(record.kid, version.version), record.params, material
        )

    def _unwrap(self, record: KeyRecord, version: KeyVersion) -> bytes:
        aad = material_aad(record.tenant, record.kid, version.version)
        return self._kek.unwrap(version.wrapped_material, aad)
