"""The asyncio client (sealstream_client.aio) against a live server: async sources and
sinks in both directions, full duplex, concurrent calls, typed answers, refusals as the
synchronous client raises them, cancellation that aborts the transfer; and every call of
the synchronous client, under the same name."""

import asyncio
import hashlib
import inspect
import io
import os
import tarfile
import time
from collections.abc import AsyncIterator

import pytest

from sealstream_client import (
    AsyncSealstreamClient,
    KeyStateConflict,
    MessageRejected,
    NotFound,
    SealstreamClient,
    SignatureRejected,
)
from tests.conftest import ADMIN_TOKEN, Api
from tests.support.http import DOCUMENTED_KEY

MIB = 1024 * 1024
KID = DOCUMENTED_KEY["kid"]


class AsyncReader:
    """A source with an `async read`, as asyncio.StreamReader or aiofiles have it."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    async def read(self, size: int = -1, /) -> bytes:
        await asyncio.sleep(0)
        return self._data.read(size)


class AsyncSink:
    """A sink with an `async write`, which keeps a digest and a count."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    async def write(self, data: bytes, /) -> int:
        await asyncio.sleep(0)
        self.digest.update(data)
        self.size += len(data)
        return len(data)


async def generated(total: int, sent: list[int]) -> AsyncIterator[bytes]:
    """`total` bytes of zeros, generated on the fly; `sent` counts them."""
    piece = bytes(MIB)
    while sent[0] < total:
        size = min(MIB, total - sent[0])
        sent[0] += size
        yield piece[:size]


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_async_round_trips_with_async_sources_and_sinks(api: Api) -> None:
    data = os.urandom(5 * MIB + 17)

    async def run() -> None:
        async with AsyncSealstreamClient(api.url, ADMIN_TOKEN, timeout=30) as client:
            key = await client.create_key(**DOCUMENTED_KEY)
            assert (key.kid, key.status, key.primary_version) == (KID, "enabled", 1)
            ciphertext = io.BytesIO()
            sealed = await client.encrypt(KID, AsyncReader(data), ciphertext)
            assert (sealed.key_used, sealed.bytes_sent) == (f"{KID}#1", len(data))
            sink = AsyncSink()
            opened = await client.decrypt(ciphertext.getvalue(), sink)
            assert sink.digest.digest() == hashlib.sha256(data).digest()
            assert opened.bytes_received == len(data) == sink.size

            stored = await client.encrypt_to_storage(KID, AsyncReader(data), key="a/b.bin")
            assert stored.plaintext_sha256 == hashlib.sha256(data).hexdigest()
            async with await client.open_object("a/b.bin", byte_range=(10, 19)) as download:
                assert download.status == 206
                assert b"".join([piece async for piece in download]) == data[10:20]
            assert download.transfer.content_range == f"bytes 10-19/{len(data)}"

            signing = await client.list_objects(prefix="a/")
            assert [entry.key for entry in signing.objects] == ["a/b.bin"]

    asyncio.run(run())


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_a_large_async_stream_back_is_full_duplex(api: Api) -> None:
    """Ciphertext arrives while the upload is still being generated: a half-duplex client
    would stall on a body this much larger than what the server holds."""
    total = 64 * MIB
    sent = [0]

    async def run() -> tuple[int, int]:
        async with AsyncSealstreamClient(api.url, ADMIN_TOKEN, timeout=30) as client:
            await client.create_key(**DOCUMENTED_KEY)
            received = early = 0
            async with await client.open_encrypt(KID, generated(total, sent)) as download:
                async for piece in download:
                    received += len(piece)
                    if sent[0] < total:
                        early += len(piece)
            return received, early

    received, early = asyncio.run(run())
    assert received > total
    assert early > 16 * MIB  # ciphertext came back long before the upload ended


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_async_refusals_and_concurrent_calls(api: Api) -> None:
    async def run() -> None:
        async with AsyncSealstreamClient(api.url, ADMIN_TOKEN, max_concurrency=4) as client:
            await client.create_key(**DOCUMENTED_KEY)
            with pytest.raises(NotFound) as missing:
                await client.get_key("nope")
            assert missing.value.code == "key-not-found"
            with pytest.raises(MessageRejected):
                await client.decrypt(b"not a message", io.BytesIO())
            await client.disable_key(KID)
            with pytest.raises(KeyStateConflict) as disabled:
                await client.encrypt(KID, b"x", io.BytesIO())
            assert disabled.value.code == "key-disabled"
            keys = await asyncio.gather(*(client.get_key(KID) for _ in range(12)))
            assert {key.status for key in keys} == {"disabled"}

    asyncio.run(run())


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_cancelling_an_async_transfer_aborts_it(api: Api) -> None:
    """A cancelled call stops sending: the server sees the upload end, and the awaiting
    task is told at once, never after the whole source."""
    sent = [0]

    async def run() -> None:
        async with AsyncSealstreamClient(api.url, ADMIN_TOKEN, timeout=30) as client:
            await client.create_key(**DOCUMENTED_KEY)
            upload = asyncio.ensure_future(
                client.encrypt_to_storage(KID, generated(10**12, sent), key="never.bin")
            )
            while sent[0] < 4 * MIB:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            assert time.monotonic() - started < 5
            stopped_at = sent[0]
            await asyncio.sleep(0.5)
            assert sent[0] - stopped_at <= 2 * MIB  # the source is no longer read
            with pytest.raises(NotFound):
                await client.open_object("never.bin")

    asyncio.run(run())


def test_the_async_client_has_every_call_of_the_sync_one() -> None:
    """One surface: each public call of `SealstreamClient` is awaitable on the asyncio
    client, under the same name and with the same parameters (streams may be async)."""
    calls = [name for name in vars(SealstreamClient) if not name.startswith("_")]
    assert len(calls) > 35  # else this read no calls
    for name in calls:
        if name == "timeout":
            continue
        call = getattr(AsyncSealstreamClient, name)
        assert inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call), name
        sync = inspect.signature(getattr(SealstreamClient, name))
        mine = inspect.signature(call)
        if any(p.kind is p.VAR_KEYWORD for p in mine.parameters.values()):
            continue  # streaming calls: their keywords are a TypedDict checked by mypy
        assert list(mine.parameters) == list(sync.parameters), name


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_the_other_streams_and_routes_async(api: Api) -> None:
    """Re-encryption (streamed and stored), signatures, the audit trail and health, each
    through the asyncio client."""
    data = os.urandom(MIB + 5)

    async def run() -> None:
        async with AsyncSealstreamClient(api.url, ADMIN_TOKEN, timeout=30) as client:
            await client.create_key(**DOCUMENTED_KEY)
            await client.create_key(kid="second", kty="oct", alg="AES-256")
            await client.create_key(kid="signer", kty="EC", alg="ES256")
            sealed = io.BytesIO()
            await client.encrypt(KID, data, sealed)
            moved = io.BytesIO()
            reencrypted = await client.reencrypt("second", sealed.getvalue(), moved)
            assert reencrypted.key_used == "second#1"
            opened = io.BytesIO()
            assert (await client.decrypt(moved.getvalue(), opened)).key_used == "second#1"
            assert opened.getvalue() == data

            await client.encrypt_to_storage(KID, data, key="r.bin")
            stored = await client.reencrypt_object("second", "r.bin")
            assert (stored.kid, stored.key, stored.plaintext_size) == ("second", "r.bin", len(data))

            signature = await client.sign("signer", data)
            verdict = await client.verify(data, signature, kid="signer")
            assert (verdict.valid, verdict.kid, verdict.alg) == (True, "signer#1", "ES256")
            with pytest.raises(SignatureRejected):
                await client.verify(data + b"!", signature, kid="signer")

            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                for name in ("a.txt", "b.txt"):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            lines = [
                line
                async for line in client.encrypt_archive(KID, archive.getvalue(), prefix="arc/")
            ]
            assert (lines[0]["event"], lines[-1]["event"]) == ("started", "finished")
            listed = await client.list_objects(prefix="arc/")
            assert {"arc/a.txt", "arc/b.txt"} <= {entry.key for entry in listed.objects}

            assert (await client.health()) == {"status": "ok"}
            assert (await client.readiness())["status"] == "ready"
            events = await client.list_audit_events(limit=1000)
            assert any(event.type == "request" for event in events.events)

    asyncio.run(run())
