"""Watching every AES-GCM sealing the service makes: the key and IV of each one whose
output (a tag) leaves the sealing, so a test can require that no (key, IV) seals twice.

`SealRecorder.install` puts recording stand-ins for `AESGCM` and `Cipher` into each module
that seals (`SEALING_MODULES`). A one-shot `AESGCM.encrypt` or `encrypt_into` counts when
it is called. An incremental `Cipher(...).encryptor()` counts only when it is finalized,
which is when its tag is made. A context that is started and dropped unfinalized hands
out no tag, and is not counted. Opening (decryption) is never counted.
`test_every_module_that_seals_is_watched` keeps `SEALING_MODULES` complete.
"""

import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import envelope.frames
import envelope.keyrings.aes
import envelope.keyrings.mlkem
import envelope.message
import envelope.suite
import keystore.kek

# Every module that imports AESGCM or Cipher to seal with, and the names it seals through.
SEALING_MODULES: dict[types.ModuleType, tuple[str, ...]] = {
    envelope.frames: ("AESGCM", "Cipher"),
    envelope.keyrings.aes: ("AESGCM",),
    envelope.keyrings.mlkem: ("AESGCM",),
    keystore.kek: ("AESGCM",),
}


@dataclass(frozen=True)
class Seal:
    key: bytes
    iv: bytes
    where: str  # the module that sealed


@dataclass
class SealRecorder:
    seals: list[Seal] = field(default_factory=list)
    # Per message started: (data key, message ID, encryption key), from `derive_keys`.
    derivations: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    recording: bool = True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for module, names in SEALING_MODULES.items():
            if "AESGCM" in names:
                monkeypatch.setattr(module, "AESGCM", self._aesgcm_for(module.__name__))
            if "Cipher" in names:
                monkeypatch.setattr(module, "Cipher", self._cipher_for(module.__name__))
        original = envelope.suite.derive_keys

        def derive_keys(data_key: bytes, message_id: bytes, suite_id: int) -> Any:
            keys = original(data_key, message_id, suite_id)
            if self.recording:
                self.derivations.append((data_key, message_id, keys.encryption_key))
            return keys

        monkeypatch.setattr(envelope.message, "derive_keys", derive_keys)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Seal without recording: for a test's own doings, not the service's."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def repeated(self) -> list[Seal]:
        """Each (key, IV) that sealed more than once."""
        counts = Counter((seal.key, seal.iv) for seal in self.seals)
        return [seal for seal in self.seals if counts[(seal.key, seal.iv)] > 1]

    def header_keys(self) -> list[bytes]:
        """The key of every header tag made: one per message written."""
        return [seal.key for seal in self.seals if seal.iv == bytes(12)]

    def messages(self) -> list[tuple[bytes, bytes]]:
        """(data key, message ID) of each message written: one per header tag made."""
        derived = {key: (data_key, message_id) for data_key, message_id, key in self.derivations}
        return [derived[key] for key in self.header_keys()]

    def _note(self, key: bytes, iv: bytes, where: str) -> None:
        if self.recording:
            self.seals.append(Seal(bytes(key), bytes(iv), where))

    def _aesgcm_for(self, where: str) -> type:
        recorder = self

        class RecordingAesGcm:
            def __init__(self, key: bytes) -> None:
                self._key = bytes(key)
                self._aead = AESGCM(key)

            def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
                recorder._note(self._key, nonce, where)
                return self._aead.encrypt(nonce, data, aad)

            def encrypt_into(self, nonce: bytes, data: Any, aad: Any, buffer: Any) -> int:
                recorder._note(self._key, nonce, where)
                return self._aead.encrypt_into(nonce, data, aad, buffer)

            def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
                return self._aead.decrypt(nonce, data, aad)

        return RecordingAesGcm

    def _cipher_for(self, where: str) -> type:
        recorder = self

        class RecordingCipher:
            def __init__(self, algorithm: algorithms.AES, mode: modes.GCM) -> None:
                self._cipher = Cipher(algorithm, mode)
                self._key = bytes(algorithm.key)
                self._iv = bytes(mode.initialization_vector)

            def encryptor(self) -> "RecordingContext":
                return RecordingContext(self._cipher.encryptor(), self._key, self._iv)

            def decryptor(self) -> Any:
                return self._cipher.decryptor()

        class RecordingContext:
            def __init__(self, context: Any, key: bytes, iv: bytes) -> None:
                self._context = context
                self._key = key
                self._iv = iv

            def authenticate_additional_data(self, data: bytes) -> None:
                self._context.authenticate_additional_data(data)

            def update(self, data: bytes) -> bytes:
                result: bytes = self._context.update(data)
                return result

            def update_into(self, data: Any, buffer: Any) -> int:
                result: int = self._context.update_into(data, buffer)
                return result

            def finalize(self) -> bytes:
                recorder._note(self._key, self._iv, where)
                result: bytes = self._context.finalize()
                return result

            @property
            def tag(self) -> bytes:
                result: bytes = self._context.tag
                return result

        return RecordingCipher
