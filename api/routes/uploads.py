"""Resumable encrypt-to-storage: the tus 1.0 protocol (core, creation, termination,
expiration), so that tus clients (tuspy, Uppy, tus-js-client) upload into storage through
the service, sealed on the way, and go on after a dropped connection or a server restart
(`services.resumable` says how without plaintext at rest or a nonce used twice).

- `OPTIONS /api/uploads`: what the server speaks.
- `POST /api/uploads`: create an upload of `Upload-Length` bytes; `Upload-Metadata`
  carries `kid`, `destination` (the object key), and optionally `bucket`, `overwrite`,
  `context` (a JSON object) and `frameLength`. 201 with its `Location`.
- `HEAD /api/uploads/{id}`: its `Upload-Offset`, where the client goes on from.
- `PATCH /api/uploads/{id}`: the next bytes (`application/offset+octet-stream`) from
  `Upload-Offset`. The offset moves by whole frames; the bytes of a frame cut short are
  dropped and sent again. The PATCH that ends the upload makes the object visible.
- `DELETE /api/uploads/{id}`: abort it; nothing stays in storage.

An upload is its tenant's: another tenant's token finds none.
"""

import asyncio
import base64
import binascii
from collections.abc import Callable
from contextlib import suppress
from email.utils import format_datetime
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
from anyio import to_thread
from fastapi import APIRouter, Depends, Request, Response
from starlette.requests import ClientDisconnect

from api.audit import noted
from api.auth import require
from api.body import body_chunks, parse, parse_json
from api.openapi import AUTHENTICATED, answer, answers
from api.problems import Problem
from api.routes.crypto import ObjectDestination
from api.schemas import DEFAULT_FRAME_LENGTH, ClientContext, FrameLength, NamesKey
from api.services import Services, services
from api.tokens import Principal
from services.placement import ObjectRef
from services.resumable import (
    MAX_LENGTH,
    PART_TARGET,
    Appending,
    CompletedUpload,
    NewUpload,
    PatchTooShort,
    UploadBusy,
    UploadNotFound,
    UploadState,
)
from storage import ObjectNotFound

router = APIRouter(prefix="/api/uploads", tags=["uploads"])
EncryptScope = Annotated[Principal, Depends(require("crypto:encrypt"))]

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,termination,expiration"
OFFSET_STREAM = "application/offset+octet-stream"
# Plaintext handed to the sealing thread at a time: fewer hops than uvicorn's chunks.
HANDOFF_BYTES = 1 << 20
T = TypeVar("T")
# What a frame in flight holds beside its bytes: its buffer's header, its place in the
# queue, its piece of a hashing task's future, the views of the chunks it came in.
FRAME_OBJECTS = 1024
METADATA_FIELDS = ("kid", "destination", "bucket", "overwrite", "context", "frameLength")


class UploadMetadata(NamesKey):
    """`Upload-Metadata`, decoded: what the message is sealed under and where it goes."""

    destination: ObjectDestination
    encryption_context: ClientContext
    frame_length: FrameLength = DEFAULT_FRAME_LENGTH


CREATED = {201: answer("The upload was created at `Location`.")}
OFFSET = {
    200: answer(
        "The upload's offset: `Upload-Offset` of `Upload-Length` bytes; for an upload "
        "completed already (while its tombstone lives), both the length and "
        "`X-Upload-Completed: 1`."
    )
}
PATCHED = {204: answer("The bytes were sealed and stored up to the new `Upload-Offset`.")}
TERMINATED = {204: answer("The upload is aborted; nothing of it stays in storage.")}
OPTIONS = {204: answer("The tus versions and extensions the server speaks.")}


def tus(**more: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **more}


def state_headers(state: UploadState) -> dict[str, str]:
    return tus(
        **{
            "Upload-Offset": str(state.offset),
            "Upload-Length": str(state.length),
            "Upload-Expires": format_datetime(state.expires_at, usegmt=True),
        }
    )


def require_tus(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise Problem(
            412,
            "tus-version-unsupported",
            f"send Tus-Resumable: {TUS_VERSION}",
            headers={"Tus-Version": TUS_VERSION},
        )


def header_int(request: Request, name: str, *, required: bool = True) -> int | None:
    """A header holding a non-negative integer; a 400 problem if it holds anything else."""
    value = request.headers.get(name)
    if value is None and not required:
        return None
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        raise Problem(400, "invalid-header", f"{name} must be a non-negative integer")
    return int(value)


def decoded_metadata(header: str) -> dict[str, str]:
    """`Upload-Metadata`: `key base64`, comma-separated, each key once; keys other than
    the service's (a client's `filename`, say) are let by, unread."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in header.split(","))):
        key, _, encoded = item.partition(" ")
        if key in pairs:
            raise Problem(400, "invalid-upload-metadata", f"Upload-Metadata names {key!r} twice")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Problem(
                400, "invalid-upload-metadata", f"the value of {key!r} is not base64 UTF-8"
            ) from None
    return {key: value for key, value in pairs.items() if key in METADATA_FIELDS}


def upload_metadata(header: str) -> UploadMetadata:
    pairs = decoded_metadata(header)
    fields: dict[str, Any] = {"kid": pairs.get("kid")} if "kid" in pairs else {}
    if "destination" in pairs:
        fields["destination"] = {
            "key": pairs["destination"],
            **({"bucket": pairs["bucket"]} if "bucket" in pairs else {}),
            "overwrite": pairs.get("overwrite", "false"),
        }
    if "context" in pairs:
        try:
            fields["encryptionContext"] = parse_json(pairs["context"].encode())
        except ValueError:
            raise Problem(400, "invalid-upload-metadata", "'context' is not JSON") from None
    if "frameLength" in pairs:
        fields["frameLength"] = pairs["frameLength"]
    return parse(UploadMetadata, fields)


@router.options("", status_code=204, response_model=None, responses=answers(OPTIONS, AUTHENTICATED))
async def capabilities(principal: EncryptScope) -> Response:
    """The tus version and extensions the server speaks."""
    return Response(
        status_code=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Max-Size": str(MAX_LENGTH),
        },
    )


@router.post(
    "",
    status_code=201,
    response_model=None,
    responses=answers(CREATED, AUTHENTICATED, (400, 404, 409, 412, 413, 422, 429)),
)
async def create(request: Request, principal: EncryptScope) -> Response:
    """Create an upload of `Upload-Length` bytes, sealed under `kid` into `destination`."""
    require_tus(request)
    length = header_int(request, "upload-length")
    assert length is not None
    if length > MAX_LENGTH:
        raise Problem(413, "upload-too-large", f"an upload takes at most {MAX_LENGTH} bytes")
    metadata = upload_metadata(request.headers.get("upload-metadata", ""))
    svc = services(request)
    placement = svc.spaces.place(principal.tenant, metadata.destination)
    note = noted(request)
    note.object = metadata.destination.key
    note.bucket = placement.bucket
    note.context(metadata.encryption_context)
    new = NewUpload(
        kid=metadata.kid,
        length=length,
        frame_length=metadata.frame_length,
        context=metadata.encryption_context,
        overwrite=metadata.destination.overwrite,
    )
    state = await to_thread.run_sync(
        svc.uploads().create, principal.tenant, placement, new, limiter=svc.transfers
    )
    note.key = f"{state.kid}#{state.key_version}"
    headers = state_headers(state) | {"Location": f"{router.prefix}/{state.id}"}
    return Response(status_code=201, headers=headers)


@router.head(
    "/{upload}", response_model=None, responses=answers(OFFSET, AUTHENTICATED, (404, 412, 502, 503))
)
async def offset(request: Request, upload: str, principal: EncryptScope) -> Response:
    """Where the upload goes on from: every byte before `Upload-Offset` is sealed and
    stored."""
    require_tus(request)
    svc = services(request)
    found = await to_thread.run_sync(svc.uploads().get, principal.tenant, upload)
    if isinstance(found, CompletedUpload):  # as tusd answers a finished upload
        length = str(found.length)
        completed = {"Upload-Offset": length, "Upload-Length": length, "X-Upload-Completed": "1"}
        return Response(status_code=200, headers=tus(**completed))
    state, record = found
    headers = state_headers(state)
    if record is not None:  # completed now
        headers["X-Verify-Job"] = await _verify(svc, tenant=principal.tenant, state=state)
    return Response(status_code=200, headers=headers)


@router.patch(
    "/{upload}",
    status_code=204,
    response_model=None,
    responses=answers(PATCHED, AUTHENTICATED, (400, 404, 408, 409, 412, 415, 423, 503)),
)
async def append(request: Request, upload: str, principal: EncryptScope) -> Response:
    """Seal and store the bytes from `Upload-Offset` on."""
    require_tus(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != OFFSET_STREAM:
        raise Problem(415, "unsupported-media-type", f"send the bytes as {OFFSET_STREAM}")
    start = header_int(request, "upload-offset")
    assert start is not None
    sent = header_int(request, "content-length", required=False)
    svc = services(request)
    with svc.streams.holding(principal.tenant) as held:
        appending = await to_thread.run_sync(
            svc.uploads().begin,
            principal.tenant,
            upload,
            start,
            sent,
            lambda state: held.take(patch_memory(state)),
            limiter=svc.transfers,
        )
        return await _appended(request, svc, principal.tenant, appending, start)


def patch_memory(state: UploadState) -> int:
    """The most a PATCH on the upload holds: the plaintext read ahead of the sealing (up
    to `PART_TARGET` read, and the HTTP server's read-ahead past it, while as much is
    handed over and copied into frames, behind what is left of a part's frames not
    sealed yet) and three parts' ciphertext (one being sealed, one recorded, one
    stored); a short upload's no more than its message. Each frame in flight costs its
    Python objects too, which small frames make many of."""
    read = min(PART_TARGET, state.length)
    frames = -(-4 * read // state.frame_length) + state.frames_per_part
    return 4 * read + 4 * min(state.part_size, state.ciphertext_size()) + frames * FRAME_OBJECTS


async def _appended(
    request: Request, svc: Services, tenant: str, appending: Appending, start: int
) -> Response:
    """Feed the body to `appending` and answer the PATCH."""
    note = noted(request)
    note.object = appending.state.key
    note.key = f"{appending.state.kid}#{appending.state.key_version}"
    try:
        cut = await _feed(svc, request, appending)
        state = await _to_its_end(svc, appending.end)
    except BaseException as error:
        await _to_its_end(svc, appending.abandon)
        # Its state or parts gone under it: taken by another request, or swept.
        if isinstance(error, UploadBusy | ObjectNotFound) and (
            gone := await _to_its_end(svc, appending.gone)
        ):
            raise UploadNotFound(gone) from None
        raise
    if isinstance(cut, Problem):
        raise cut  # what was whole of it is stored: the client asks HEAD and goes on
    if cut is None and state.offset == start and appending.record is None:
        # A chunked body ended short of a frame: the same offset again would loop a client.
        raise PatchTooShort(
            f"a PATCH carries at least one frame ({state.frame_length} bytes) or the rest "
            "of the upload: less cannot move the offset"
        )
    headers = state_headers(state)
    if appending.record is not None:
        headers["X-Verify-Job"] = await _verify(svc, tenant=tenant, state=state)
    return Response(status_code=204, headers=headers)


async def _verify(svc: Services, *, tenant: str, state: UploadState) -> str:
    """Start the verify job of the object an upload completed; its id."""
    placement = svc.spaces.place(tenant, ObjectRef(key=state.key, bucket=state.bucket))
    job, _ = await to_thread.run_sync(svc.verify_stored, tenant, placement)
    return job.id


async def _feed(
    svc: Services, request: Request, appending: Appending
) -> ClientDisconnect | Problem | None:
    """Hand the body to `appending` as it arrives, reading on while a thread seals and
    stores what came before (up to about a part ahead of it); the body's own failure
    (the client gone, or too slow), if it had one, returned rather than raised: the
    frames that did arrive whole are still sealed and acknowledged."""
    handoff: list[bytes] = []  # as the chunks came: joined, they would be copied twice
    handed = 0
    writing: asyncio.Task[None] | None = None
    try:
        async for chunk in body_chunks(request, svc.settings):
            handoff.append(chunk)
            handed += len(chunk)
            busy = writing is not None and not writing.done()
            if handed < HANDOFF_BYTES or (busy and handed < PART_TARGET):
                continue
            if writing is not None:
                await writing  # in order, one at a time; raises what it failed with
            writing = asyncio.create_task(_write(svc, appending, handoff))
            handoff, handed = [], 0
    except ClientDisconnect as gone:
        cut: ClientDisconnect | Problem | None = gone
    except Problem as problem:
        if problem.status != 408:
            await _settled(writing)
            raise
        cut = problem
    except BaseException:
        await _settled(writing)
        raise
    else:
        cut = None
    if writing is not None:
        try:
            await writing
        except BaseException:
            await _settled(writing)  # cancelled here, it may still be sealing
            raise
    if handoff:
        await _write(svc, appending, handoff)
    return cut


async def _write(svc: Services, appending: Appending, chunks: list[bytes]) -> None:
    await _to_its_end(svc, partial(appending.write_chunks, chunks))


async def _to_its_end(svc: Services, work: Callable[[], T]) -> T:
    """`work()` on a worker thread, awaited until it has ended even if the request is
    cancelled meanwhile (a server shutting down): `to_thread.run_sync` answers such a
    cancellation at once, its thread still running, and a PATCH's next step (`abandon`)
    must never run beside it."""
    running = asyncio.ensure_future(to_thread.run_sync(work, limiter=svc.transfers))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with suppress(BaseException):
            await running
        raise


async def _settled(writing: "asyncio.Task[None] | None") -> None:
    """Wait for a write in flight to end, whatever it ends with, before the upload is let
    go of: two threads must never write one upload's state."""
    if writing is None:
        return
    with anyio.CancelScope(shield=True), suppress(Exception):
        await writing


@router.delete(
    "/{upload}",
    status_code=204,
    response_model=None,
    responses=answers(TERMINATED, AUTHENTICATED, (404, 412, 423)),
)
async def terminate(request: Request, upload: str, principal: EncryptScope) -> Response:
    """Abort the upload: its parts and state are erased."""
    require_tus(request)
    svc = services(request)
    await to_thread.run_sync(svc.uploads().terminate, principal.tenant, upload)
    return Response(status_code=204, headers=tus())
