"""The client's results, typed: each JSON answer of the API as a pydantic model, with the
fields named as in Python (`key.primary_version`) and read from the API's camelCase.

A model keeps the fields this version of the client does not know (a newer server's), and
`document` is the answer exactly as the server sent it, for callers that pass it on (the
`sealstream` command's `--json` prints it). The client imports this module (and pydantic)
only once a call answers with JSON, so a command that only streams starts without it.
"""

from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr
from pydantic.alias_generators import to_camel

__all__ = [
    "Algorithms",
    "ApiModel",
    "AuditEvent",
    "AuditPage",
    "IndexedObject",
    "IndexedObjectPage",
    "IssuedToken",
    "Job",
    "JobPage",
    "JobProgress",
    "Jwk",
    "Key",
    "KeyPage",
    "KeyVersion",
    "ObjectEntry",
    "ObjectPage",
    "StoredObject",
    "Token",
    "TokenList",
    "Verdict",
]


class ApiModel(BaseModel):
    """A JSON answer: its known fields typed, the others kept as they came."""

    # Built on first use, not at import: the command line starts faster.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        frozen=True,
        defer_build=True,
    )
    _document: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def of(cls, document: dict[str, Any]) -> Self:
        """The model of the JSON object `document`, which it keeps as it came."""
        model = cls.model_validate(document)
        model._document = document  # noqa: SLF001 its own class's, set once as it is made
        return model

    @property
    def document(self) -> dict[str, Any]:
        """The answer as the server sent it (the JSON object)."""
        return dict(self._document)


class KeyVersion(ApiModel):
    version: int
    created_at: datetime
    usage_count: int = 0
    encrypt_count: int = 0
    last_used_at: datetime | None = None
    retired_at: datetime | None = None
    destruction_date: datetime | None = None
    destroyed_at: datetime | None = None
    object_count: int | None = None  # in `get_key`'s answer only


class Key(ApiModel):
    """A key as its readers see it (never its private material)."""

    kid: str
    tenant: str
    kty: str
    alg: str
    key_size: int | None = None
    key_ops: list[str]
    exportable: bool
    status: str  # enabled | disabled | pending-deletion
    primary_version: int
    created_at: datetime
    updated_at: datetime
    deletion_date: datetime | None = None
    expires_at: datetime | None = None
    usage_count: int = 0
    last_used_at: datetime | None = None
    public_jwk: dict[str, Any] | None = None
    versions: list[KeyVersion] = []


class KeyPage(ApiModel):
    keys: list[Key]
    next: str | None = None  # the `after` of the next page; None on the last


class Jwk(ApiModel):
    """A JWK (RFC 7517): `kty`, `kid`, `alg` and the members of its key type."""

    kty: str
    kid: str | None = None
    alg: str | None = None


class Algorithms(ApiModel):
    """What `alg` accepts, by key type (the answer's members are the key types)."""


class IndexedObject(ApiModel):
    bucket: str
    key: str
    kid: str
    key_version: int
    marked_at: datetime


class IndexedObjectPage(ApiModel):
    objects: list[IndexedObject]
    next: str | None = None


class ObjectEntry(ApiModel):
    key: str
    bucket: str
    size: int  # the stored ciphertext's bytes
    created_at: datetime
    kid: str | None = None
    key_version: int | None = None
    plaintext_size: int | None = None
    state: str  # sealed | changed | unrecorded | record-refused


class ObjectPage(ApiModel):
    objects: list[ObjectEntry]
    next: str | None = None


class StoredObject(ApiModel):
    """What an encryption into storage wrote, and the job that verifies it."""

    bucket: str
    key: str
    ciphertext_size: int
    plaintext_size: int
    plaintext_sha256: str
    etag: str
    kid: str
    key_version: int
    frame_length: int
    verify_job: str | None = None


class Verdict(ApiModel):
    """A signature that verified: by which key version, with which algorithm."""

    valid: bool
    kid: str | None = None
    alg: str


class Token(ApiModel):
    id: str
    tenant: str
    scopes: list[str]
    name: str = ""
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class IssuedToken(Token):
    token: str  # shown in this answer only


class TokenList(ApiModel):
    tokens: list[Token]


class NameKeyVersion(ApiModel):
    version: int
    created_at: datetime


class NameKey(ApiModel):
    """The versions of a tenant's name key (which hides archive members' names)."""

    tenant: str
    current: int | None = None  # None until the tenant first hides names
    versions: list[NameKeyVersion]


class JobProgress(ApiModel):
    bytes_done: int = 0
    bytes_total: int | None = None
    items_done: int = 0
    items_total: int | None = None


class Job(ApiModel):
    id: str
    kind: str
    status: str  # queued | running | succeeded | failed | cancelled
    params: dict[str, Any] = {}
    progress: JobProgress = JobProgress()
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # the problem document of a failed job
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class JobPage(ApiModel):
    jobs: list[Job]
    next: str | None = None


class AuditEvent(ApiModel):
    """One audit event; its other fields are those of its `type`."""

    type: str
    time: datetime
    chain: str
    seq: int


class AuditPage(ApiModel):
    events: list[AuditEvent]
    next: str | None = None
