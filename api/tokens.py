"""API tokens: opaque bearer strings, each bound to one tenant and a set of scopes.

A token reads `sst_<id>_<secret>`. Its record, a sealed record (`storage.integrity`) at
`sealstream/tokens/<id>.json`, holds HMAC(token-hash key, SHA-256(token)) and never the
token: without the service's record key, neither reading the bucket nor writing it gives
a working token. The hash is compared in constant time.

Refusing a token costs no storage request unless its id is one the service issued: an id
carries a MAC of its own random part (under a key derived from the record key), so a
made-up id fails on arrival. Ids issued before ids carried one are listed in a sealed
index that `sealstream upgrade-records` writes. Records (and misses) are cached for
`cache_ttl` seconds, so a revocation made by another process takes effect within that
time (at once in the process that made it).

Two roles hold `admin`: the operator (the bootstrap token, and tokens granted `operator`)
manages every tenant's tokens; a tenant admin manages only its own tenant's tokens, and
grants only scopes it holds itself.
"""

import base64
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from cachetools import TTLCache
from pydantic import AwareDatetime, BaseModel, Field

from storage import ObjectNotFound
from storage.documents import FrozenCamelModel
from storage.integrity import Records

ADMIN_SCOPE = "admin"
OPERATOR_SCOPE = "operator"
SCOPES = frozenset(
    {
        "keys:read",
        "keys:write",
        "keys:export",
        "crypto:encrypt",
        "crypto:decrypt",
        "crypto:sign",
        "crypto:verify",
        "jobs:read",
        "jobs:write",
        "objects:read",
        "objects:write",
        "audit:read",
        ADMIN_SCOPE,
        OPERATOR_SCOPE,
    }
)
TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
TOKEN_ID_PATTERN = r"^[a-z0-9]{16}$"  # noqa: S105 - a pattern, not a secret
DEFAULT_TENANT = "default"
RECORD_KIND = "token"
TOKENS_PREFIX = "sealstream/tokens/"
LEGACY_IDS_KIND = "legacy-token-ids"
LEGACY_IDS_KEY = "sealstream/legacy-token-ids.json"
LEGACY_IDS_TTL = 60.0  # seconds; the index changes only when an upgrade runs
_TOKEN = re.compile(r"^sst_([a-z0-9]{16})_([A-Za-z0-9_-]{43})$")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_ID_RANDOM_LENGTH = 8  # then as many characters of MAC
_ID_TAG_LENGTH = 8


class _Uncached:
    """What the record cache holds for an id it knows nothing about."""


_UNCACHED = _Uncached()


class TokenError(Exception):
    """A bearer token was refused; `code` says why."""

    code = "invalid-token"


class RevokedToken(TokenError):
    code = "token-revoked"


class ExpiredToken(TokenError):
    code = "token-expired"


class TokenNotFound(Exception):
    """No token has this id."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a tenant and what the token allows."""

    tenant: str
    scopes: frozenset[str]
    token_id: str

    @property
    def operator(self) -> bool:
        return OPERATOR_SCOPE in self.scopes


class TokenRecord(FrozenCamelModel):
    """A token as stored: everything but the token itself."""

    id: str = Field(pattern=TOKEN_ID_PATTERN)
    tenant: str = Field(pattern=TENANT_PATTERN)
    scopes: list[str]
    name: str = ""
    created_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    revoked_at: AwareDatetime | None = None
    hash: str = Field(repr=False)

    def public(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={"hash"})


class LegacyTokenIds(BaseModel):
    """Ids of tokens issued before ids carried a MAC: they are looked up as they are."""

    ids: list[str]


def token_record_key(token_id: str) -> str:
    return f"{TOKENS_PREFIX}{token_id}.json"


class TokenHasher:
    """What a token record keeps of its token, and whether an id is one the service made;
    both keyed by keys derived from the record key."""

    def __init__(self, records: Records) -> None:
        self._records = records

    @cached_property
    def _hash_key(self) -> bytes:
        return self._records.key.derive("token-hash")

    @cached_property
    def _id_key(self) -> bytes:
        return self._records.key.derive("token-id")

    def hash(self, token: str) -> str:
        return self.rehash(hashlib.sha256(token.encode()).hexdigest())

    def rehash(self, sha256_hex: str) -> str:
        """The hash from a token's plain SHA-256, which records held before: this is how
        they are upgraded without the tokens."""
        return hmac.new(self._hash_key, bytes.fromhex(sha256_hex), "sha256").hexdigest()

    def new_id(self) -> str:
        random_part = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_RANDOM_LENGTH))
        return random_part + self._tag(random_part)

    def issued_here(self, token_id: str) -> bool:
        random_part, tag = token_id[:_ID_RANDOM_LENGTH], token_id[_ID_RANDOM_LENGTH:]
        return hmac.compare_digest(tag, self._tag(random_part))

    def _tag(self, random_part: str) -> str:
        number = int.from_bytes(hmac.digest(self._id_key, random_part.encode(), "sha256")[:8])
        characters = []
        for _ in range(_ID_TAG_LENGTH):
            number, digit = divmod(number, len(_ID_ALPHABET))
            characters.append(_ID_ALPHABET[digit])
        return "".join(characters)


# A bootstrap admin token's prefix keeps it from starting with `-`, which a command line
# would read as an option.
ADMIN_TOKEN_PREFIX = "ssa_"  # noqa: S105 - a prefix, not a token


def new_admin_token() -> str:
    """A bootstrap admin token, for a server given none."""
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def dev_admin_token(records: Records) -> str:
    """The bootstrap admin token of a local store given none: derived from its record key,
    so the same at every start with the same store and KEK, and unknowable without the
    KEK. Nothing stored is trusted for it: a copy kept for the client is never read back."""
    secret = records.key.derive("dev-admin-token")
    return ADMIN_TOKEN_PREFIX + base64.urlsafe_b64encode(secret).rstrip(b"=").decode()


class TokenStore:
    """Issues, checks, lists and revokes tokens; knows the bootstrap admin token."""

    def __init__(
        self,
        records: Records,
        admin_token: str,
        *,
        cache_ttl: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._records = records
        self._hasher = TokenHasher(records)
        self._admin_token = admin_token
        self._clock = clock
        self._cache: TTLCache[str, TokenRecord | None] = TTLCache(maxsize=4096, ttl=cache_ttl)
        self._legacy: TTLCache[str, frozenset[str]] = TTLCache(maxsize=1, ttl=LEGACY_IDS_TTL)
        self._lock = threading.Lock()

    def issue(
        self,
        tenant: str,
        scopes: Iterable[str],
        *,
        name: str = "",
        expires_at: datetime | None = None,
    ) -> tuple[str, TokenRecord]:
        """A new token (returned once, never stored) and its record."""
        token_id = self._hasher.new_id()
        token = f"sst_{token_id}_{secrets.token_urlsafe(32)}"
        record = TokenRecord(
            id=token_id,
            tenant=tenant,
            scopes=sorted(set(scopes)),
            name=name,
            created_at=self._clock(),
            expires_at=expires_at,
            hash=self._hasher.hash(token),
        )
        self._save(record, if_absent=True)
        return token, record

    def authenticate(self, token: str) -> Principal:
        """The principal a token stands for; raises `TokenError` if it stands for none."""
        digest = self._hasher.hash(token)
        if hmac.compare_digest(digest, self._admin_hash):
            return Principal(DEFAULT_TENANT, SCOPES, "admin")
        match = _TOKEN.match(token)
        if match is None or not self._known_id(match.group(1)):
            raise TokenError("the token is not valid")
        record = self._cached(match.group(1))
        if record is None or not hmac.compare_digest(digest, record.hash):
            raise TokenError("the token is not valid")
        if record.revoked_at is not None:
            raise RevokedToken("the token was revoked")
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise ExpiredToken("the token has expired")
        return Principal(record.tenant, frozenset(record.scopes), record.id)

    @cached_property
    def _admin_hash(self) -> str:
        return self._hasher.hash(self._admin_token)

    def get(self, token_id: str) -> TokenRecord:
        """The record of a token; `TokenNotFound` if there is none."""
        if not re.fullmatch(TOKEN_ID_PATTERN, token_id):
            raise TokenNotFound(token_id)
        try:
            return self._records.get(RECORD_KIND, token_record_key(token_id), TokenRecord)
        except ObjectNotFound:
            raise TokenNotFound(token_id) from None

    def list(self, tenant: str | None = None) -> list[TokenRecord]:
        records = self._records.all(RECORD_KIND, TOKENS_PREFIX, TokenRecord)
        return [r for _, r in records if tenant is None or r.tenant == tenant]

    def revoke(self, token_id: str) -> TokenRecord:
        record = self.get(token_id).model_copy(update={"revoked_at": self._clock()})
        self._save(record, if_absent=False)
        return record

    def _known_id(self, token_id: str) -> bool:
        """Whether the id could be one this service issued: cheap, and no storage request
        for a made-up one."""
        return self._hasher.issued_here(token_id) or token_id in self._legacy_ids()

    def _legacy_ids(self) -> frozenset[str]:
        with self._lock:
            ids = self._legacy.get(LEGACY_IDS_KEY)
        if ids is None:
            try:
                index = self._records.get(LEGACY_IDS_KIND, LEGACY_IDS_KEY, LegacyTokenIds)
                ids = frozenset(index.ids)
            except ObjectNotFound:
                ids = frozenset()
            with self._lock:
                self._legacy[LEGACY_IDS_KEY] = ids
        return ids

    def _cached(self, token_id: str) -> TokenRecord | None:
        with self._lock:
            found = self._cache.get(token_id, _UNCACHED)
        if not isinstance(found, _Uncached):
            return found
        try:
            record: TokenRecord | None = self.get(token_id)
        except TokenNotFound:
            record = None  # remembered too: asking again within the TTL costs nothing
        with self._lock:
            self._cache[token_id] = record
        return record

    def _save(self, record: TokenRecord, *, if_absent: bool) -> None:
        self._records.put(RECORD_KIND, token_record_key(record.id), record, if_absent=if_absent)
        with self._lock:
            self._cache[record.id] = record
