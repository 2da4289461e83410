"""Re-wrapping a message's data key for other keys, without touching its body.

Frames are authenticated under a key derived from the data key and the message ID only,
so a new header that keeps the data key, message ID, key commitment and frame length
keeps every frame of the old body valid. Only the encrypted data keys, the encryption
context (which the keyrings bind to) and the header tag change.
"""

from collections.abc import Mapping, Sequence

from envelope.header import Header
from envelope.keyrings.base import Keyring
from envelope.message import check_keyrings, open_with_data_key, seal_header, writable_context


def rewrap_header(
    header: Header,
    opening: Sequence[Keyring],
    new: Sequence[Keyring],
    *,
    context: Mapping[str, str] | None = None,
) -> Header:
    """The header of the same message sealed for the `new` keyrings, with `context`
    (default: the header's own) and a fresh header tag.

    The old header is opened with `opening` exactly as a reader opens it (commitment and
    header tag checked), so a tampered header or a wrong key raises here.
    """
    check_keyrings(new)
    data_key, opened = open_with_data_key(header, opening)
    return seal_header(
        data_key=data_key,
        message_id=header.message_id,
        keyrings=new,
        context=header.context if context is None else context,
        context_bytes=header.context_bytes if context is None else writable_context(context),
        frame_length=header.frame_length,
        commitment=header.commitment,
        cipher=opened.cipher,
    )
