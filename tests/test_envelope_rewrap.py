"""Re-wrapping a message's data key: a new header for the old body, readable with the new
keys only, still an AWS Encryption SDK message, and refused for a wrong key or a
tampered header."""

import os
from collections.abc import Callable
from dataclasses import replace

import pytest

from envelope import (
    CommitmentMismatch,
    DataKeyUnavailable,
    Header,
    HeaderAuthenticationError,
    InvalidParameter,
    key_names,
    parse_header,
    rewrap_header,
)
from tests.envelope_helpers import (
    KEYRING_KINDS,
    KeyringKind,
    decrypt_all,
    encrypt_all,
    make_keyring,
)
from tests.test_envelope_interop import SDK, our_keyring, sdk_keyring

FRAME = 4096
DATA = os.urandom(3 * FRAME + 100)  # three regular frames and a short final one
CONTEXT = {"purpose": "rewrap-test", "sealstream:key-version": "1"}


def split(message: bytes) -> tuple[Header, bytes]:
    header = parse_header(message)
    return header, message[header.length :]


@pytest.mark.parametrize("new_kind", KEYRING_KINDS)
@pytest.mark.parametrize("old_kind", KEYRING_KINDS)
def test_the_old_body_opens_under_the_new_header_with_the_new_key_only(
    old_kind: KeyringKind, new_kind: KeyringKind
) -> None:
    old, new = make_keyring(old_kind, "key#1"), make_keyring(new_kind, "key#2")
    header, body = split(encrypt_all([old], DATA, FRAME, CONTEXT))

    rewrapped = rewrap_header(header, [old], [new])
    message = rewrapped.to_bytes() + body

    assert decrypt_all([new], message, chunk_size=1000, required_context=CONTEXT) == DATA
    with pytest.raises(DataKeyUnavailable):
        decrypt_all([old], message)
    assert key_names(rewrapped) == ["key#2"]
    kept = ("message_id", "commitment", "frame_length", "context", "context_bytes")
    assert all(getattr(rewrapped, name) == getattr(header, name) for name in kept)
    assert rewrapped.tag != header.tag


def test_a_new_context_is_bound_to_the_new_header() -> None:
    old, new = make_keyring("aes", "key#1"), make_keyring("aes", "key#2")
    header, body = split(encrypt_all([old], DATA, FRAME, CONTEXT))
    context = {**CONTEXT, "sealstream:key-version": "2"}

    rewrapped = rewrap_header(header, [old], [new], context=context)

    assert parse_header(rewrapped.to_bytes()).context == context
    assert decrypt_all([new], rewrapped.to_bytes() + body, required_context=context) == DATA


def test_the_opening_keyrings_may_hold_other_keys_and_several_new_keys_are_written() -> None:
    old, stranger = make_keyring("rsa", "key#1"), make_keyring("aes", "other#1")
    recipients = [make_keyring("aes", "key#2"), make_keyring("mlkem", "pq#1")]
    header, body = split(encrypt_all([old], DATA, FRAME))

    rewrapped = rewrap_header(header, [stranger, old], recipients)

    assert key_names(rewrapped) == ["key#2", "pq#1"]
    for keyring in recipients:
        assert decrypt_all([keyring], rewrapped.to_bytes() + body) == DATA


@pytest.mark.parametrize("kind", ["aes", "rsa"])
def test_the_sdk_decrypts_a_rewrapped_message_with_the_new_key(kind: str) -> None:
    old = make_keyring("mlkem", "old#1")
    header, body = split(encrypt_all([old], DATA, FRAME, CONTEXT))
    context = {**CONTEXT, "sealstream:key-version": "2"}

    rewrapped = rewrap_header(header, [old], [our_keyring(kind)], context=context)
    plaintext, sdk_header = SDK.decrypt(
        source=rewrapped.to_bytes() + body, keyring=sdk_keyring(kind)
    )

    assert plaintext == DATA
    assert dict(sdk_header.encryption_context) == context


def test_a_wrong_opening_keyring_cannot_rewrap() -> None:
    header, _ = split(encrypt_all([make_keyring("aes", "key#1")], DATA, FRAME))
    impostor = make_keyring("aes", "key#1", seed=1)  # the same name, other material

    with pytest.raises(DataKeyUnavailable):
        rewrap_header(header, [impostor], [make_keyring("aes", "key#2")])


def _frame_length_changed(header: Header) -> Header:
    body = bytearray(header.body)
    at = len(body) - len(header.commitment) - 4  # the frame length field
    body[at : at + 4] = (2 * FRAME).to_bytes(4, "big")
    return parse_header(bytes(body) + header.tag)


def _tag_flipped(header: Header) -> Header:
    return replace(header, tag=bytes([header.tag[0] ^ 1]) + header.tag[1:])


def _commitment_flipped(header: Header) -> Header:
    body = bytearray(header.body)
    body[-1] ^= 1  # the commitment ends the authenticated bytes
    return parse_header(bytes(body) + header.tag)


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (_frame_length_changed, HeaderAuthenticationError),
        (_tag_flipped, HeaderAuthenticationError),
        (_commitment_flipped, CommitmentMismatch),
    ],
    ids=["frame-length", "tag", "commitment"],
)
def test_a_tampered_header_is_refused(
    tamper: Callable[[Header], Header], error: type[Exception]
) -> None:
    old = make_keyring("aes", "key#1")
    header, _ = split(encrypt_all([old], DATA, FRAME))

    with pytest.raises(error):
        rewrap_header(tamper(header), [old], [make_keyring("aes", "key#2")])


def test_what_a_writer_refuses_is_refused() -> None:
    old = make_keyring("aes", "key#1")
    header, _ = split(encrypt_all([old], DATA, FRAME))

    with pytest.raises(InvalidParameter):
        rewrap_header(header, [old], [])
    with pytest.raises(InvalidParameter):
        rewrap_header(header, [old], [old], context={"aws-crypto-public-key": "x"})
    with pytest.raises(InvalidParameter):
        rewrap_header(header, [old], [old], context={"big": "x" * 20_000})
