"""`POST /api/crypto/stream/encrypt-archive`: an archive uploaded as the `file` part,
each member sealed into an object of its own under a destination prefix as the archive
arrives (`services.archives.upload`), with a sealed manifest at the end.

The upload runs as a job of kind encrypt-archive, in this request: the uploader reads
its progress on the response while it sends, one JSON line per member and a last line
with the outcome (NDJSON); anyone else follows the job at `GET /api/jobs/{id}`, whose id
is the first line. Everything a request could be refused for (metadata, key, bucket, an
existing manifest) is checked before the response starts.
"""

import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

from anyio import BrokenResourceError, ClosedResourceError, from_thread, lowlevel, to_thread
from anyio.streams.memory import MemoryObjectSendStream
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ConfigDict, Field, StrictBool
from starlette.concurrency import run_in_threadpool

from api.audit import noted
from api.auth import require
from api.body import parse
from api.duplex import ProducedStreamingResponse
from api.multipart import UploadForm
from api.openapi import AUTHENTICATED, FORM, answer, answers, form_request
from api.problems import Problem
from api.routes.jobs import place_prefix, target_name_key
from api.schemas import DEFAULT_FRAME_LENGTH, ClientContext, FrameLength, NamesKey
from api.services import Services, services
from api.tokens import Principal
from keystore.name_keys import NameKey
from sealstream.wiring import archive_limits
from services.archives.sealing import MemberSealing
from services.archives.upload import (
    MANIFEST_NAME,
    MemberPlaces,
    UploadBroken,
    UploadReader,
    UploadRun,
    seal_upload,
)
from services.inventory import run_index
from services.jobs import ArchiveUploadParams, JobKind, JobRecord, JobStatus, PrefixTarget
from services.jobs.context import JobContext, run_body
from services.jobs.params import Names, UploadFormat
from storage import ObjectExists, ObjectNotFound
from storage.documents import CamelModel

router = APIRouter(prefix="/api/crypto/stream", tags=["crypto"])
EncryptScope = Annotated[Principal, Depends(require("crypto:encrypt", "jobs:write"))]

NDJSON = "application/x-ndjson"
# Pieces of progress (each the lines of the members reported together) the uploader may fall
# behind by before sealing waits.
PROGRESS_PIECES_BUFFERED = 64


class ArchiveDestination(CamelModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(description="'' or ending in '/': members go under it")
    bucket: str | None = Field(None, min_length=3, max_length=63)
    overwrite: StrictBool = False


class EncryptArchiveMetadata(NamesKey):
    encryption_context: ClientContext
    frame_length: FrameLength = DEFAULT_FRAME_LENGTH
    destination: ArchiveDestination
    format: UploadFormat = "auto"
    names: Names = "plain"


PROGRESS = {
    200: answer(
        "The job's progress as the archive arrives, one JSON object a line: "
        '`{"event": "started", "jobId"}`, then `{"event": "member", "path", "status", ...}` '
        'for each member, then `{"event": "finished", "status", "result", "error"}`. A '
        "response without the finished line was cut short.",
        media_type=NDJSON,
        schema={"type": "string"},
    )
}


@router.post(
    "/encrypt-archive",
    response_model=None,
    responses=answers(PROGRESS, AUTHENTICATED, FORM, (404, 409)),
    openapi_extra=form_request(
        EncryptArchiveMetadata,
        file_required=True,
        file="The archive (tar, tar.gz, tar.bz2, tar.xz, zip), streamed.",
    ),
)
async def encrypt_archive(request: Request, principal: EncryptScope) -> Response:
    """Seal each member of the uploaded archive into an object of its own under
    `metadata.destination.prefix`, as it arrives, and a sealed manifest of them."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(EncryptArchiveMetadata, await form.metadata())
    target = place_prefix(
        svc, principal.tenant, metadata.destination.prefix, metadata.destination.bucket
    )
    note = noted(request)
    note.object = metadata.destination.prefix
    note.context(metadata.encryption_context)
    record = await run_in_threadpool(_start, svc, principal.tenant, metadata, target)
    note.key = metadata.kid
    await form.start_file()
    produce = partial(_produce, svc, record, form)
    return ProducedStreamingResponse(
        produce,
        buffered=PROGRESS_PIECES_BUFFERED,
        idle_timeout=svc.settings.idle_timeout,
        media_type=NDJSON,
        headers={"Location": f"/api/jobs/{record.id}"},
    )


def _start(
    svc: Services, tenant: str, metadata: EncryptArchiveMetadata, target: PrefixTarget
) -> JobRecord:
    """Refuse what the job would fail on at once (a key that may not encrypt now, an
    existing manifest), then save the job's record, running."""
    svc.keys.check_encrypt(tenant, metadata.kid)
    name_key = None
    if metadata.names == "encrypted":
        name_key = target_name_key(svc, tenant, target)
    places = _places(svc, tenant, target, name_key)
    if not metadata.destination.overwrite:
        _require_absent(places)
    params = ArchiveUploadParams(
        kid=metadata.kid,
        format=metadata.format,
        encryption_context=metadata.encryption_context,
        frame_length=metadata.frame_length,
        overwrite=metadata.destination.overwrite,
        names=metadata.names,
        destination=target,
        name_key_version=None if name_key is None else name_key.version,
        name_key_fingerprint=None if name_key is None else name_key.fingerprint,
    )
    now = datetime.now(UTC)
    record = JobRecord.new(JobKind.ENCRYPT_ARCHIVE, tenant, params).model_copy(
        update={"status": JobStatus.RUNNING, "attempts": 1, "started_at": now, "heartbeat_at": now}
    )
    svc.jobs.save(record)
    return record


def _places(
    svc: Services, tenant: str, target: PrefixTarget, name_key: NameKey | None
) -> MemberPlaces:
    """Where the members go; with a `name_key`, under their hidden names."""
    store = svc.spaces.store(tenant, target.bucket)
    return MemberPlaces(store, target.prefix, target.storage_prefix, name_key)


def _require_absent(places: MemberPlaces) -> None:
    manifest = places.place(MANIFEST_NAME)
    try:
        places.store.head(manifest.storage_key)
    except ObjectNotFound:
        return
    raise ObjectExists(
        f"{manifest.key!r} already exists: give destination.overwrite to replace",
        manifest.storage_key,
    )


async def _produce(
    svc: Services, record: JobRecord, form: UploadForm, lines: MemoryObjectSendStream[bytes]
) -> None:
    """Run the job on a thread, its progress sent as lines (from the thread that reports
    it, which is not anyio's); the last line its outcome."""
    chunks = form.file_chunks()
    loop = lowlevel.current_token()

    def emit(events: list[dict[str, Any]]) -> None:
        try:
            from_thread.run(lines.send, b"".join(map(_line, events)), token=loop)
        except (BrokenResourceError, ClosedResourceError):
            raise UploadBroken(
                "client-disconnected", "the uploader stopped reading its progress"
            ) from None

    reader = UploadReader(lambda: from_thread.run(_next_chunk, chunks))
    await lines.send(_line({"event": "started", "jobId": record.id}))
    final = await to_thread.run_sync(
        partial(_run, svc, record, reader, emit), limiter=svc.transfers
    )
    outcome = {
        "event": "finished",
        "status": final.status.value,
        "result": final.result,
        "error": final.error,
    }
    try:
        await lines.send(_line(outcome))
    except (BrokenResourceError, ClosedResourceError):
        return  # the uploader is gone; the job's record says how it ended


async def _next_chunk(chunks: AsyncIterator[memoryview]) -> bytes | None:
    try:
        return bytes(await anext(chunks))
    except StopAsyncIteration:
        return None
    except Problem as problem:  # a form cut short, a stalled or vanished client
        raise UploadBroken(problem.code, problem.detail) from None


def _run(svc: Services, record: JobRecord, reader: UploadReader, emit: Any) -> JobRecord:
    context = JobContext(svc.jobs, record, threading.Event())  # no other worker takes it
    params = record.params_as(ArchiveUploadParams)
    name_key = None
    if params.name_key_version is not None:
        name_key = svc.keys.name_keys.version(
            record.tenant, params.name_key_version, params.name_key_fingerprint
        )
    places = _places(svc, record.tenant, params.destination, name_key)
    run = UploadRun(
        context=context,
        sealing=MemberSealing(
            svc.keys,
            svc.records,
            record.tenant,
            params.kid,
            params.encryption_context,
            params.frame_length,
            places.name_key,
            record.id,
            run_index(
                svc.records,
                record.tenant,
                places.store.bucket,
                places.prefix,
                places.storage_prefix,
                record.id,
            ),
        ),
        places=places,
        limits=archive_limits(svc.settings),
        emit=emit,
        concurrency=svc.settings.batch_concurrency,
    )
    final = run_body(svc.jobs, svc.audit, context, lambda: seal_upload(run, reader))
    assert final is not None  # only a lost lease leaves a job unfinished
    return final


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"
