"""Throughput and memory of the message format on a generated stream, next to its ceilings.

Prints, for one run over the same generated plaintext (1 GiB by default):
- sealstream encrypt and decrypt MB/s, each next to its ceiling: a bare AES-GCM loop over
  the same frame size (no framing, no buffering: what the format costs nothing above);
- decrypt again fed in 256,000-byte chunks, the size uvicorn hands a request body over in
  (shown, with no goal: such chunks cut frames, which are then opened piece by piece);
- the aws-encryption-sdk package's streaming encrypt and decrypt MB/s on the same data
  (same suite, same frame length), run in a child process so its imports do not count
  against our memory figure;
- the peak RSS of the process while sealstream streams (Linux VmHWM, reset per phase);
- signed messages (suite 0x0578) encrypted and decrypted, next to the unsigned ones and to
  a bare SHA-384 pass over the same bytes, the hash the footer's signature needs (shown,
  with no goal: a signed message costs that hash on top of AES-GCM).

Each timed phase runs `--rounds` times, interleaved with its ceiling; the best round of
each is compared, since the machines are shared and only ratios mean anything.
"""

import argparse
import hashlib
import io
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envelope import AesKeyring, Decryptor, Encryptor
from envelope.frames import frame_iv

MIB = 1024 * 1024
UVICORN_CHUNK = 256_000
KEY = os.urandom(32)
KEY_NAME = "bench#1"


def plaintext(total: int, chunk: int) -> Iterator[bytes]:
    """`total` bytes in `chunk`-sized pieces, cycling through a few random blocks."""
    blocks = [os.urandom(chunk) for _ in range(4)]
    sent = 0
    while sent < total:
        piece = blocks[(sent // chunk) % 4][: total - sent]
        sent += len(piece)
        yield piece


def rechunk(pieces: Iterator[bytes | bytearray | memoryview], size: int) -> Iterator[bytes]:
    pending = bytearray()
    for piece in pieces:
        pending += piece
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)


def ciphertext(total: int, frame: int, *, signed: bool = False) -> Iterator[bytearray | memoryview]:
    encryptor = Encryptor([AesKeyring(KEY_NAME, KEY)], frame_length=frame, signed=signed)
    for chunk in plaintext(total, frame):
        yield from encryptor.update(chunk)
    yield from encryptor.finish()


class PeakRss:
    """Peak resident set size of this process between `reset()` and `read()`."""

    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def reset(self) -> None:
        self.CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS

    def read_mib(self) -> float:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


def time_encrypt(total: int, frame: int, *, signed: bool = False) -> float:
    """Each frame is let go before the next is made, as the bare loop lets go of its output
    and as the service does (it recycles each frame once sent or stored). A loop variable
    holding the last frame across the next call would keep two frames' memory in use, more
    than a core's cache holds, and slow the loop down for that alone."""
    encryptor = Encryptor([AesKeyring(KEY_NAME, KEY)], frame_length=frame, signed=signed)
    written = 0
    start = time.perf_counter()
    for chunk in plaintext(total, frame):
        written += sum(len(piece) for piece in encryptor.update(chunk))
    written += sum(len(piece) for piece in encryptor.finish())
    return time.perf_counter() - start


def time_bare_encrypt(total: int, frame: int) -> float:
    aead = AESGCM(KEY)
    aad = os.urandom(80)
    start = time.perf_counter()
    for sequence, chunk in enumerate(plaintext(total, frame), start=1):
        aead.encrypt(frame_iv(sequence), chunk, aad)
    return time.perf_counter() - start


def time_decrypt(total: int, frame: int, chunk: int | None, *, signed: bool = False) -> float:
    """Seconds spent inside the decryptor only; the ciphertext is made on the fly, untimed."""
    decryptor = Decryptor([AesKeyring(KEY_NAME, KEY)])
    source: Iterator[bytes | bytearray | memoryview] = ciphertext(total, frame, signed=signed)
    if chunk is not None:
        source = rechunk(source, chunk)
    spent = 0.0
    for piece in source:
        start = time.perf_counter()
        decryptor.update(piece)
        spent += time.perf_counter() - start
    decryptor.finish()
    return spent


def time_bare_decrypt(total: int, frame: int) -> float:
    aead = AESGCM(KEY)
    aad = os.urandom(80)
    spent = 0.0
    for sequence, chunk in enumerate(plaintext(total, frame), start=1):
        iv = frame_iv(sequence)
        sealed = aead.encrypt(iv, chunk, aad)
        start = time.perf_counter()
        aead.decrypt(iv, sealed, aad)
        spent += time.perf_counter() - start
    return spent


def time_bare_sha384(total: int, frame: int) -> float:
    digest = hashlib.sha384()
    start = time.perf_counter()
    for chunk in plaintext(total, frame):
        digest.update(chunk)
    digest.digest()
    return time.perf_counter() - start


def signed_figures(total: int, frame: int, rounds: int, unsigned: tuple[float, float]) -> None:
    """Signed encrypt and decrypt next to the unsigned figures and a bare SHA-384 pass."""
    sha384 = best_of(rounds, lambda: time_bare_sha384(total, frame))
    signed_encrypt = best_of(rounds, lambda: time_encrypt(total, frame, signed=True))
    signed_decrypt = best_of(rounds, lambda: time_decrypt(total, frame, None, signed=True))
    print(f"  bare SHA-384 over the same bytes {mb_per_s(total, sha384):8.0f} MB/s")
    for name, seconds, plain in [
        ("encrypt", signed_encrypt, unsigned[0]),
        ("decrypt", signed_decrypt, unsigned[1]),
    ]:
        print(
            f"  sealstream signed {name:<21} {mb_per_s(total, seconds):8.0f} MB/s   "
            f"unsigned {mb_per_s(total, plain):8.0f} MB/s   signed / unsigned "
            f"{plain / seconds:.3f}  (shown)"
        )


def best_of(rounds: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(rounds))


class GeneratedReader(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks (what the SDK streams from)."""

    def __init__(self, chunks: Iterator[bytes | bytearray | memoryview]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                self._pending = bytes(next(self._chunks))
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def sdk_figures(
    total: int, frame: int, results: "multiprocessing.Queue[tuple[float, float]]"
) -> None:
    """The SDK's streaming encrypt and decrypt MB/s (runs in a child process)."""
    import aws_encryption_sdk
    from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
    from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
    from aws_cryptographic_material_providers.mpl.models import (
        AesWrappingAlg,
        CreateRawAesKeyringInput,
    )
    from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy

    mpl = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())
    keyring = mpl.create_raw_aes_keyring(
        input=CreateRawAesKeyringInput(
            key_namespace="sealstream",
            key_name=KEY_NAME,
            wrapping_key=KEY,
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    sdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )

    def drain(stream: io.RawIOBase) -> None:
        while stream.read(frame):
            pass

    start = time.perf_counter()
    with sdk.stream(
        mode="e",
        source=GeneratedReader(plaintext(total, frame)),
        keyring=keyring,
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=frame,
    ) as stream:
        drain(stream)
    encrypt_seconds = time.perf_counter() - start

    source_seconds = time_encrypt(total, frame)  # what making its input costs, subtracted below
    start = time.perf_counter()
    with sdk.stream(
        mode="d",
        source=GeneratedReader(ciphertext(total, frame)),
        keyring=keyring,
    ) as stream:
        drain(stream)
    decrypt_seconds = time.perf_counter() - start - source_seconds
    results.put((encrypt_seconds, decrypt_seconds))


def mb_per_s(total: int, seconds: float) -> float:
    return total / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="plaintext size in GiB")
    parser.add_argument("--frame", type=int, default=MIB, help="frame length in bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-sdk", action="store_true")
    args = parser.parse_args()
    total, frame, rounds = int(args.gib * 1024 * MIB), args.frame, args.rounds

    rss = PeakRss()
    rss.reset()
    encrypt = bare_encrypt = decrypt = bare_decrypt = float("inf")
    for _ in range(rounds):
        bare_encrypt = min(bare_encrypt, time_bare_encrypt(total, frame))
        encrypt = min(encrypt, time_encrypt(total, frame))
        bare_decrypt = min(bare_decrypt, time_bare_decrypt(total, frame))
        decrypt = min(decrypt, time_decrypt(total, frame, None))
    decrypt_uvicorn = best_of(rounds, lambda: time_decrypt(total, frame, UVICORN_CHUNK))
    peak = rss.read_mib()

    print(f"plaintext {total / MIB:.0f} MiB, frame {frame} B, best of {rounds} rounds")
    rows = [
        ("encrypt", encrypt, bare_encrypt, "goal >= 0.90"),
        ("decrypt", decrypt, bare_decrypt, "goal >= 0.90"),
        # The goal is the format's own cost; chunks that cut frames add the work of
        # opening frames piece by piece, shown for what a server's decrypt pays.
        (f"decrypt, {UVICORN_CHUNK} B chunks", decrypt_uvicorn, bare_decrypt, "shown"),
    ]
    for name, seconds, ceiling, goal in rows:
        print(
            f"  sealstream {name:<28} {mb_per_s(total, seconds):8.0f} MB/s   "
            f"ceiling (bare AES-GCM) {mb_per_s(total, ceiling):8.0f} MB/s   "
            f"ratio {ceiling / seconds:.3f}  ({goal})"
        )
    print(f"  peak RSS while streaming {peak:.1f} MiB  (goal < 100 MiB)")
    signed_figures(total, frame, rounds, (encrypt, decrypt))

    if args.skip_sdk:
        return
    spawn = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[float, float]] = spawn.Queue()
    child = spawn.Process(target=sdk_figures, args=(total, frame, results))
    child.start()
    sdk_encrypt, sdk_decrypt = results.get()
    child.join()
    for name, ours, theirs in [
        ("encrypt", encrypt, sdk_encrypt),
        ("decrypt", decrypt, sdk_decrypt),
    ]:
        print(
            f"  aws-encryption-sdk {name:<20} {mb_per_s(total, theirs):8.0f} MB/s   "
            f"sealstream / sdk {theirs / ours:6.1f}x  (goal >= 10x)"
        )


if __name__ == "__main__":
    main()
