"""API tokens: opaque bearer strings, each bound to one tenant and a set of scopes.

A token reads `sst_<id>_<secret>`. Only its SHA-256 is stored, in the object store under
`sealstream/tokens/<id>.json`; the id locates the record, and the hash is compared in
constant time. Records are cached for `cache_ttl` seconds, so a revocation made by
another process takes effect within that time (at once in the process that made it).
"""

import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cachetools import TTLCache
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from storage import ObjectNotFound, ObjectStore

SCOPES = frozenset(
    {
        "keys:read",
        "keys:write",
        "keys:export",
        "crypto:encrypt",
        "crypto:decrypt",
        "jobs:read",
        "jobs:write",
        "admin",
    }
)
TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
DEFAULT_TENANT = "default"
_PREFIX = "sealstream/tokens/"
_TOKEN = re.compile(r"^sst_([a-z0-9]{16})_([A-Za-z0-9_-]{43})$")
_TOKEN_ID = re.compile(r"^[a-z0-9]{16}$")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


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


class TokenRecord(BaseModel):
    """A token as stored: everything but the token itself."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, serialize_by_alias=True, frozen=True
    )

    id: str
    tenant: str = Field(pattern=TENANT_PATTERN)
    scopes: list[str]
    name: str = ""
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    hash: str = Field(repr=False)

    def public(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={"hash"})


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Issues, checks, lists and revokes tokens; knows the bootstrap admin token."""

    def __init__(
        self,
        objects: ObjectStore,
        admin_token: str,
        *,
        cache_ttl: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._objects = objects
        self._admin_digest = _digest(admin_token)
        self._clock = clock
        self._cache: TTLCache[str, TokenRecord] = TTLCache(maxsize=4096, ttl=cache_ttl)
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
        token_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))
        token = f"sst_{token_id}_{secrets.token_urlsafe(32)}"
        record = TokenRecord(
            id=token_id,
            tenant=tenant,
            scopes=sorted(set(scopes)),
            name=name,
            created_at=self._clock(),
            expires_at=expires_at,
            hash=_digest(token),
        )
        self._save(record, if_absent=True)
        return token, record

    def authenticate(self, token: str) -> Principal:
        """The principal a token stands for; raises `TokenError` if it stands for none."""
        if hmac.compare_digest(_digest(token), self._admin_digest):
            return Principal(DEFAULT_TENANT, SCOPES, "admin")
        match = _TOKEN.match(token)
        if match is None:
            raise TokenError("the token is not valid")
        try:
            record = self._cached(match.group(1))
        except TokenNotFound:
            raise TokenError("the token is not valid") from None
        if not hmac.compare_digest(_digest(token), record.hash):
            raise TokenError("the token is not valid")
        if record.revoked_at is not None:
            raise RevokedToken("the token was revoked")
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise ExpiredToken("the token has expired")
        return Principal(record.tenant, frozenset(record.scopes), record.id)

    def list(self, tenant: str | None = None) -> list[TokenRecord]:
        records = (
            TokenRecord.model_validate_json(self._objects.get(info.key))
            for info in self._objects.list(_PREFIX)
        )
        return [r for r in records if tenant is None or r.tenant == tenant]

    def revoke(self, token_id: str) -> TokenRecord:
        record = self._load(token_id).model_copy(update={"revoked_at": self._clock()})
        self._save(record, if_absent=False)
        return record

    def _cached(self, token_id: str) -> TokenRecord:
        with self._lock:
            record = self._cache.get(token_id)
        if record is None:
            record = self._load(token_id)
            with self._lock:
                self._cache[token_id] = record
        return record

    def _load(self, token_id: str) -> TokenRecord:
        if not _TOKEN_ID.match(token_id):
            raise TokenNotFound(token_id)
        try:
            return TokenRecord.model_validate_json(self._objects.get(f"{_PREFIX}{token_id}.json"))
        except ObjectNotFound:
            raise TokenNotFound(token_id) from None

    def _save(self, record: TokenRecord, *, if_absent: bool) -> None:
        data = record.model_dump_json().encode()
        self._objects.put(f"{_PREFIX}{record.id}.json", data, if_absent=if_absent)
        with self._lock:
            self._cache[record.id] = record
