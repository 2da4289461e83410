"""Which key names a message's encrypted data keys carry, so a reader can fetch the keys.

Every sealstream keyring puts the key name in the provider info; the raw AES keyring
(like the SDK's) appends the tag length, IV length and IV after it.
"""

import struct

from envelope.header import Header
from envelope.keyrings.base import PROVIDER_ID
from envelope.suite import IV_LENGTH, TAG_LENGTH

_AES_SUFFIX = struct.pack(">II", TAG_LENGTH * 8, IV_LENGTH)
_AES_TRAILER_LENGTH = len(_AES_SUFFIX) + IV_LENGTH


def key_names(header: Header) -> list[str]:
    """The key names in the header's sealstream EDKs, in order, without repeats."""
    names: list[str] = []
    for edk in header.encrypted_data_keys:
        if edk.provider_id != PROVIDER_ID:
            continue
        name = _raw_name(edk.provider_info).decode("utf-8", "replace")
        if name not in names:
            names.append(name)
    return names


def recipients_of(header: Header) -> list[tuple[str, bytes]]:
    """Each EDK's provider ID and key name (its provider info, for another provider's),
    in order, repeats kept: what a writer names its keyrings by (`Keyring.recipient`)."""
    return [
        (edk.provider_id, _raw_name(edk.provider_info))
        if edk.provider_id == PROVIDER_ID
        else (edk.provider_id, edk.provider_info)
        for edk in header.encrypted_data_keys
    ]


def _raw_name(info: bytes) -> bytes:
    if len(info) > _AES_TRAILER_LENGTH and info[-_AES_TRAILER_LENGTH:-IV_LENGTH] == _AES_SUFFIX:
        return info[:-_AES_TRAILER_LENGTH]
    return info
