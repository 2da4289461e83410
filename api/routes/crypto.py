"""Streaming encryption and decryption: `metadata` then `file` in, the other side out.

- `POST /api/crypto/stream/encrypt`: ciphertext streamed back frame by frame while the
  upload is still arriving, or, with `metadata.destination`, written into object storage
  through a multipart upload (201 with what was stored).
- `POST /api/crypto/stream/decrypt`: plaintext streamed back; or, with `metadata.source`,
  an object read from storage, where `Range: bytes=a-b` reads only the frames it needs.

Nothing is answered before the metadata (and, to decrypt, the message header) has been
read and checked, so bad input gets a clean 4xx. After that, a failure aborts the
response or the upload: never a clean end to a short stream, never a visible partial
object. AES-GCM and SHA-256 run in worker threads, a frame's worth at a time.
"""

from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.body import parse
from api.duplex import DuplexStreamingResponse
from api.multipart import UploadForm
from api.openapi import (
    AUTHENTICATED,
    FORM,
    KEY_HEADERS,
    answer,
    answers,
    form_request,
    headers,
)
from api.ranges import parse_range
from api.schemas import DEFAULT_FRAME_LENGTH, ClientContext, FrameLength, Kid, Metadata, NamesKey
from api.services import Services, services
from api.tokens import Principal
from envelope import Keyring
from keystore import KeyRecord
from services.keys import start_sealing
from services.objects import ObjectSummary
from services.open_stored import check_stored, stored_plaintext, stored_range
from services.open_upload import open_upload
from services.placement import ObjectRef
from services.seal_to_client import seal_to_client
from services.seal_to_storage import seal_upload

router = APIRouter(prefix="/api/crypto/stream", tags=["crypto"])
EncryptScope = Annotated[Principal, Depends(require("crypto:encrypt"))]
DecryptScope = Annotated[Principal, Depends(require("crypto:decrypt"))]


class _Metadata(Metadata):
    encryption_context: ClientContext


class ObjectDestination(ObjectRef):
    overwrite: bool = False


class EncryptMetadata(_Metadata, NamesKey):
    frame_length: FrameLength = DEFAULT_FRAME_LENGTH
    destination: ObjectDestination | None = None


class DecryptMetadata(_Metadata):
    kid: Kid | None = None  # if given, the message must be sealed for this key
    source: ObjectRef | None = None


class StoredObject(ObjectSummary):
    """What an encryption into storage wrote, and the job that verifies it."""

    verify_job: str


BINARY = {"type": "string", "format": "binary"}
OCTET_STREAM = "application/octet-stream"
SEALED = {
    200: answer(
        "The message, streamed back as the file part arrives (aborted on a failure).",
        media_type=OCTET_STREAM,
        schema=BINARY,
        with_headers=headers(*KEY_HEADERS),
    ),
    201: answer(
        "The message was written to `metadata.destination`.",
        StoredObject,
        with_headers=headers(*KEY_HEADERS),
    ),
}
OPENED = {
    200: answer(
        "The plaintext, streamed (aborted on a failure).",
        media_type=OCTET_STREAM,
        schema=BINARY,
        with_headers=headers(*KEY_HEADERS, "Accept-Ranges"),
    ),
    206: answer(
        "The plaintext bytes the `Range` header asked for, of the object `metadata.source`.",
        media_type=OCTET_STREAM,
        schema=BINARY,
        with_headers=headers(
            *KEY_HEADERS, "Accept-Ranges", "Content-Range", required=("Content-Range",)
        ),
    ),
}


def key_headers(requested: str, record: KeyRecord, keyring: Keyring) -> dict[str, str]:
    """The headers naming the key asked for, the key used (`kid#version`), and its algorithm."""
    return {
        "X-Key-Requested": requested,
        "X-Key-Used": keyring.key_name,
        "X-Algorithm-Used": record.alg,
    }


def streamed(
    body: AsyncIterator[bytes | bytearray | memoryview],
    svc: Services,
    headers: dict[str, str],
    status_code: int = 200,
) -> Response:
    return DuplexStreamingResponse(
        body,
        idle_timeout=svc.settings.idle_timeout,
        status_code=status_code,
        media_type=OCTET_STREAM,
        headers=headers,
    )


@router.post(
    "/encrypt",
    response_model=None,
    responses=answers(SEALED, AUTHENTICATED, FORM, (404, 409, 412)),
    openapi_extra=form_request(
        EncryptMetadata, file_required=True, file="The plaintext, streamed."
    ),
)
async def encrypt(request: Request, principal: EncryptScope) -> Response:
    """Encrypt the `file` part under the key `metadata.kid`."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(EncryptMetadata, await form.metadata())
    destination = metadata.destination
    placement = None if destination is None else svc.spaces.place(principal.tenant, destination)
    sealing = await run_in_threadpool(
        partial(
            start_sealing,
            svc.keys,
            principal.tenant,
            metadata.kid,
            metadata.encryption_context,
            metadata.frame_length,
            object_key=None if placement is None else placement.storage_key,
        )
    )
    headers = key_headers(metadata.kid, sealing.key, sealing.keyring)
    await form.start_file()
    if placement is None or destination is None:
        chunks = form.file_chunks()
        return streamed(
            seal_to_client(svc.keys, sealing, chunks, form.expected_file_length), svc, headers
        )
    stored = await seal_upload(
        svc.keys,
        sealing,
        form.file_chunks(),
        placement,
        overwrite=destination.overwrite,
        records=svc.records,
        transfers=svc.transfers,
    )
    verification = await run_in_threadpool(svc.start_verify, principal.tenant, placement)
    body = StoredObject.of(stored, placement.key, verify_job=verification.id)
    return JSONResponse(body.model_dump(), status_code=201, headers=headers)


@router.post(
    "/decrypt",
    response_model=None,
    responses=answers(OPENED, AUTHENTICATED, FORM, (404, 409, 416)),
    openapi_extra=form_request(
        DecryptMetadata,
        file_required=False,
        file="The message, streamed; left out with `metadata.source`.",
    ),
)
async def decrypt(request: Request, principal: DecryptScope) -> Response:
    """Decrypt the `file` part, or the object `metadata.source` (ranges allowed)."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(DecryptMetadata, await form.metadata())
    if metadata.source is not None:
        await form.expect_end()
        # Several Range lines are one list of ranges (RFC 9110 §5.3), as if one line.
        ranges = ", ".join(request.headers.getlist("range")) or None
        return await _decrypt_stored(svc, principal.tenant, metadata, metadata.source, ranges)
    await form.start_file()
    opened = await open_upload(
        svc.keys,
        principal.tenant,
        form.file_chunks(),
        expected_kid=metadata.kid,
        context=metadata.encryption_context,
    )
    headers = key_headers(metadata.kid or opened.key.kid, opened.key, opened.keyring)
    return streamed(opened.plaintext, svc, headers)


async def _decrypt_stored(
    svc: Services, tenant: str, metadata: DecryptMetadata, source: ObjectRef, ranges: str | None
) -> Response:
    """The object `source`, or just the frames a `Range` needs (206): every length and
    range in the answer comes from its authenticated layout."""
    checked = await check_stored(
        svc.keys,
        tenant,
        svc.spaces.place(tenant, source),
        records=svc.records,
        serve_unrecorded=svc.settings.serve_unrecorded_objects,
        expected_kid=metadata.kid,
        context=metadata.encryption_context,
        transfers=svc.transfers,
    )
    total = checked.layout.plaintext_length
    wanted = parse_range(ranges, total)
    headers = {
        "Accept-Ranges": "bytes",
        **key_headers(metadata.kid or checked.key.kid, checked.key, checked.opened.keyring),
    }
    if wanted is None:
        body = stored_plaintext(checked, svc.transfers)
        return streamed(body, svc, {**headers, "Content-Length": str(total)})
    first, last = wanted
    headers["Content-Length"] = str(last - first + 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{total}"
    return streamed(stored_range(checked, first, last, svc.transfers), svc, headers, 206)
