"""Jobs: start verification, batch encryption and re-encryption; poll, list and cancel
them.

A job belongs to the tenant that started it; another tenant's job id answers 404.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.body import parse, read_json_object
from api.openapi import AUTHENTICATED, JSON_BODY, QUERY, answer, answers, json_request
from api.problems import Problem
from api.schemas import DEFAULT_FRAME_LENGTH, ClientContext, FrameLength, Kid
from api.services import Services, services
from api.tokens import Principal
from keystore import KeyRecord
from keystore.name_keys import NameKey
from services.archives.naming import prefix_name_key
from services.archives.upload import MANIFEST_NAME
from services.jobs import (
    BatchEncryptParams,
    JobKind,
    JobRecord,
    JobStatus,
    ObjectTarget,
    PrefixTarget,
    ReencryptParams,
    Target,
    VersionTarget,
    fail_if_stale,
)
from services.jobs.params import Names
from services.placement import ObjectRef, check_object_key, tenant_prefix
from storage.documents import CamelModel

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
Reader = Annotated[Principal, Depends(require("jobs:read"))]
Writer = Annotated[Principal, Depends(require("jobs:write"))]


JOB = {200: answer("The job as it stands.", JobRecord)}


def _starts_a_job(request: type[BaseModel]) -> dict[str, Any]:
    """The route options of a route that starts a job from a JSON body read as `request`:
    it checks what the body names first, objects (400, 404) and keys (404, 409)."""
    return {
        "status_code": 202,
        "response_model": None,
        "responses": answers(
            {202: answer("The job, queued.", JobRecord)},
            AUTHENTICATED,
            JSON_BODY,
            (404, 409),
        ),
        "openapi_extra": json_request(request),
    }


class JobList(BaseModel):
    """A page of jobs, newest first; `next` is the `after` of the next page."""

    jobs: list[JobRecord]
    next: str | None


@router.post("/verify", **_starts_a_job(ObjectRef))
async def start_verify(request: Request, principal: Writer) -> dict[str, Any]:
    """Verify a stored object against what its upload recorded."""
    svc = services(request)
    ref = parse(ObjectRef, await read_json_object(request, svc.settings))
    placement = svc.spaces.place(principal.tenant, ref)
    await run_in_threadpool(placement.store.head, placement.storage_key)  # 404 if absent
    record = await run_in_threadpool(svc.start_verify, principal.tenant, placement)
    return record.public()


class _Request(CamelModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Request):
    """An archive object (`key`) or every object under a `prefix`."""

    key: str | None = None
    prefix: str | None = None
    bucket: str | None = None

    @model_validator(mode="after")
    def one_of_key_or_prefix(self) -> "Source":
        if (self.key is None) == (self.prefix is None):
            raise PydanticCustomError("invalid-source", "give exactly one of 'key' and 'prefix'")
        return self


class Destination(_Request):
    """Where the output goes: a `prefix` for members, a `key` for a whole archive."""

    key: str | None = None
    prefix: str | None = None
    bucket: str | None = None


class BatchEncryptRequest(_Request):
    kid: Kid
    source: Source
    destination: Destination
    mode: Literal["members", "whole"] = "members"
    format: Literal["auto", "tar", "tar.gz", "tar.bz2", "zip"] = "auto"
    encryption_context: ClientContext
    frame_length: FrameLength = DEFAULT_FRAME_LENGTH
    overwrite: bool = False
    names: Names = "plain"

    @model_validator(mode="after")
    def destination_fits_mode(self) -> "BatchEncryptRequest":
        wanted = "prefix" if self.mode == "members" else "key"
        given = self.destination.prefix if wanted == "prefix" else self.destination.key
        other = self.destination.key if wanted == "prefix" else self.destination.prefix
        if given is None or other is not None:
            raise PydanticCustomError(
                "invalid-destination",
                "mode {mode} writes to a destination {wanted}",
                {"mode": self.mode, "wanted": wanted},
            )
        if self.mode == "whole" and self.source.key is None:
            raise PydanticCustomError("invalid-source", "mode whole encrypts one archive: a key")
        if self.mode == "whole" and self.names == "encrypted":
            raise PydanticCustomError("invalid-names", "mode whole names its one object itself")
        return self


class ReencryptRequest(_Request):
    """One object (`key`), every object under a `prefix`, or every object the index of
    key versions lists under one `version` of the key (in every bucket)."""

    kid: Kid
    key: str | None = None
    prefix: str | None = None
    version: int | None = Field(None, ge=1)
    bucket: str | None = None
    rewrapped: bool = False

    @model_validator(mode="after")
    def one_selector(self) -> "ReencryptRequest":
        if sum(given is not None for given in (self.key, self.prefix, self.version)) != 1:
            raise PydanticCustomError(
                "invalid-source", "give exactly one of 'key', 'prefix' and 'version'"
            )
        if self.version is not None and self.bucket is not None:
            raise PydanticCustomError(
                "invalid-source", "a version selects its objects in every bucket: no 'bucket'"
            )
        return self


def place_prefix(svc: Services, tenant: str, prefix: str, bucket: str | None) -> PrefixTarget:
    """A prefix in the tenant's space: '' is the whole space, else it must end in '/'."""
    if prefix and not prefix.endswith("/"):
        raise Problem(400, "invalid-prefix", "a prefix is empty or ends with '/'")
    if prefix:
        check_object_key(prefix.removesuffix("/"))
    store = svc.spaces.store(tenant, bucket)
    return PrefixTarget(
        bucket=store.bucket, prefix=prefix, storage_prefix=tenant_prefix(tenant) + prefix
    )


def target_name_key(svc: Services, tenant: str, target: PrefixTarget) -> NameKey:
    """The version of the tenant's name key (made the first time one is needed) that a
    run into `target` hides names with (`services.archives.naming`)."""
    store = svc.spaces.store(tenant, target.bucket)
    manifest_key = target.storage_prefix + MANIFEST_NAME
    return prefix_name_key(svc.keys, svc.records, store, tenant, manifest_key)


def _place_key(svc: Services, tenant: str, key: str, bucket: str | None) -> ObjectTarget:
    placement = svc.spaces.place(tenant, ObjectRef(key=key, bucket=bucket))
    return ObjectTarget(
        bucket=placement.bucket, key=placement.key, storage_key=placement.storage_key
    )


def batch_params(svc: Services, tenant: str, spec: BatchEncryptRequest) -> BatchEncryptParams:
    """The job's parameters, with every name resolved to where it is stored."""
    source, destination = spec.source, spec.destination
    placed_source = (
        _place_key(svc, tenant, source.key, source.bucket)
        if source.key is not None
        else place_prefix(svc, tenant, source.prefix or "", source.bucket)
    )
    placed_destination = (
        place_prefix(svc, tenant, destination.prefix, destination.bucket)
        if destination.prefix is not None
        else _place_key(svc, tenant, destination.key or "", destination.bucket)
    )
    if (
        isinstance(placed_source, PrefixTarget)
        and isinstance(placed_destination, PrefixTarget)
        and placed_source.bucket == placed_destination.bucket
        and placed_source.storage_prefix.startswith(placed_destination.storage_prefix)
    ):
        # The job skips its own output, so a source inside the destination holds nothing.
        raise Problem(400, "overlapping-prefixes", "the source prefix lies inside the destination")
    asked = spec.model_dump(exclude={"source", "destination"})
    if spec.names == "encrypted" and isinstance(placed_destination, PrefixTarget):
        name_key = target_name_key(svc, tenant, placed_destination)
        asked["name_key_version"] = name_key.version
        asked["name_key_fingerprint"] = name_key.fingerprint
    return BatchEncryptParams.model_validate(
        {**asked, "source": placed_source, "destination": placed_destination}
    )


def reencrypt_params(
    svc: Services, tenant: str, spec: ReencryptRequest, key: KeyRecord
) -> ReencryptParams:
    """The job's parameters; `key` is the key as this process sees it, whose primary
    version the job moves objects to at least."""
    target: Target | VersionTarget
    if spec.version is not None:
        key.version(spec.version)  # 404 unless the key has it
        target = VersionTarget(version=spec.version)
    elif spec.key is not None:
        target = _place_key(svc, tenant, spec.key, spec.bucket)
    else:
        target = place_prefix(svc, tenant, spec.prefix or "", spec.bucket)
    return ReencryptParams.of(spec.kid, key.primary_version, spec.rewrapped, target)


@router.post("/batch-encrypt", **_starts_a_job(BatchEncryptRequest))
async def start_batch_encrypt(request: Request, principal: Writer) -> dict[str, Any]:
    """Encrypt an archive's members (or every object under a prefix) one object each,
    with a manifest; or encrypt the whole archive as one object."""
    svc = services(request)
    spec = parse(BatchEncryptRequest, await read_json_object(request, svc.settings))
    await run_in_threadpool(start_sealing_check, svc, principal.tenant, spec)
    params = await run_in_threadpool(batch_params, svc, principal.tenant, spec)
    if isinstance(params.source, ObjectTarget):
        store = svc.spaces.store(principal.tenant, params.source.bucket)
        await run_in_threadpool(store.head, params.source.storage_key)  # 404 if absent
    record = await run_in_threadpool(svc.start_job, JobKind.BATCH_ENCRYPT, principal.tenant, params)
    return record.public()


def start_sealing_check(svc: Services, tenant: str, spec: BatchEncryptRequest) -> None:
    """Refuse at once what the job would fail on: a key that may not encrypt now (the
    frame length is checked with the request). Nothing is sealed, so nothing counted."""
    svc.keys.check_encrypt(tenant, spec.kid)


@router.post("/reencrypt", **_starts_a_job(ReencryptRequest))
async def start_reencrypt(request: Request, principal: Writer) -> dict[str, Any]:
    """Re-encrypt stored objects for the key's primary version, each under a fresh data
    key; with `rewrapped`, also those a header-only rewrap moved to a version."""
    record = await _start_reencrypt(request, principal, JobKind.REENCRYPT)
    return record.public()


# The date `rewrap` became a deprecated name of `reencrypt` (RFC 9745: a Unix time).
REWRAP_DEPRECATED = int(datetime(2026, 12, 7, tzinfo=UTC).timestamp())


@router.post("/rewrap", deprecated=True, **_starts_a_job(ReencryptRequest))
async def start_rewrap(request: Request, response: Response, principal: Writer) -> dict[str, Any]:
    """The reencrypt job under its former name, for one release: use `/reencrypt`."""
    record = await _start_reencrypt(request, principal, JobKind.REWRAP)
    response.headers["Deprecation"] = f"@{REWRAP_DEPRECATED}"
    response.headers["Link"] = '</api/jobs/reencrypt>; rel="successor-version"'
    return record.public()


async def _start_reencrypt(request: Request, principal: Principal, kind: JobKind) -> JobRecord:
    svc = services(request)
    spec = parse(ReencryptRequest, await read_json_object(request, svc.settings))
    key = await run_in_threadpool(svc.keys.check_encrypt, principal.tenant, spec.kid)
    params = reencrypt_params(svc, principal.tenant, spec, key)
    return await run_in_threadpool(svc.start_job, kind, principal.tenant, params)


def _find(svc: Services, tenant: str, job_id: str) -> JobRecord:
    record = svc.jobs.find(tenant, job_id)
    if record is None:
        raise Problem(404, "job-not-found", f"no job {job_id!r}")
    return fail_if_stale(svc.jobs, record, timedelta(seconds=svc.settings.job_stale_after))


@router.get("/{job_id}", response_model=None, responses=answers(JOB, AUTHENTICATED, (404,)))
async def get_job(request: Request, job_id: str, principal: Reader) -> dict[str, Any]:
    record = await run_in_threadpool(_find, services(request), principal.tenant, job_id)
    return record.public()


@router.get(
    "",
    response_model=None,
    responses=answers({200: answer("A page of jobs.", JobList)}, AUTHENTICATED, QUERY),
)
async def list_jobs(
    request: Request,
    principal: Reader,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: str | None = None,
) -> dict[str, Any]:
    records, cursor = await run_in_threadpool(
        lambda: services(request).jobs.list(
            principal.tenant, status=status, kind=kind, limit=limit, after=after
        )
    )
    return {"jobs": [record.public() for record in records], "next": cursor}


def _cancel(svc: Services, tenant: str, job_id: str) -> JobRecord:
    record = _find(svc, tenant, job_id)
    if record.status.finished:
        raise Problem(409, "job-finished", f"job {job_id!r} has already {record.status.value}")
    svc.jobs.request_cancel(job_id)
    if record.status is JobStatus.QUEUED:
        # Not started: it will never start (a worker picking it up sees the request).
        now = datetime.now(UTC)
        record = record.model_copy(
            update={"status": JobStatus.CANCELLED, "finished_at": now, "updated_at": now}
        )
        svc.jobs.save(record)
        svc.jobs.write_report(record)
    return record


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=None,
    responses=answers(
        {202: answer("The job, cancelled or asked to stop.", JobRecord)}, AUTHENTICATED, (404, 409)
    ),
)
async def cancel_job(request: Request, job_id: str, principal: Writer) -> dict[str, Any]:
    """Cancel a job: a queued job at once, a running one at its next frame or member."""
    record = await run_in_threadpool(_cancel, services(request), principal.tenant, job_id)
    return record.public()
