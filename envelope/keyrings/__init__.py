"""Keyrings: one per key type, each wrapping a message's data key for one key version."""

from envelope.keyrings.aes import AesKeyring
from envelope.keyrings.base import PROVIDER_ID, Keyring
from envelope.keyrings.mlkem import MlKemKeyring
from envelope.keyrings.names import key_names
from envelope.keyrings.rsa import RsaKeyring

__all__ = ["PROVIDER_ID", "AesKeyring", "Keyring", "MlKemKeyring", "RsaKeyring", "key_names"]
