"""Provenance: whether a message was written by this service.

Anyone who holds an RSA or ML-KEM public key can write a message that decrypts here, with
any encryption context, the service's own `sealstream:` pairs included; the footer of a
signed message proves only that its writer made its signing key. So the service vouches
for each message it writes: the pair `sealstream:proof` holds an HMAC-SHA256, under a key
derived from the store's record key (purpose `message-proof`), over the message's header
binding (`envelope.message.header_binding`: suite, message ID, frame length, key
commitment and every other context pair, the signing key's included).

On reading:
- a proof that does not verify is refused (`ProofInvalid`): a header with `sealstream:`
  pairs and a forged or copied proof;
- no proof: the message is *unproven* (written before proofs were, or by someone else);
  it decrypts, reported as such, unless the service refuses unproven messages
  (`SEALSTREAM_REFUSE_UNPROVEN_MESSAGES`, `MessageUnproven`).

The proof cannot cover the encrypted data keys: the AES and ML-KEM wraps take the whole
context, the proof included, as their AAD. The key commitment stands for them: the only
data key that opens the message is the one it commits to, and without it no one can add a
key that opens it.
"""

import base64
import binascii
import hmac

from envelope import AuthenticationError, EnvelopeError, Header
from envelope.message import header_binding_of

PROOF_CONTEXT_KEY = "sealstream:proof"  # one of the service's own pairs (`services.keys`)


class ProofInvalid(AuthenticationError):
    """A message carries a proof of provenance that this service did not make."""

    code = "message-proof-invalid"


class MessageUnproven(EnvelopeError):
    """A message without a proof, which the service is set to refuse."""

    code = "message-unproven"


class Provenance:
    """Makes and checks the proofs under one key (the store's `message-proof` key)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def endorse(self, binding: bytes) -> dict[str, str]:
        """The pair that proves a new message with this header binding is the service's."""
        return {PROOF_CONTEXT_KEY: base64.b64encode(self._mac(binding)).decode("ascii")}

    def proven(self, header: Header, *, refuse_unproven: bool) -> bool:
        """Whether an authenticated header carries a valid proof; refuses an invalid one,
        and, if `refuse_unproven`, one without a proof."""
        proof = header.context.get(PROOF_CONTEXT_KEY)
        if proof is None:
            if refuse_unproven:
                raise MessageUnproven(
                    "the message carries no proof that this service wrote it, and the "
                    "service refuses such messages"
                )
            return False
        expected = self._mac(header_binding_of(header, (PROOF_CONTEXT_KEY,)))
        if not hmac.compare_digest(_decoded(proof), expected):
            raise ProofInvalid("the message's proof of provenance is not this service's")
        return True

    def _mac(self, binding: bytes) -> bytes:
        return hmac.digest(self._key, binding, "sha256")


def _decoded(proof: str) -> bytes:
    try:
        return base64.b64decode(proof.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return b""  # matches no MAC
