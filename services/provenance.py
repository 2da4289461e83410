"""Provenance: whether a message was written by this service, and whether only this service
could have written its content.

Anyone who holds an RSA or ML-KEM public key can write a message that decrypts here, with
any encryption context, the service's own `sealstream:` pairs included; the footer of a
signed message proves only that its writer made its signing key. So the service vouches
for each message it writes: the pair `sealstream:proof` holds `v2:`, the proof key's id,
`:` and an HMAC-SHA256, under a key derived from the store's record key (purpose
`message-proof`), over the message's header binding (`envelope.message.header_binding`:
suite, message ID, frame length, key commitment, every other context pair, the signing
key's included, and the ordered recipients, one per encrypted data key).

The proof covers the header, not the body: whoever knows a message's data key can write
other frames under the same header and keep its proof. A message is therefore *proven*
only if its proof is valid and either it is signed (its signing key was discarded, so no
one can sign other frames) or every recipient it names is a key of the tenant's that only
the service ever held: generated here, never exportable (`KeyRecord.may_be_known_outside`).
The service signs every message it writes for any other recipient (`services.keys`).

A range reads some frames only: it checks neither a signed message's footer nor a
recorded object's plaintext digest. So a range is proven only by a valid proof of a message
every recipient of which only the service ever held (`Verdict.any_part`), signed or not.

On reading:
- a proof under this service's key that does not verify is refused (`ProofInvalid`): a
  header with `sealstream:` pairs and a forged or copied proof, or an EDK dropped;
- no proof, a proof under another key id (another deployment's), or a valid proof of a
  message whose data key may be known outside: the message is *unproven*. It decrypts,
  reported as such, unless the service refuses unproven messages
  (`SEALSTREAM_REFUSE_UNPROVEN_MESSAGES`, `MessageUnproven`);
- a proof in the first, untagged form (plain base64 of the MAC over the binding without
  recipients, written only before recipients were bound) is checked as it was then: one
  that does not verify is refused, and a valid one proves a signed message only.
"""

import base64
import binascii
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envelope import AuthenticationError, EnvelopeError, Header
from envelope.keyrings.names import recipients_of
from envelope.message import first_header_binding_of, header_binding_of

PROOF_CONTEXT_KEY = "sealstream:proof"  # one of the service's own pairs (`services.keys`)
PROOF_FORMAT = "v2"
_KEY_ID_LABEL = b"sealstream/message-proof/key-id"
_KEY_ID_LENGTH = 6  # bytes: tells deployments apart, and says nothing of the key

# Whether every recipient of a message (provider ID, key name) is a key only the service
# ever held.
HeldOnlyHere = Callable[[Sequence[tuple[str, bytes]]], bool]


@dataclass(frozen=True)
class Verdict:
    """What a message's proof vouches for: its content read whole, to its end (`whole`),
    and any part of it read alone, a range (`any_part`, which implies `whole`)."""

    whole: bool
    any_part: bool


UNPROVEN = Verdict(whole=False, any_part=False)


class ProofInvalid(AuthenticationError):
    """A message carries a proof of provenance that this service did not make."""

    code = "message-proof-invalid"


class MessageUnproven(EnvelopeError):
    """A message not proven to be this service's, which the service is set to refuse."""

    code = "message-unproven"


class Provenance:
    """Makes and checks the proofs under one key (the store's `message-proof` key)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        digest = hmac.digest(key, _KEY_ID_LABEL, "sha256")[:_KEY_ID_LENGTH]
        self.key_id = base64.urlsafe_b64encode(digest).decode("ascii")

    def endorse(self, binding: bytes) -> dict[str, str]:
        """The pair that proves a new message with this header binding is the service's."""
        mac = base64.b64encode(self._mac(binding)).decode("ascii")
        return {PROOF_CONTEXT_KEY: f"{PROOF_FORMAT}:{self.key_id}:{mac}"}

    def proven(
        self, header: Header, held_only_here: HeldOnlyHere, *, refuse_unproven: bool
    ) -> Verdict:
        """What an authenticated header proves this service's: the message's content read
        whole, and any part of it; refuses an invalid proof, and, if `refuse_unproven`, a
        message whose whole content is unproven."""
        verdict = self._vouches_for(header, held_only_here)
        if verdict.whole:
            return verdict
        if refuse_unproven:
            raise MessageUnproven(
                "the message is not proven to be this service's, and the service refuses "
                "such messages"
            )
        return UNPROVEN

    def _vouches_for(self, header: Header, held_only_here: HeldOnlyHere) -> Verdict:
        proof = header.context.get(PROOF_CONTEXT_KEY)
        if proof is None:
            return UNPROVEN
        if ":" not in proof:  # the first form, which binds no recipients
            self._check(proof, first_header_binding_of(header, (PROOF_CONTEXT_KEY,)))
            return Verdict(whole=header.signed, any_part=False)
        proof_format, _, rest = proof.partition(":")
        key_id, _, mac = rest.partition(":")
        if proof_format != PROOF_FORMAT or key_id != self.key_id:
            return UNPROVEN  # another deployment's proof, or a form this one cannot read
        self._check(mac, header_binding_of(header, (PROOF_CONTEXT_KEY,)))
        # The signature proves the frames only once the footer is checked, after them all.
        only_here = held_only_here(recipients_of(header))
        return Verdict(whole=header.signed or only_here, any_part=only_here)

    def _check(self, mac: str, binding: bytes) -> None:
        if not hmac.compare_digest(_decoded(mac), self._mac(binding)):
            raise ProofInvalid("the message's proof of provenance is not this service's")

    def _mac(self, binding: bytes) -> bytes:
        return hmac.digest(self._key, binding, "sha256")


def _decoded(proof: str) -> bytes:
    try:
        return base64.b64decode(proof.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return b""  # matches no MAC
