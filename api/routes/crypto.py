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

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError
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
from api.routes.jobs import start_job, verify_params
from api.schemas import DEFAULT_FRAME_LENGTH, ClientContext, FrameLength, Kid
from api.sealing import (
    check_object,
    decrypt_object,
    decrypt_upload,
    encrypt_to_client,
    encrypt_to_storage,
    start_encryption,
)
from api.services import services
from api.tokens import Principal
from services.placement import ObjectRef
from workers.jobs import JobKind

router = APIRouter(prefix="/api/crypto/stream", tags=["crypto"])
EncryptScope = Annotated[Principal, Depends(require("crypto:encrypt"))]
DecryptScope = Annotated[Principal, Depends(require("crypto:decrypt"))]


class _Metadata(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, extra="forbid")

    encryption_context: ClientContext


class ObjectDestination(ObjectRef):
    overwrite: bool = False


class EncryptMetadata(_Metadata):
    kid: Kid
    frame_length: FrameLength = DEFAULT_FRAME_LENGTH
    destination: ObjectDestination | None = None

    @model_validator(mode="before")
    @classmethod
    def kid_is_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kid" not in data:
            raise PydanticCustomError("missing-kid", "the metadata must name a key: 'kid'")
        return data


class DecryptMetadata(_Metadata):
    kid: Kid | None = None  # if given, the message must be sealed for this key
    source: ObjectRef | None = None


class StoredObject(BaseModel):
    """What an encryption into storage wrote, and the job that verifies it."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, serialize_by_alias=True
    )

    bucket: str
    key: str
    storage_key: str
    ciphertext_size: int
    plaintext_size: int
    plaintext_sha256: str
    etag: str
    kid: str
    key_version: int
    frame_length: int
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
    placement = None
    if metadata.destination is not None:
        placement = svc.spaces.place(principal.tenant, metadata.destination)
    job = await run_in_threadpool(
        start_encryption,
        svc.keys,
        principal.tenant,
        metadata.kid,
        metadata.encryption_context,
        metadata.frame_length,
        placement,
    )
    await form.start_file()
    if placement is None or metadata.destination is None:
        return DuplexStreamingResponse(
            encrypt_to_client(form, job),
            idle_timeout=svc.settings.idle_timeout,
            media_type="application/octet-stream",
            headers=job.headers,
        )
    stored = await encrypt_to_storage(
        form,
        job,
        placement,
        overwrite=metadata.destination.overwrite,
        records=svc.records,
        transfers=svc.transfers,
    )
    verification = await run_in_threadpool(
        start_job, svc, JobKind.VERIFY, principal.tenant, verify_params(placement)
    )
    body = StoredObject(
        bucket=stored.bucket,
        key=placement.key,
        storage_key=stored.key,
        ciphertext_size=stored.ciphertext_size,
        plaintext_size=stored.plaintext_size,
        plaintext_sha256=stored.plaintext_sha256,
        etag=stored.etag,
        kid=stored.kid,
        key_version=stored.key_version,
        frame_length=stored.frame_length,
        verify_job=verification.id,
    )
    return JSONResponse(body.model_dump(), status_code=201, headers=job.headers)


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
        placement = svc.spaces.place(principal.tenant, metadata.source)
        checked = await check_object(
            svc.keys,
            principal.tenant,
            placement,
            records=svc.records,
            serve_unrecorded=svc.settings.serve_unrecorded_objects,
            expected_kid=metadata.kid,
            required_context=metadata.encryption_context,
            transfers=svc.transfers,
        )
        return decrypt_object(
            checked,
            placement,
            # Several Range lines are one list of ranges (RFC 9110 §5.3), as if one line.
            ", ".join(request.headers.getlist("range")) or None,
            expected_kid=metadata.kid,
            idle_timeout=svc.settings.idle_timeout,
            transfers=svc.transfers,
        )
    await form.start_file()
    return await decrypt_upload(
        svc.keys,
        principal.tenant,
        form,
        expected_kid=metadata.kid,
        required_context=metadata.encryption_context,
        idle_timeout=svc.settings.idle_timeout,
    )
