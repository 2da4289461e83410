"""Throughput of streaming signatures next to a bare hash over the same bytes.

Prints, for each signing algorithm family (ES256, PS384, ML-DSA-65 by default), over the
same generated stream (512 MiB by default) fed in 256,000-byte chunks, the size uvicorn
hands a request body over in:
- the service's signing MB/s: `services.signing.sign_stream`, the code the sign route
  runs, with a key made by the key store (its digest fed every chunk, the key re-checked
  at most once a second, one signature at the end);
- its ceiling, the hash a signature over the stream cannot avoid, alone over the same
  chunks: SHA-256 for ES256, SHA-384 for PS384, SHAKE-256 for ML-DSA (μ is SHAKE-256 of
  the message);
- their ratio (goal >= 0.8), the best of `--rounds` rounds of each, alternated;
- verify's MB/s the same way, next to the same ceiling.
"""

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from format import UVICORN_CHUNK
from verify import TENANT, services_for

from keystore import KeySpec, KeyStore
from services.signing import sign_stream, start_signing, start_verifying, verify_stream

MIB = 1024 * 1024
# alg: its key type, and the hash its signature over a stream cannot do without
FAMILIES: dict[str, tuple[str, str]] = {
    "ES256": ("EC", "sha256"),
    "PS384": ("RSA", "sha384"),
    "ML-DSA-65": ("ML-DSA", "shake_256"),
}
MU_LENGTH = 64  # ML-DSA's μ: 64 bytes of SHAKE-256


# The same bytes for every pass, so that a verify checks what was signed.
BLOCKS = [os.urandom(UVICORN_CHUNK) for _ in range(4)]


def plaintext(total: int, chunk: int) -> Iterator[bytes]:
    """`total` bytes in `chunk`-sized pieces (at most the blocks' size), cycling through
    the same random blocks every time."""
    sent = 0
    while sent < total:
        piece = BLOCKS[(sent // chunk) % len(BLOCKS)][: min(chunk, total - sent)]
        sent += len(piece)
        yield piece


async def _chunks(total: int) -> AsyncIterator[memoryview]:
    for piece in plaintext(total, UVICORN_CHUNK):
        yield memoryview(piece)


def time_sign(keys: KeyStore, kid: str, total: int) -> tuple[float, str]:
    """One signature over the stream, as the route makes it: its time and the JWS."""
    start = time.perf_counter()
    signing = start_signing(keys, TENANT, kid)
    signature = asyncio.run(sign_stream(signing, _chunks(total)))
    return time.perf_counter() - start, signature


def time_verify(keys: KeyStore, signature: str, total: int) -> float:
    start = time.perf_counter()
    verifying = start_verifying(keys, TENANT, signature)
    asyncio.run(verify_stream(verifying, _chunks(total)))
    return time.perf_counter() - start


def time_hash(name: str, total: int) -> float:
    """The bare hash `name` over the same chunks, alone."""
    start = time.perf_counter()
    if name == "shake_256":
        shake = hashlib.shake_256()
        for piece in plaintext(total, UVICORN_CHUNK):
            shake.update(piece)
        shake.digest(MU_LENGTH)
    else:
        digest = hashlib.new(name)
        for piece in plaintext(total, UVICORN_CHUNK):
            digest.update(piece)
        digest.digest()
    return time.perf_counter() - start


def mb_per_s(total: int, seconds: float) -> float:
    return total / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="stream size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algs", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    total = args.mib * MIB
    with tempfile.TemporaryDirectory(prefix="sealstream-bench-signing-") as workdir:
        keys = services_for(f"file://{workdir}/storage", Path(workdir), None).keys
        print(f"stream {args.mib} MiB in {UVICORN_CHUNK} B chunks, best of {args.rounds} rounds")
        for alg in args.algs:
            kty, ceiling_hash = FAMILIES[alg]
            kid = f"bench-{alg.lower()}"
            keys.create(TENANT, KeySpec(kid=kid, kty=kty, alg=alg, key_ops=["sign", "verify"]))
            sign = verify = ceiling = float("inf")
            signature = ""
            for _ in range(args.rounds):
                ceiling = min(ceiling, time_hash(ceiling_hash, total))
                seconds, signature = time_sign(keys, kid, total)
                sign = min(sign, seconds)
                verify = min(verify, time_verify(keys, signature, total))
            name = ceiling_hash.upper()
            for what, seconds in (("sign", sign), ("verify", verify)):
                print(
                    f"  {alg:<10} {what:<6} {mb_per_s(total, seconds):7.0f} MB/s   "
                    f"ceiling (bare {name}) {mb_per_s(total, ceiling):7.0f} MB/s   "
                    f"ratio {ceiling / seconds:.3f}  (goal >= 0.8)"
                )


if __name__ == "__main__":
    main()
