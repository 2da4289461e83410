"""Streaming signatures: `metadata` then `file` in, a detached JWS or a verdict out.

- `POST /api/crypto/stream/sign`: the detached JWS (compact form, empty payload, over the
  unencoded payload: RFC 7797) of the `file` part, by the primary version of
  `metadata.kid`, as `application/jose`.
- `POST /api/crypto/stream/verify`: checks `metadata.signature` over the `file` part, with
  the key its header names, `metadata.kid`, or the public JWK `metadata.publicKey`:
  200 `{"valid": true, "kid", "alg"}`, or 422 `signature-invalid`.
- `POST /api/crypto/stream/resign`: checks the old signature with its key, and signs the
  same bytes in the same pass with `metadata.kid`; refused if the old one does not verify.

The file is hashed as it arrives, and nothing is answered before its last byte: so every
failure, an invalid signature included, is a problem document.
"""

from functools import partial
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, model_validator
from pydantic.alias_generators import to_snake
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.body import parse
from api.multipart import UploadForm
from api.openapi import (
    AUTHENTICATED,
    FORM,
    KEY_HEADERS,
    SOURCE_WARNING_HEADERS,
    WARNING_HEADERS,
    answer,
    answers,
    form_request,
    headers,
)
from api.routes.crypto import named_key_headers, warnings
from api.schemas import Kid, Metadata, NamesKey
from api.services import Services, services
from api.tokens import Principal
from services.signing import (
    Signing,
    Verifying,
    resign_stream,
    sign_stream,
    start_signing,
    start_verifying,
    verify_stream,
)

router = APIRouter(prefix="/api/crypto/stream", tags=["signatures"])
SignScope = Annotated[Principal, Depends(require("crypto:sign"))]
VerifyScope = Annotated[Principal, Depends(require("crypto:verify"))]
ResignScope = Annotated[Principal, Depends(require("crypto:verify", "crypto:sign"))]
JOSE = "application/jose"  # RFC 7515 §9.2.1: a JWS in compact form


class SignMetadata(NamesKey):
    pass


class _ChecksSignature(Metadata):
    """Metadata with a signature to check, and the key to check it with named by at most
    one of two fields (`key_fields`: a kid, a public JWK)."""

    key_fields: ClassVar[tuple[str, str]]
    signature: str

    @model_validator(mode="before")
    @classmethod
    def one_key(cls, data: Any) -> Any:
        kid, public_key = cls.key_fields
        if isinstance(data, dict) and kid in data and public_key in data:
            raise PydanticCustomError(
                "conflicting-keys", f"name the key with '{kid}' or give '{public_key}', not both"
            )
        return data

    def checking_key(self) -> tuple[str | None, dict[str, Any] | None]:
        """The kid, or the public JWK, to check the signature with (or neither)."""
        kid, public_key = (getattr(self, to_snake(name)) for name in self.key_fields)
        return kid, public_key


class VerifyMetadata(_ChecksSignature):
    key_fields = ("kid", "publicKey")
    kid: Kid | None = None
    public_key: dict[str, Any] | None = None


class ResignMetadata(_ChecksSignature, NamesKey):
    key_fields = ("sourceKid", "sourcePublicKey")
    source_kid: Kid | None = None
    source_public_key: dict[str, Any] | None = None


class Verdict(BaseModel):
    """A signature that verified: by which key version (`kid#version`; for a public JWK,
    `jwk#` and its RFC 7638 thumbprint, never a name the JWS claims), with which
    algorithm."""

    valid: bool
    kid: str
    alg: str


SIGNED = {
    200: answer(
        "The detached JWS (compact form, empty payload, over the unencoded payload).",
        media_type=JOSE,
        schema={"type": "string", "pattern": r"^[A-Za-z0-9_-]+\.\.[A-Za-z0-9_-]+$"},
        with_headers=headers(*KEY_HEADERS),
    )
}
RESIGNED = {
    200: answer(
        "The new detached JWS; the old signature verified.",
        media_type=JOSE,
        schema=SIGNED[200]["content"][JOSE]["schema"],
        with_headers=headers(
            *KEY_HEADERS,
            "X-Source-Key-Used",
            "X-Source-Algorithm-Used",
            *SOURCE_WARNING_HEADERS,
            optional=["X-Source-Key-Used"],
        ),
    )
}
VERIFIED = {
    200: answer(
        "The signature verified.",
        Verdict,
        with_headers=headers(
            "X-Key-Used", "X-Algorithm-Used", *WARNING_HEADERS, optional=["X-Key-Used"]
        ),
    )
}


def signing_headers(svc: Services, requested: str, signing: Signing) -> dict[str, str]:
    return {
        **named_key_headers(requested, signing.key_name, signing.alg),
        **warnings(svc, signing.key, signing.key.primary_version, signing.uses),
    }


def verifying_headers(svc: Services, verifying: Verifying, prefix: str = "X-") -> dict[str, str]:
    found = {f"{prefix}Algorithm-Used": verifying.alg, f"{prefix}Key-Used": verifying.key_name}
    stored = verifying.stored
    if stored is not None and stored.uses is not None:
        found.update(warnings(svc, stored.key, stored.version, stored.uses, prefix))
    return found


@router.post(
    "/sign",
    response_model=None,
    responses=answers(SIGNED, AUTHENTICATED, FORM, (404, 409)),
    openapi_extra=form_request(SignMetadata, file_required=True, file="The bytes to sign."),
)
async def sign(request: Request, principal: SignScope) -> Response:
    """Sign the `file` part with the primary version of the key `metadata.kid`."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(SignMetadata, await form.metadata())
    signing = await run_in_threadpool(start_signing, svc.keys, principal.tenant, metadata.kid)
    await form.start_file()
    signature = await sign_stream(signing, form.file_chunks())
    return Response(signature, media_type=JOSE, headers=signing_headers(svc, metadata.kid, signing))


@router.post(
    "/verify",
    response_model=None,
    responses=answers(VERIFIED, AUTHENTICATED, FORM, (404, 409)),
    openapi_extra=form_request(VerifyMetadata, file_required=True, file="The signed bytes."),
)
async def verify(request: Request, principal: VerifyScope) -> Response:
    """Check `metadata.signature` over the `file` part."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(VerifyMetadata, await form.metadata())
    verifying = await _start_verifying(svc, principal.tenant, metadata)
    await form.start_file()
    await verify_stream(verifying, form.file_chunks())
    verdict = Verdict(valid=True, kid=verifying.key_name, alg=verifying.alg)
    return JSONResponse(verdict.model_dump(), headers=verifying_headers(svc, verifying))


@router.post(
    "/resign",
    response_model=None,
    responses=answers(RESIGNED, AUTHENTICATED, FORM, (404, 409)),
    openapi_extra=form_request(ResignMetadata, file_required=True, file="The signed bytes."),
)
async def resign(request: Request, principal: ResignScope) -> Response:
    """Check `metadata.signature` over the `file` part with the old key (`sourceKid`, the
    key its header names, or `sourcePublicKey`), and sign it anew with `metadata.kid`."""
    svc = services(request)
    form = UploadForm(request, svc.settings)
    metadata = parse(ResignMetadata, await form.metadata())
    verifying = await _start_verifying(svc, principal.tenant, metadata)
    signing = await run_in_threadpool(start_signing, svc.keys, principal.tenant, metadata.kid)
    await form.start_file()
    signature = await resign_stream(verifying, signing, form.file_chunks())
    response_headers = {
        **signing_headers(svc, metadata.kid, signing),
        **verifying_headers(svc, verifying, "X-Source-"),
    }
    return Response(signature, media_type=JOSE, headers=response_headers)


async def _start_verifying(svc: Services, tenant: str, metadata: _ChecksSignature) -> Verifying:
    kid, public_jwk = metadata.checking_key()
    start = partial(
        start_verifying, svc.keys, tenant, metadata.signature, kid=kid, public_jwk=public_jwk
    )
    return await run_in_threadpool(start)
