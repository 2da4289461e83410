"""Job records: what a client polls while a worker does the long work.

A record names its job's kind, its tenant and its typed parameters, and carries its
status, progress and final result or error. Records are sealed wherever they are kept
(`services.jobs.store`), so each of those fields is what the API wrote or a worker
reported.
"""

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self, TypeVar

from pydantic import Field, model_validator

from services.jobs.params import (
    AnyParams,
    ArchiveUploadParams,
    BatchChunkParams,
    BatchEncryptParams,
    JobParams,
    ReencryptParams,
    VerifyParams,
)
from storage.documents import CamelModel

REPORTS_PREFIX = "sealstream/jobs/"
REPORT_KIND = "job-report"
REPORT_SUFFIX = ".json"

P = TypeVar("P", bound=JobParams)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobKind(StrEnum):
    VERIFY = "verify"
    BATCH_ENCRYPT = "batch-encrypt"
    REENCRYPT = "reencrypt"
    REWRAP = "rewrap"  # deprecated: the reencrypt job under its former name, for one release
    ENCRYPT_ARCHIVE = "encrypt-archive"  # run by the request that uploads the archive
    BATCH_CHUNK = "batch-encrypt-chunk"  # a share of a batch-encrypt job's members


PARAMS: dict[JobKind, type[JobParams]] = {
    JobKind.VERIFY: VerifyParams,
    JobKind.BATCH_ENCRYPT: BatchEncryptParams,
    JobKind.REENCRYPT: ReencryptParams,
    JobKind.REWRAP: ReencryptParams,
    JobKind.ENCRYPT_ARCHIVE: ArchiveUploadParams,
    JobKind.BATCH_CHUNK: BatchChunkParams,
}


class Progress(CamelModel):
    bytes_done: int = 0
    bytes_total: int | None = None
    items_done: int = 0
    items_total: int | None = None


class JobRecord(CamelModel):
    id: str
    kind: JobKind
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    params: AnyParams
    progress: Progress = Field(default_factory=Progress)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def params_of_its_kind(cls, data: Any) -> Any:
        """Read `params` as the model of the record's kind (a verify job's parameters
        could otherwise pass for an object-targeted reencrypt's)."""
        kind = data.get("kind") if isinstance(data, dict) else None
        if not isinstance(kind, str) or kind not in PARAMS or "params" not in data:
            return data  # the fields' own validation says what is wrong
        return {**data, "params": PARAMS[JobKind(kind)].model_validate(data["params"])}

    @classmethod
    def new(cls, kind: JobKind, tenant: str, params: AnyParams) -> Self:
        now = datetime.now(UTC)
        return cls(
            id=new_job_id(now),
            kind=kind,
            tenant=tenant,
            params=params,
            created_at=now,
            updated_at=now,
        )

    def params_as(self, model: type[P]) -> P:
        """The parameters, as the model the caller runs them with."""
        if not isinstance(self.params, model):
            raise TypeError(f"a {self.kind} job has no {model.__name__}")
        return self.params

    @property
    def stopped_by(self) -> list[str]:
        """The jobs whose cancel stops this one: itself, and a chunk's batch job."""
        if isinstance(self.params, BatchChunkParams):
            return [self.id, self.params.parent]
        return [self.id]

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Ids count down from here in milliseconds, so that a later job's id sorts first: a listing
# of reports in key order is then newest first, and a cursor is just the last id served.
_ID_CLOCK_END = 0xFFFF_FFFF_FFFF


def new_job_id(now: datetime) -> str:
    """`job_` and 24 hex digits: 12 that fall as time passes (milliseconds), then 12 random
    ones, so ids created in the same millisecond still differ."""
    countdown = _ID_CLOCK_END - int(now.timestamp() * 1000)
    return f"job_{countdown:012x}{secrets.token_hex(6)}"


def chunk_id(parent: str, index: int) -> str:
    """The id of a batch job's `index`-th chunk: found again from the job, never made twice."""
    return f"{parent}-{index:04d}"


def report_key(tenant: str, job_id: str) -> str:
    return f"{REPORTS_PREFIX}{tenant}/{job_id}{REPORT_SUFFIX}"
