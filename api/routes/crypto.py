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
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any, Self

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import StrictBool, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from api.audit import AuditNote, noted
from api.auth import require
from api.body import parse
from api.duplex import DuplexStreamingResponse
from api.multipart import UploadForm
from api.openapi import (
    AUTHENTICATED,
    FORM,
    KEY_HEADERS,
    SOURCE_KEY_HEADERS,
    answer,
    answers,
    form_request,
    headers,
)
from api.ranges import parse_range
from api.schemas import (
    DEFAULT_FRAME_LENGTH,
    ClientContext,
    FrameLength,
    Kid,
    Metadata,
    NamesKey,
    NamesKeys,
)
from api.services import Services, services
from api.tokens import Principal
from envelope import DEFAULT_LIMITS, Keyring
from keystore import KeyRecord, Uses
from keystore.algorithms import recipient_keyring
from keystore.material import key_name
from services.keys import Sealing, start_sealing, version_of
from services.objects import ObjectSummary
from services.open_stored import (
    CheckedObject,
    ObjectDamaged,
    check_stored,
    stored_plaintext,
    stored_range,
)
from services.open_upload import open_upload
from services.placement import ObjectRef
from services.reencrypt import reencrypt_stored, reencrypt_upload
from services.seal_to_client import seal_to_client
from services.seal_to_storage import seal_upload
from storage import PreconditionFailed

router = APIRouter(prefix="/api/crypto/stream", tags=["crypto"])
EncryptScope = Annotated[Principal, Depends(require("crypto:encrypt"))]
DecryptScope = Annotated[Principal, Depends(require("crypto:decrypt"))]
ReencryptScope = Annotated[Principal, Depends(require("crypto:decrypt", "crypto:encrypt"))]


class _Metadata(Metadata):
    encryption_context: ClientContext


class ObjectDestination(ObjectRef):
    overwrite: bool = False


class EncryptMetadata(_Metadata, NamesKeys):
    # A public JWK (RSA or ML-KEM) of a recipient the service does not hold.
    recipient_public_key: dict[str, Any] | None = None
    frame_length: FrameLength = DEFAULT_FRAME_LENGTH
    # A signed message (suite 0x0578); by default, one with several recipients is.
    signed: StrictBool | None = None
    destination: ObjectDestination | None = None

    @model_validator(mode="after")
    def room_for_every_recipient(self) -> Self:
        """Refused here, before any key's use is counted, rather than by the header."""
        recipients = len(self.kids) + (self.recipient_public_key is not None)
        if recipients > DEFAULT_LIMITS.max_encrypted_data_keys:
            raise PydanticCustomError(
                "too-many-recipients",
                f"a message takes at most {DEFAULT_LIMITS.max_encrypted_data_keys} recipients",
            )
        return self


class DecryptMetadata(_Metadata):
    kid: Kid | None = None  # if given, the message must be sealed for this key
    source: ObjectRef | None = None


class ReencryptMetadata(_Metadata, NamesKey):
    source_kid: Kid | None = None  # if given, the message must be sealed for this key
    source: ObjectRef | None = None
    destination: ObjectDestination | None = None

    @model_validator(mode="after")
    def storage_to_storage(self) -> Self:
        if self.destination is not None and self.source is None:
            raise PydanticCustomError(
                "invalid-destination", "'destination' takes a stored 'source' to re-encrypt"
            )
        return self


class StoredObject(ObjectSummary):
    """What an encryption into storage wrote, and the job that verifies it: queued, or,
    while the queue cannot be reached, parked until the sweep queues it."""

    verify_job: str
    verify_queued: bool


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
REENCRYPTED = {
    200: answer(
        "The new message, streamed back as the old one arrives (aborted on a failure, its "
        "final frame only once the old message's final frame has authenticated).",
        media_type=OCTET_STREAM,
        schema=BINARY,
        with_headers=headers("X-Source-Message-Proven", *SOURCE_KEY_HEADERS, *KEY_HEADERS),
    ),
    201: answer(
        "The object `metadata.source` was re-encrypted, in place or into "
        "`metadata.destination`, and the job that verifies it started.",
        StoredObject,
        with_headers=headers(*SOURCE_KEY_HEADERS, *KEY_HEADERS),
    ),
}
OPENED = {
    200: answer(
        "The plaintext, streamed (aborted on a failure).",
        media_type=OCTET_STREAM,
        schema=BINARY,
        with_headers=headers("X-Message-Proven", *KEY_HEADERS, "Accept-Ranges"),
    ),
    206: answer(
        "The plaintext bytes the `Range` header asked for, of the object `metadata.source`.",
        media_type=OCTET_STREAM,
        schema=BINARY,
        with_headers=headers(
            "X-Message-Proven",
            *KEY_HEADERS,
            "Accept-Ranges",
            "Content-Range",
            "X-Signature-Checked",
            required=("Content-Range",),
        ),
    ),
}


def key_headers(
    requested: str, record: KeyRecord, keyring: Keyring, prefix: str = "X-"
) -> dict[str, str]:
    """The headers naming the key asked for, the key used (`kid#version`), and its
    algorithm; `X-Source-` ones for the key a message is re-encrypted from."""
    return named_key_headers(requested, keyring.key_name, record.alg, prefix)


def recipient_headers(kids: list[str], sealing: Sealing) -> dict[str, str]:
    """The key headers of a message sealed for one key or several: each header lists its
    values in the order of the keys, the public key of a recipient the service does not
    hold last (`jwk#<thumbprint>`)."""
    algorithms = [sealing.key.alg, *(other.alg for other in sealing.others)]
    return named_key_headers(", ".join(kids), ", ".join(sealing.key_names), ", ".join(algorithms))


def recipient_warning_headers(svc: Services, sealing: Sealing) -> dict[str, str]:
    """The warnings of every key a message is sealed for, as `recipient_headers` names
    them: each warning header, if any key has it, lists one value per key in their order,
    `none` for a key it does not apply to (a recipient the service does not hold, whose
    uses it does not count, always)."""
    each = [warning_headers(svc, sealing.key, sealing.keyring, sealing.uses)]
    each += [
        {}
        if other.record is None or other.uses is None
        else warning_headers(svc, other.record, other.keyring, other.uses)
        for other in sealing.others
    ]
    names = sorted({name for headers in each for name in headers})
    return {name: ", ".join(headers.get(name, "none") for headers in each) for name in names}


def named_key_headers(requested: str, used: str, alg: str, prefix: str = "X-") -> dict[str, str]:
    return {
        f"{prefix}Key-Requested": requested,
        f"{prefix}Key-Used": used,
        f"{prefix}Algorithm-Used": alg,
    }


def warning_headers(
    svc: Services, record: KeyRecord, keyring: Keyring, uses: Uses, prefix: str = "X-"
) -> dict[str, str]:
    """The warnings that the key has reached its soft usage limit (`uses` being its counts
    with this message) or expires soon, when they apply; `X-Source-` ones for the key a
    message is re-encrypted from."""
    return warnings(svc, record, version_of(keyring), uses, prefix)


def warnings(
    svc: Services, record: KeyRecord, version: int, uses: Uses, prefix: str = "X-"
) -> dict[str, str]:
    """`warning_headers` for a use of the key's `version`."""
    headers = {}
    if record.soft_limit_reached(uses, version):
        headers[f"{prefix}Key-Usage-Limit-Warning"] = usage_warning(record, uses, version)
    window = timedelta(seconds=svc.settings.key_expiration_warning)
    if record.expires_at is not None and record.expiry_near(datetime.now(UTC), window):
        headers[f"{prefix}Key-Expiration-Warning"] = f"expiresAt={rfc3339(record.expires_at)}"
    return headers


def usage_warning(record: KeyRecord, uses: Uses, version: int) -> str:
    """`usageCount=N; softUsageLimit=S` and, if set, `; maxUsageLimit=M`; for a key that
    rotates on its soft limit, also the count of the version used, which is what the soft
    limit is measured against."""
    fields = [f"usageCount={uses.total}", f"softUsageLimit={record.soft_usage_limit}"]
    if record.max_usage_limit is not None:
        fields.append(f"maxUsageLimit={record.max_usage_limit}")
    if record.rotate_on_usage_limit:
        fields.append(f"versionUsageCount={uses.of(version).uses}")
    return "; ".join(fields)


def proven_header(proven: bool, prefix: str = "X-") -> dict[str, str]:
    """Whether the message read was written by this service (`services.provenance`)."""
    return {f"{prefix}Message-Proven": "true" if proven else "false"}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


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
    kids = metadata.kids
    partner = metadata.recipient_public_key
    partners = [] if partner is None else [recipient_keyring(partner)]
    several = len(kids) + len(partners) > 1
    sealing = await run_in_threadpool(
        partial(
            start_sealing,
            svc.keys,
            principal.tenant,
            kids[0],
            metadata.encryption_context,
            metadata.frame_length,
            object_key=None if placement is None else placement.storage_key,
            signed=several if metadata.signed is None else metadata.signed,
            more_kids=kids[1:],
            partners=partners,
        )
    )
    headers = {
        **recipient_headers(kids, sealing),
        **recipient_warning_headers(svc, sealing),
    }
    note = noted(request)
    note.key = ", ".join(sealing.key_names)
    note.object = None if destination is None else destination.key
    note.context(metadata.encryption_context)
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
    verification, queued = await run_in_threadpool(svc.verify_stored, principal.tenant, placement)
    body = StoredObject.of(stored, placement.key, verify_job=verification.id, verify_queued=queued)
    return JSONResponse(body.model_dump(), status_code=201, headers=headers)


@router.post(
    "/decrypt",
    response_model=None,
    responses=answers(OPENED, AUTHENTICATED, FORM, (404, 409, 412, 416)),
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
    note = noted(request)
    note.context(metadata.encryption_context)
    if metadata.source is not None:
        note.object = metadata.source.key
        await form.expect_end()
        # Several Range lines are one list of ranges (RFC 9110 §5.3), as if one line.
        ranges = ", ".join(request.headers.getlist("range")) or None
        checked = await _check_stored(svc, principal.tenant, metadata, metadata.source)
        try:
            answer = await _stored_answer(svc, metadata, checked, ranges, note)
        except PreconditionFailed:
            # Replaced (re-encrypted in place, say) between its check and its read: the
            # object as it is now, checked again. A read once open keeps its version.
            checked = await _check_stored(svc, principal.tenant, metadata, metadata.source)
            answer = await _stored_answer(svc, metadata, checked, ranges, note)
        note.key = checked.opened.keyring.key_name
        return answer
    await form.start_file()
    opened = await open_upload(
        svc.keys,
        principal.tenant,
        form.file_chunks(),
        expected_kid=metadata.kid,
        context=metadata.encryption_context,
        refuse_unproven=svc.settings.refuse_unproven_messages,
    )
    note.key = opened.keyring.key_name
    headers = {
        **proven_header(opened.proven),
        **key_headers(metadata.kid or opened.key.kid, opened.key, opened.keyring),
        **warning_headers(svc, opened.key, opened.keyring, opened.uses),
    }
    return streamed(opened.plaintext, svc, headers)


@router.post(
    "/reencrypt",
    response_model=None,
    responses=answers(REENCRYPTED, AUTHENTICATED, FORM, (404, 409, 412)),
    openapi_extra=form_request(
        ReencryptMetadata,
        file_required=False,
        file="The message, streamed; left out with `metadata.source`.",
    ),
)
async def reencrypt(request: Request, principal: ReencryptScope) -> Response:
    """Re-encrypt the message in the `file` part (or the object `metadata.source`) for
    the key `metadata.kid`, under a fresh data key, in one pass."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(ReencryptMetadata, await form.metadata())
    note = noted(request)
    note.context(metadata.encryption_context)
    if metadata.source is not None:
        note.object = metadata.source.key
        await form.expect_end()
        return await _reencrypt_stored(svc, principal.tenant, metadata, metadata.source)
    await form.start_file()
    reencrypting = await reencrypt_upload(
        svc.keys,
        principal.tenant,
        form.file_chunks(),
        source_kid=metadata.source_kid,
        kid=metadata.kid,
        context=metadata.encryption_context,
        refuse_unproven=svc.settings.refuse_unproven_messages,
    )
    opened, sealing = reencrypting.opened, reencrypting.sealing
    note.key = sealing.keyring.key_name
    headers = {
        **proven_header(opened.proven, "X-Source-"),
        **key_headers(
            metadata.source_kid or opened.key.kid, opened.key, opened.keyring, "X-Source-"
        ),
        **warning_headers(svc, opened.key, opened.keyring, opened.uses, "X-Source-"),
        **key_headers(metadata.kid, sealing.key, sealing.keyring),
        **warning_headers(svc, sealing.key, sealing.keyring, sealing.uses),
    }
    return streamed(reencrypting.message, svc, headers)


async def _reencrypt_stored(
    svc: Services, tenant: str, metadata: ReencryptMetadata, source: ObjectRef
) -> Response:
    """The object `source` re-encrypted in place, or into `metadata.destination` (201)."""
    destination = metadata.destination
    placement = svc.spaces.place(tenant, source)
    target = None if destination is None else svc.spaces.place(tenant, destination)
    old, done = await to_thread.run_sync(
        partial(
            reencrypt_stored,
            svc.keys,
            svc.records,
            placement,
            source_kid=metadata.source_kid,
            kid=metadata.kid,
            destination=target,
            overwrite=destination is not None and destination.overwrite,
            context=metadata.encryption_context,
        ),
        limiter=svc.transfers,
    )
    new, sealing = done.record, done.sealing
    old_version = old.key_version
    headers = {
        **named_key_headers(
            metadata.source_kid or old.kid, key_name(old.kid, old_version), old.alg, "X-Source-"
        ),
        **warnings(svc, done.opened_by, old_version, done.opened_uses, "X-Source-"),
        # The object's other keys, which it stays sealed for, are listed after the new one.
        **recipient_headers([metadata.kid], sealing),
        **recipient_warning_headers(svc, sealing),
    }
    written = source if destination is None else destination
    verification, queued = await run_in_threadpool(svc.verify_stored, tenant, target or placement)
    body = StoredObject.of(new, written.key, verify_job=verification.id, verify_queued=queued)
    return JSONResponse(body.model_dump(), status_code=201, headers=headers)


async def _check_stored(
    svc: Services, tenant: str, metadata: DecryptMetadata, source: ObjectRef
) -> CheckedObject:
    return await check_stored(
        svc.keys,
        tenant,
        svc.spaces.place(tenant, source),
        records=svc.records,
        serve_unrecorded=svc.settings.serve_unrecorded_objects,
        expected_kid=metadata.kid,
        context=metadata.encryption_context,
        refuse_unproven=svc.settings.refuse_unproven_messages,
        transfers=svc.transfers,
    )


async def _stored_answer(
    svc: Services,
    metadata: DecryptMetadata,
    checked: CheckedObject,
    ranges: str | None,
    note: AuditNote,
) -> Response:
    """The object checked, or just the frames a `Range` needs (206): every length and
    range in the answer comes from its authenticated layout."""
    total = checked.layout.plaintext_length
    wanted = parse_range(ranges, total)
    headers = {
        "Accept-Ranges": "bytes",
        **proven_header(checked.proven if wanted is None else checked.range_proven),
        **key_headers(metadata.kid or checked.key.kid, checked.key, checked.opened.keyring),
        **warning_headers(svc, checked.key, checked.opened.keyring, checked.uses),
    }
    if wanted is None:
        plaintext = await stored_plaintext(checked, svc.transfers, svc.keys.name_keys)
        body = _refusal_noted(plaintext, note)
        return streamed(body, svc, {**headers, "Content-Length": str(total)})
    first, last = wanted
    if checked.opened.header.signed:
        # A range authenticates its frames; the footer's signature takes the whole message.
        headers["X-Signature-Checked"] = "false"
    headers["Content-Length"] = str(last - first + 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{total}"
    ranged = await stored_range(checked, first, last, svc.transfers)
    return streamed(ranged, svc, headers, 206)


async def _refusal_noted(body: AsyncIterator[bytes], note: AuditNote) -> AsyncIterator[bytes]:
    """`body`; a stored object found damaged once its answer has started aborts it, and
    its audit event says why."""
    try:
        async for piece in body:
            yield piece
    except ObjectDamaged:
        note.refusal = ObjectDamaged.code
        raise
