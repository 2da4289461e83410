"""The asyncio client: `AsyncSealstreamClient`, the surface of `SealstreamClient` with
every call awaitable, and streams that may also be asynchronous (an async iterable of
bytes, or an object with an `async read`, in; an object with an `async write`, or an
`async for` over `open_encrypt`..., out).

    async with AsyncSealstreamClient(url, token) as client:
        key = await client.get_key("mySymKey")
        async with client.open_encrypt("mySymKey", chunks()) as stream:
            async for piece in stream:
                ...

Each call runs the synchronous client in a worker thread of the client's own pool, so
the one full-duplex transport serves both: no asyncio HTTP client reads a response while
it still sends the request from a file object, which a stream-back encrypt needs. An async
source or sink is driven on the caller's event loop from that thread. Cancelling the
awaiting task aborts the call's connection; `max_concurrency` bounds the calls in flight
(each stream uses a second thread, its upload's writer).
"""

from __future__ import annotations  # the models in annotations load only when called

import asyncio
import contextvars
import functools
import inspect
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
)
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    runtime_checkable,
)

from sealstream_client.client import (
    ByteRange,
    Download,
    Kids,
    SealstreamClient,
    Transfer,
    Writable,
)
from sealstream_client.errors import ClientError
from sealstream_client.multipart import UPLOAD_CHUNK, Source
from sealstream_client.transport import CURRENT_CANCELLATION, Cancellation

if TYPE_CHECKING:
    from sealstream_client.models import StoredObject, Verdict

__all__ = [
    "AsyncDownload",
    "AsyncReadable",
    "AsyncSealstreamClient",
    "AsyncSource",
    "AsyncWritable",
]

P = ParamSpec("P")
R = TypeVar("R")
DEFAULT_CONCURRENCY = 16  # calls in flight at once, each on a worker thread
CANCEL_GRACE = 5.0  # seconds a cancelled call's thread is waited for


@runtime_checkable
class AsyncReadable(Protocol):
    """A binary stream with an `async read` (asyncio.StreamReader, aiofiles' files)."""

    def read(self, size: int = ..., /) -> Awaitable[bytes]: ...


@runtime_checkable
class AsyncWritable(Protocol):
    """A binary sink with an `async write`."""

    def write(self, data: bytes, /) -> Awaitable[object]: ...


AsyncSource = Source | AsyncIterable[bytes] | AsyncReadable
AsyncSink = Writable | AsyncWritable


class _Sealing(TypedDict, total=False):
    """What every call that seals takes."""

    encryption_context: Mapping[str, str] | None
    frame_length: int | None


class _Placing(TypedDict, total=False):
    """What every call that seals into storage takes."""

    bucket: str | None
    overwrite: bool


class SealOptions(_Sealing, total=False):
    """The keyword arguments of `SealstreamClient.encrypt` (and `open_encrypt`)."""

    recipient_public_key: Mapping[str, Any] | None
    signed: bool | None


class StorageOptions(SealOptions, _Placing, total=False):
    """Those of `SealstreamClient.encrypt_to_storage`, besides `key`."""


class ArchiveOptions(_Sealing, _Placing, total=False):
    """Those of `SealstreamClient.encrypt_archive`, besides `prefix`."""

    archive_format: str
    names: str


class OpenOptions(TypedDict, total=False):
    """Those of `SealstreamClient.decrypt` (and `open_decrypt`)."""

    kid: str | None
    encryption_context: Mapping[str, str] | None


class ObjectOptions(OpenOptions, total=False):
    """Those of `SealstreamClient.open_object`, besides `key`."""

    bucket: str | None
    byte_range: ByteRange | None


class ReencryptOptions(TypedDict, total=False):
    """Those of `SealstreamClient.reencrypt` (and `open_reencrypt`)."""

    source_kid: str | None
    encryption_context: Mapping[str, str] | None


class VerifyOptions(TypedDict, total=False):
    """Those of `SealstreamClient.verify`."""

    kid: str | None
    public_key: Mapping[str, Any] | None


class ResignOptions(TypedDict, total=False):
    """Those of `SealstreamClient.resign`."""

    source_kid: str | None
    source_public_key: Mapping[str, Any] | None


def _in_thread(
    method: Callable[Concatenate[SealstreamClient, P], R],
) -> Callable[Concatenate[AsyncSealstreamClient, P], Coroutine[Any, Any, R]]:
    """The synchronous client's `method`, awaited: it runs in a worker thread."""

    async def call(self: AsyncSealstreamClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.in_thread(functools.partial(method, self.sync, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


class AsyncDownload:
    """A streamed response, open: `async for` over it for the pieces of its body; then
    `transfer` says what went through. Leave it with `async with`."""

    def __init__(self, client: AsyncSealstreamClient, download: Download) -> None:
        self._client = client
        self._download = download
        self._pieces: Iterator[bytes] = iter(download)
        self.status = download.status
        self.length = download.length
        self.key_requested = download.key_requested
        self.key_used = download.key_used
        self.algorithm = download.algorithm
        self.content_range = download.content_range

    async def __aenter__(self) -> AsyncDownload:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.in_thread(self._download.close)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        piece: bytes = await self._client.in_thread(functools.partial(next, self._pieces, b""))
        if not piece:
            raise StopAsyncIteration
        return piece

    async def copy_to(self, sink: AsyncSink) -> Transfer:
        """Write the whole body to `sink` (an async one on the loop, else from the worker
        thread); what went through."""
        if not inspect.iscoroutinefunction(sink.write):
            return await self._client.in_thread(functools.partial(self._download.copy_to, sink))
        async for piece in self:
            await sink.write(piece)
        return self.transfer

    @property
    def transfer(self) -> Transfer:
        return self._download.transfer


class AsyncSealstreamClient:
    """A client of one sealstream API at `url`, for asyncio: the arguments of
    `SealstreamClient`, and `max_concurrency`, the calls that may be in flight at once
    (more wait their turn). Close it (`async with`, or `aclose`) to end its threads."""

    def __init__(
        self, url: str, token: str, *, max_concurrency: int = DEFAULT_CONCURRENCY, **options: Any
    ) -> None:
        self.sync = SealstreamClient(url, token, **options)
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="sealstream")

    async def __aenter__(self) -> AsyncSealstreamClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._executor.shutdown)

    # Streaming: the keyword arguments are the synchronous client's (the TypedDicts above)

    async def encrypt(
        self, kid: Kids, source: AsyncSource, sink: AsyncSink, **options: Unpack[SealOptions]
    ) -> Transfer:
        """`SealstreamClient.encrypt`, from an async or sync source to either kind of sink."""
        async with await self.open_encrypt(kid, source, **options) as download:
            return await download.copy_to(sink)

    async def open_encrypt(
        self, kid: Kids, source: AsyncSource, **options: Unpack[SealOptions]
    ) -> AsyncDownload:
        """`SealstreamClient.open_encrypt`: `async with await client.open_encrypt(...)`."""
        opened = functools.partial(self.sync.open_encrypt, kid, self._source(source), **options)
        return AsyncDownload(self, await self.in_thread(opened))

    async def encrypt_to_storage(
        self, kid: Kids, source: AsyncSource, *, key: str, **options: Unpack[StorageOptions]
    ) -> StoredObject:
        """`SealstreamClient.encrypt_to_storage`, from an async or sync source."""
        encrypt = self.sync.encrypt_to_storage
        return await self.in_thread(
            functools.partial(encrypt, kid, self._source(source), key=key, **options)
        )

    async def encrypt_archive(
        self, kid: str, source: AsyncSource, *, prefix: str, **options: Unpack[ArchiveOptions]
    ) -> AsyncIterator[dict[str, Any]]:
        """`SealstreamClient.encrypt_archive`: the job's progress lines, `async for`."""
        encrypt = self.sync.encrypt_archive
        lines = encrypt(kid, self._source(source), prefix=prefix, **options)
        try:
            while (line := await self.in_thread(functools.partial(next, lines, None))) is not None:
                yield line
        finally:
            await self.in_thread(lines.close)  # ends the exchange, whole or not

    async def decrypt(
        self, source: AsyncSource, sink: AsyncSink, **options: Unpack[OpenOptions]
    ) -> Transfer:
        """`SealstreamClient.decrypt`, from an async or sync source to either kind of sink."""
        async with await self.open_decrypt(source, **options) as download:
            return await download.copy_to(sink)

    async def open_decrypt(
        self, source: AsyncSource, **options: Unpack[OpenOptions]
    ) -> AsyncDownload:
        opened = functools.partial(self.sync.open_decrypt, self._source(source), **options)
        return AsyncDownload(self, await self.in_thread(opened))

    async def decrypt_object(
        self, key: str, sink: AsyncSink, **options: Unpack[ObjectOptions]
    ) -> Transfer:
        """`SealstreamClient.decrypt_object`, to either kind of sink (the plaintext's
        length is the download's `length`, with `open_object`)."""
        async with await self.open_object(key, **options) as download:
            return await download.copy_to(sink)

    async def open_object(self, key: str, **options: Unpack[ObjectOptions]) -> AsyncDownload:
        opened = functools.partial(self.sync.open_object, key, **options)
        return AsyncDownload(self, await self.in_thread(opened))

    async def reencrypt(
        self, kid: str, source: AsyncSource, sink: AsyncSink, **options: Unpack[ReencryptOptions]
    ) -> Transfer:
        async with await self.open_reencrypt(kid, source, **options) as download:
            return await download.copy_to(sink)

    async def open_reencrypt(
        self, kid: str, source: AsyncSource, **options: Unpack[ReencryptOptions]
    ) -> AsyncDownload:
        reencrypt = self.sync.open_reencrypt
        opened = functools.partial(reencrypt, kid, self._source(source), **options)
        return AsyncDownload(self, await self.in_thread(opened))

    reencrypt_object = _in_thread(SealstreamClient.reencrypt_object)

    # Signatures

    async def sign(self, kid: str, source: AsyncSource) -> str:
        return await self.in_thread(functools.partial(self.sync.sign, kid, self._source(source)))

    async def verify(
        self, source: AsyncSource, signature: str, **options: Unpack[VerifyOptions]
    ) -> Verdict:
        verify = self.sync.verify
        return await self.in_thread(
            functools.partial(verify, self._source(source), signature, **options)
        )

    async def resign(
        self, kid: str, source: AsyncSource, signature: str, **options: Unpack[ResignOptions]
    ) -> str:
        resign = self.sync.resign
        return await self.in_thread(
            functools.partial(resign, kid, self._source(source), signature, **options)
        )

    # Everything else, as the synchronous client has it

    create_key = _in_thread(SealstreamClient.create_key)
    import_key = _in_thread(SealstreamClient.import_key)
    list_keys = _in_thread(SealstreamClient.list_keys)
    get_key = _in_thread(SealstreamClient.get_key)
    rotate_key = _in_thread(SealstreamClient.rotate_key)
    disable_key = _in_thread(SealstreamClient.disable_key)
    enable_key = _in_thread(SealstreamClient.enable_key)
    delete_key = _in_thread(SealstreamClient.delete_key)
    cancel_key_deletion = _in_thread(SealstreamClient.cancel_key_deletion)
    update_key = _in_thread(SealstreamClient.update_key)
    export_key = _in_thread(SealstreamClient.export_key)
    supported_algorithms = _in_thread(SealstreamClient.supported_algorithms)
    list_key_version_objects = _in_thread(SealstreamClient.list_key_version_objects)
    retire_key_version = _in_thread(SealstreamClient.retire_key_version)
    cancel_key_version_retirement = _in_thread(SealstreamClient.cancel_key_version_retirement)
    list_objects = _in_thread(SealstreamClient.list_objects)
    delete_object = _in_thread(SealstreamClient.delete_object)
    create_token = _in_thread(SealstreamClient.create_token)
    list_tokens = _in_thread(SealstreamClient.list_tokens)
    revoke_token = _in_thread(SealstreamClient.revoke_token)
    name_key = _in_thread(SealstreamClient.name_key)
    rotate_name_key = _in_thread(SealstreamClient.rotate_name_key)
    start_job = _in_thread(SealstreamClient.start_job)
    list_jobs = _in_thread(SealstreamClient.list_jobs)
    get_job = _in_thread(SealstreamClient.get_job)
    cancel_job = _in_thread(SealstreamClient.cancel_job)
    upload_resumable = _in_thread(SealstreamClient.upload_resumable)  # its file read there
    terminate_upload = _in_thread(SealstreamClient.terminate_upload)
    list_audit_events = _in_thread(SealstreamClient.list_audit_events)
    health = _in_thread(SealstreamClient.health)
    readiness = _in_thread(SealstreamClient.readiness)

    # Running calls

    async def in_thread(self, function: Callable[[], R]) -> R:
        """`function()` in a worker thread; cancelling the caller aborts its exchanges."""
        cancellation = Cancellation()
        context = contextvars.copy_context()
        context.run(CURRENT_CANCELLATION.set, cancellation)
        running = asyncio.wrap_future(self._executor.submit(context.run, function))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            cancellation.cancel()
            await asyncio.wait([running], timeout=CANCEL_GRACE)
            raise

    def _source(self, source: AsyncSource) -> Source:
        """`source` as the synchronous client reads it: an async one is pulled through
        the running event loop, from the thread that sends the upload."""
        loop = asyncio.get_running_loop()
        timeout = self.sync.timeout
        if isinstance(source, AsyncIterable):
            return _pulled(loop, aiter(source), timeout)
        if isinstance(source, AsyncReadable) and inspect.iscoroutinefunction(source.read):
            return _read(loop, source, timeout)
        return cast(Source, source)


def _pulled(
    loop: asyncio.AbstractEventLoop, pieces: AsyncIterator[bytes], timeout: float
) -> Iterator[bytes]:
    async def following() -> bytes | None:
        return await anext(pieces, None)

    while (piece := _on_loop(loop, following(), timeout)) is not None:
        yield piece


def _read(
    loop: asyncio.AbstractEventLoop, source: AsyncReadable, timeout: float
) -> Iterator[bytes]:
    async def reading() -> bytes:
        return await source.read(UPLOAD_CHUNK)

    while piece := _on_loop(loop, reading(), timeout):
        yield piece


def _on_loop(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, R], timeout: float
) -> R:
    """Run `coroutine` on `loop` from another thread, and wait for its result."""
    try:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)
    except TimeoutError as exc:
        raise ClientError(f"the source gave nothing for {timeout} s") from exc
