"""The client SDK (sealstream_client) and the `sealstream encrypt` / `decrypt` commands, against a
live API server over HTTP (and one over HTTPS) on each storage backend."""

import contextlib
import hashlib
import io
import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sealstream.server import create_app
from sealstream_client import (
    AlreadyExists,
    ApiError,
    ClientError,
    Conflict,
    InvalidRequest,
    KeyStateConflict,
    MessageRejected,
    NotFound,
    PermissionDenied,
    RangeNotSatisfiable,
    RateLimited,
    RequestTooSlow,
    SealstreamClient,
    ServerError,
    SignatureRejected,
    Source,
    SourceChanged,
    StoredDataDamaged,
    Transfer,
    TransferAborted,
    Unauthenticated,
    Unavailable,
    api_error_class,
)
from sealstream_client.multipart import MultipartBody
from sealstream_client.transport import FileSpan
from tests.conftest import ADMIN_TOKEN, Api, api_settings
from tests.support.http import DOCUMENTED_KEY
from tests.support.project import REPO
from tests.support.services import api_server, self_signed_certificate

MIB = 1024 * 1024
KID = "mySymKey"
SEALSTREAM = str(Path(sys.executable).with_name("sealstream"))


@pytest.fixture
def client(api: Api) -> SealstreamClient:
    """A client of the live server, with the documented key created through it."""
    client = SealstreamClient(api.url, ADMIN_TOKEN, timeout=30)
    assert client.create_key(**DOCUMENTED_KEY).kid == KID
    return client


class HashingSink:
    """A sink that keeps only a digest and a count, and what the upload had sent by the
    time each write arrived."""

    def __init__(self, uploaded: "GeneratedPlaintext | None" = None) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.uploaded = uploaded
        self.received_while_uploading = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        if self.uploaded is not None and not self.uploaded.done:
            self.received_while_uploading += len(data)
        return len(data)


class GeneratedPlaintext:
    """Plaintext generated on the fly: `total` bytes that never exist whole."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.done = False
        self.digest = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        seed = os.urandom(MIB)
        for index in range(self.total // MIB):
            block = seed[index % 997 :] + seed[: index % 997]
            self.digest.update(block)
            self.sent += len(block)
            yield block
        self.done = True


def test_a_large_stream_goes_both_ways_at_once(client: SealstreamClient) -> None:
    """200 MiB from a generator through encrypt, piped straight into decrypt: the server
    holds only a few frames, so this finishes only if the client reads while it sends."""
    plaintext = GeneratedPlaintext(200 * MIB)
    read_end, write_end = os.pipe()
    with (  # if decrypt fails, the pipe closes before the pool waits for encrypt
        ThreadPoolExecutor(1) as pool,
        os.fdopen(read_end, "rb") as ciphertext_in,
        os.fdopen(write_end, "wb") as ciphertext_out,
    ):

        def encrypt() -> tuple[Transfer, HashingSink]:
            tap = _Tee(ciphertext_out, HashingSink(uploaded=plaintext))
            with tap:
                return client.encrypt(KID, plaintext, tap), tap.hashing

        encrypting = pool.submit(encrypt)
        recovered = HashingSink()
        decrypted = client.decrypt(ciphertext_in, recovered, kid=KID)
        encrypted, ciphertext = encrypting.result()

    assert encrypted.bytes_sent == plaintext.total
    assert encrypted.bytes_received == ciphertext.size > plaintext.total
    assert (encrypted.key_requested, encrypted.key_used) == (KID, f"{KID}#1")
    assert encrypted.algorithm == "AES-256"
    assert decrypted.bytes_sent == ciphertext.size
    assert decrypted.bytes_received == recovered.size == plaintext.total
    assert recovered.digest.hexdigest() == plaintext.digest.hexdigest()
    assert decrypted.key_used == f"{KID}#1"
    # Most of the ciphertext arrived while the plaintext was still being uploaded.
    assert ciphertext.received_while_uploading > plaintext.total // 2


@pytest.mark.parametrize("empty", [b"", io.BytesIO(), iter([b""])], ids=["bytes", "file", "pieces"])
def test_an_empty_source_round_trips(client: SealstreamClient, empty: Source) -> None:
    sealed, opened = io.BytesIO(), io.BytesIO()
    encrypted = client.encrypt(KID, empty, sealed)
    assert encrypted.bytes_sent == 0 and encrypted.bytes_received == len(sealed.getvalue()) > 0
    assert client.decrypt(sealed.getvalue(), opened).bytes_received == 0
    assert opened.getvalue() == b""


class _Tee:
    """Writes to a file and to a hashing sink; closing it closes the file (the pipe)."""

    def __init__(self, file: io.BufferedWriter, hashing: HashingSink) -> None:
        self.file = file
        self.hashing = hashing

    def write(self, data: bytes) -> int:
        self.hashing.write(data)
        return self.file.write(data)

    def __enter__(self) -> "_Tee":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def test_storage_destination_and_ranged_reads(api: Api, client: SealstreamClient) -> None:
    data = os.urandom(3 * MIB + 123)
    context = {"dept": "ops"}
    stored = client.encrypt_to_storage(
        KID,
        io.BytesIO(data),
        key="reports/q1.bin",
        frame_length=64 * 1024,
        encryption_context=context,
    )
    assert stored.key == "reports/q1.bin"
    assert stored.plaintext_size == len(data)
    assert stored.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    assert stored.frame_length == 64 * 1024
    assert stored.document["plaintextSize"] == len(data)  # the answer as it came

    whole = io.BytesIO()
    transfer = client.decrypt_object("reports/q1.bin", whole, encryption_context=context)
    assert whole.getvalue() == data
    assert (transfer.status, transfer.bytes_received, transfer.key_used) == (
        200,
        len(data),
        f"{KID}#1",
    )

    first, last = 100_000, 2 * MIB + 77  # spans frames, starts and ends inside them
    part = io.BytesIO()
    ranged = client.decrypt_object("reports/q1.bin", part, byte_range=(first, last))
    assert part.getvalue() == data[first : last + 1]
    assert ranged.status == 206
    assert ranged.content_range == f"bytes {first}-{last}/{len(data)}"

    tail = io.BytesIO()
    client.decrypt_object("reports/q1.bin", tail, byte_range=(len(data) - 10, None))
    assert tail.getvalue() == data[-10:]

    with pytest.raises(ApiError) as exists:
        client.encrypt_to_storage(KID, b"other", key="reports/q1.bin")
    assert (exists.value.status, exists.value.code) == (409, "object-exists")
    client.encrypt_to_storage(KID, [b"new ", b"content"], key="reports/q1.bin", overwrite=True)
    replaced = io.BytesIO()
    client.decrypt_object("reports/q1.bin", replaced)
    assert replaced.getvalue() == b"new content"

    with pytest.raises(ApiError) as mismatch:
        client.decrypt_object("reports/q1.bin", io.BytesIO(), encryption_context=context)
    assert mismatch.value.code == "encryption-context-mismatch"


def test_a_tampered_frame_aborts_the_transfer(
    api: Api, client: SealstreamClient, tmp_path: Path
) -> None:
    data = os.urandom(2 * MIB)
    ciphertext = io.BytesIO()
    client.encrypt(KID, data, ciphertext, frame_length=64 * 1024)
    tampered = bytearray(ciphertext.getvalue())
    tampered[len(tampered) * 3 // 4] ^= 0x01  # inside a frame well after the header

    sink = io.BytesIO()
    with pytest.raises(TransferAborted) as aborted:
        client.decrypt(bytes(tampered), sink)
    assert aborted.value.received == len(sink.getvalue()) < len(data)
    assert data.startswith(sink.getvalue())  # only frames that authenticated came through

    # The same for a stored object, whose response has a Content-Length.
    client.encrypt_to_storage(KID, data, key="t.bin", frame_length=64 * 1024)
    stored = bytearray(api.objects.get("tenants/default/t.bin"))
    stored[len(stored) * 3 // 4] ^= 0x01
    api.objects.put("tenants/default/t.bin", bytes(stored))
    sink = io.BytesIO()
    with pytest.raises(TransferAborted) as aborted:
        client.decrypt_object("t.bin", sink)
    assert aborted.value.received == len(sink.getvalue()) < len(data)

    source, output = tmp_path / "tampered.enc", tmp_path / "out.bin"
    source.write_bytes(tampered)
    run = sealstream(api, "decrypt", str(source), "-o", str(output))
    assert run.returncode == 3
    assert "incomplete" in run.stderr
    assert not output.exists()


def test_api_errors_carry_the_problem(api: Api, client: SealstreamClient) -> None:
    # Refused after the metadata, while the client still has 64 MiB to send.
    with pytest.raises(NotFound) as unknown:
        client.encrypt("no-such-key", GeneratedPlaintext(64 * MIB), HashingSink())
    assert (unknown.value.status, unknown.value.code) == (404, "key-not-found")
    assert unknown.value.problem["code"] == "key-not-found"
    assert "no-such-key" in unknown.value.detail

    with pytest.raises(NotFound) as missing_key:
        client.get_key("no-such-key")
    assert missing_key.value.code == "key-not-found"
    with pytest.raises(ApiError) as missing_object:
        client.decrypt_object("nothing/here", io.BytesIO())
    assert (missing_object.value.status, missing_object.value.code) == (404, "object-not-found")
    with pytest.raises(Unauthenticated) as wrong_token:
        SealstreamClient(api.url, "not-a-token").get_key(KID)
    assert wrong_token.value.status == 401
    with pytest.raises(InvalidRequest) as not_a_message:
        client.decrypt(b"this is not a message", io.BytesIO())
    assert not_a_message.value.status == 400
    with pytest.raises(Conflict):
        client.create_key(**DOCUMENTED_KEY)
    with pytest.raises(PermissionDenied):
        client.export_key(KID)


@pytest.mark.parametrize(
    ("status", "code", "retry", "expected"),
    [
        (400, "invalid-json", False, InvalidRequest),
        (400, "frame-authentication-failed", False, MessageRejected),
        (422, "encryption-context-mismatch", False, MessageRejected),
        (422, "signature-invalid", False, SignatureRejected),
        (409, "key-disabled", False, KeyStateConflict),
        (409, "key-exists", False, AlreadyExists),
        (409, "job-finished", False, Conflict),
        (404, "a-code-of-a-newer-server", False, NotFound),
        (408, "body-timeout", False, RequestTooSlow),
        (416, "range-not-satisfiable", False, RangeNotSatisfiable),
        (429, "rate-limited", True, RateLimited),
        (503, "too-many-streams", True, RateLimited),
        (503, "storage-unavailable", False, Unavailable),
        (502, "record-tampered", False, StoredDataDamaged),
        (500, "internal-error", False, ServerError),
    ],
)
def test_each_code_family_has_its_exception(
    status: int, code: str, retry: bool, expected: type[ApiError]
) -> None:
    assert api_error_class(status, code, retry=retry) is expected


def test_every_documented_code_raises_a_class_of_its_status() -> None:
    """Each code of docs/api.md's table falls in a family of its own status: a family
    is never caught by a handler meant for another status."""
    of_status = {
        401: Unauthenticated,
        403: PermissionDenied,
        404: NotFound,
        409: Conflict,
        412: Conflict,
        429: RateLimited,
    }
    table = (REPO / "docs" / "api.md").read_text().split("The codes, by status:")[1]
    rows = re.findall(r"^\| (\d{3}) \| (.*) \|$", table, re.MULTILINE)
    assert len(rows) > 15
    for status, codes in rows:
        for code in re.findall(r"`([a-z0-9-]+)`", codes):
            family = api_error_class(int(status), code)
            assert issubclass(family, ServerError if int(status) >= 500 else ApiError), code
            if int(status) < 500:
                assert not issubclass(family, ServerError), code
            expected = of_status.get(int(status), InvalidRequest if int(status) < 500 else ApiError)
            assert issubclass(family, expected), (status, code, family)


def test_a_failing_source_raises_its_error_and_never_ends_the_upload(
    api: Api, client: SealstreamClient
) -> None:
    class Broken(Exception):
        pass

    def failing() -> Iterator[bytes]:
        yield b"x" * MIB
        raise Broken("disk read failed")

    with pytest.raises(Broken):
        client.encrypt(KID, failing(), HashingSink())
    with pytest.raises(Broken):
        client.encrypt_to_storage(KID, failing(), key="half.bin")
    assert not [info for info in api.objects.list("tenants/default/") if "half" in info.key]


# The command line: each run starts a process, and the commands reach storage only through
# the API, whose two backends the tests above cover; so one backend here.
local_only = pytest.mark.parametrize("api", ["local"], indirect=True)


def body_bytes(body: MultipartBody) -> bytes:
    """The bytes a transport sends for `body`, a `FileSpan` read from its file."""
    sent = bytearray()
    for piece in body:
        if isinstance(piece, FileSpan):
            data = os.pread(piece.file.fileno(), piece.count, piece.offset)
            piece.sent = len(data)
            piece = data
        sent += piece
    return bytes(sent)


def test_a_body_of_known_size_declares_its_length(tmp_path: Path) -> None:
    """A regular file (from where its reader is) or bytes give the body a Content-Length;
    a pipe or an iterable leave it chunked."""
    path = tmp_path / "sized"
    path.write_bytes(b"x" * 1000 + b"y" * 4000)
    with path.open("rb") as file:
        file.read(1000)
        body = MultipartBody({"kid": KID}, file)
        sent = body_bytes(body)
        assert body.length == len(sent) and b"x" not in sent.split(b"\r\n\r\n", 2)[2]
        assert body.bytes_sent == 4000
    in_memory = MultipartBody({}, b"abc")
    assert in_memory.length == len(body_bytes(in_memory))
    assert MultipartBody({}, iter([b"abc"])).length is None
    read_end, write_end = os.pipe()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert MultipartBody({}, pipe).length is None


class ChangingFile:
    """A regular file whose reads return `extra` bytes more (or, if negative, fewer) than
    its size, as if it changed while it was read."""

    def __init__(self, path: Path, extra: int) -> None:
        self._file = path.open("rb")
        self._extra = extra

    def fileno(self) -> int:
        return self._file.fileno()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        if data and self._extra > 0:
            data, self._extra = data + b"y" * self._extra, 0
        elif data and self._extra < 0:
            data, self._extra = data[: self._extra], 0
        return data


class ChangedAsSent(io.FileIO):
    """A plain file (sent straight from the file, by sendfile) that another writer grows
    or truncates by `extra` bytes once its size has been taken, just as it is sent: the
    second time its position is asked."""

    def __init__(self, path: Path, extra: int) -> None:
        super().__init__(path, "rb")
        self._path = path
        self._extra = extra
        self._asked = 0

    def tell(self) -> int:
        self._asked += 1
        if self._asked == 2:
            os.truncate(self._path, self._path.stat().st_size + self._extra)
        return super().tell()


@local_only
@pytest.mark.parametrize("extra", [1, -1], ids=["grew", "shrank"])
@pytest.mark.parametrize("kind", [ChangingFile, ChangedAsSent], ids=["read", "sendfile"])
def test_a_file_that_changes_while_sent_fails_and_stores_nothing(
    api: Api,
    client: SealstreamClient,
    tmp_path: Path,
    extra: int,
    kind: type[ChangingFile | ChangedAsSent],
) -> None:
    path = tmp_path / "changing"
    path.write_bytes(b"z" * 3_000_000)
    with pytest.raises(SourceChanged), contextlib.closing(kind(path, extra)) as changing:
        client.encrypt_to_storage(KID, changing, key="changed.bin")
    assert not [info for info in api.objects.list("tenants/default/") if "changed" in info.key]


class ClosedAsSent(io.FileIO):
    """A plain file that another thread of the caller closes as it is sent: the second
    time its position is asked, once the body is built around its size."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self._asked = 0

    def tell(self) -> int:
        self._asked += 1
        position = super().tell()
        if self._asked == 2:
            self.close()
        return position


@local_only
def test_a_file_closed_as_it_is_sent_fails_at_once(
    api: Api, client: SealstreamClient, tmp_path: Path
) -> None:
    """sendfile then raises ValueError, not OSError: that fails the call with it, rather
    than leaving the server to wait out its idle timeout on a body that stopped."""
    path = tmp_path / "closed"
    path.write_bytes(b"c" * 3_000_000)
    with pytest.raises(ValueError, match="closed file"):
        client.encrypt_to_storage(KID, ClosedAsSent(path), key="closed.bin")
    assert not [info for info in api.objects.list("tenants/default/") if "closed" in info.key]


@local_only
def test_a_file_goes_from_where_it_is_read(client: SealstreamClient, tmp_path: Path) -> None:
    """A file part from a plain file starts at the file's position, and leaves it at the
    end, as reading it would."""
    path = tmp_path / "offset.bin"
    data = os.urandom(2 * MIB + 5)
    path.write_bytes(data)
    sealed, opened = io.BytesIO(), io.BytesIO()
    with path.open("rb") as file:
        assert file.read(1000) == data[:1000]  # and the rest is buffered ahead
        sent = client.encrypt(KID, file, sealed)
        assert file.tell() == len(data) and file.read() == b""
    assert sent.bytes_sent == len(data) - 1000
    client.decrypt(sealed.getvalue(), opened)
    assert opened.getvalue() == data[1000:]


@local_only
@pytest.mark.parametrize("read_first", [0, 10], ids=["empty", "read-to-its-end"])
def test_a_plain_file_with_nothing_left_round_trips(
    client: SealstreamClient, tmp_path: Path, read_first: int
) -> None:
    """A regular file with no bytes left to send is sent as an empty body, not handed to
    sendfile (which refuses to send 0 bytes, and the upload hung until the server gave up)."""
    path = tmp_path / "nothing-left"
    path.write_bytes(b"x" * read_first)
    sealed, opened = io.BytesIO(), io.BytesIO()
    with path.open("rb") as file:
        file.read(read_first)
        assert client.encrypt(KID, file, sealed).bytes_sent == 0
    client.decrypt(sealed.getvalue(), opened)
    assert opened.getvalue() == b""


def sealstream(
    api: Api, *args: str, stdin: bytes | None = None, token: str | None = ADMIN_TOKEN
) -> "subprocess.CompletedProcess[str]":
    """`sealstream ARGS` with the server and token in its environment; text out."""
    env = {**os.environ, "SEALSTREAM_URL": api.url}
    env.pop("SEALSTREAM_TOKEN", None)
    if token is not None:
        env["SEALSTREAM_TOKEN"] = token
    result = subprocess.run(
        [SEALSTREAM, *args], input=stdin, env=env, capture_output=True, timeout=120
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("latin-1"), result.stderr.decode()
    )


def sealstream_bytes(api: Api, *args: str, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, "SEALSTREAM_URL": api.url, "SEALSTREAM_TOKEN": ADMIN_TOKEN}
    result = subprocess.run(
        [SEALSTREAM, *args], input=stdin, env=env, capture_output=True, timeout=120, check=True
    )
    return result.stdout


@local_only
def test_cli_files_round_trip(api: Api, client: SealstreamClient, tmp_path: Path) -> None:
    plain, sealed, opened = tmp_path / "plain.txt", tmp_path / "plain.enc", tmp_path / "out.txt"
    plain.write_bytes(b"the quarterly numbers\n" * 1000)

    run = sealstream(
        api,
        "encrypt",
        "--kid",
        KID,
        "--context",
        "team=finance",
        "--frame-length",
        "4096",
        str(plain),
        "-o",
        str(sealed),
    )
    assert run.returncode == 0, run.stderr
    run = sealstream(
        api, "decrypt", str(sealed), "-o", str(opened), "--kid", KID, "--context", "team=finance"
    )
    assert run.returncode == 0, run.stderr
    assert opened.read_bytes() == plain.read_bytes()

    # A context the message does not carry: refused, and no output file appears.
    refused = tmp_path / "refused.txt"
    run = sealstream(api, "decrypt", str(sealed), "-o", str(refused), "--context", "team=hr")
    assert run.returncode == 1
    assert "encryption-context-mismatch" in run.stderr
    assert not refused.exists()


@local_only
def test_cli_pipes_and_options(api: Api, client: SealstreamClient) -> None:
    sealed = sealstream_bytes(api, "encrypt", "--kid", KID, stdin=b"from stdin")
    # --url and --token as options instead of the environment.
    run = sealstream(
        api, "decrypt", "--url", api.url, "--token", ADMIN_TOKEN, "-", stdin=sealed, token=None
    )
    assert (run.returncode, run.stdout) == (0, "from stdin")
    run = sealstream(api, "decrypt", stdin=sealed, token=None)
    assert run.returncode == 2
    assert "SEALSTREAM_TOKEN" in run.stderr

    run = sealstream(api, "encrypt", "--kid", "no-such-key", stdin=b"data")
    assert run.returncode == 5  # not found
    assert "key-not-found" in run.stderr
    assert run.stdout == ""


@local_only
def test_cli_storage(api: Api, client: SealstreamClient, tmp_path: Path) -> None:
    plain = tmp_path / "letter.txt"
    plain.write_bytes(b"0123456789abcdef")
    run = sealstream(
        api, "encrypt", "--kid", KID, "--to-storage", "mail/letter", str(plain), "--json"
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["plaintextSize"] == 16

    ranged = sealstream_bytes(api, "decrypt", "--from-storage", "mail/letter", "--range", "2-5")
    assert ranged == b"2345"
    tail = sealstream_bytes(api, "decrypt", "--from-storage", "mail/letter", "--range", "10-")
    assert tail == b"abcdef"

    tail = sealstream_bytes(api, "decrypt", "--from-storage", "mail/letter", "--range", "-3")
    assert tail == b"def"

    run = sealstream(api, "encrypt", "--kid", KID, "--to-storage", "mail/letter", str(plain))
    assert run.returncode == 6  # conflict
    assert "object-exists" in run.stderr
    run = sealstream(
        api,
        "encrypt",
        "--kid",
        KID,
        "--to-storage",
        "mail/letter",
        "--overwrite",
        "-",
        stdin=b"replaced",
    )
    assert run.returncode == 0, run.stderr
    replaced = io.BytesIO()
    client.decrypt_object("mail/letter", replaced)
    assert replaced.getvalue() == b"replaced"


# HTTPS


def test_https(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same calls over TLS (memory BIOs shared by the upload and download threads)."""
    certificate, key = self_signed_certificate(tmp_path)
    app = create_app(api_settings("local", tmp_path, request))
    with api_server(app, tls=(certificate, key)) as url:
        trusted = ssl.create_default_context(cafile=str(certificate))
        client = SealstreamClient(url, ADMIN_TOKEN, timeout=30, ssl_context=trusted)
        client.create_key(**DOCUMENTED_KEY)
        plaintext = GeneratedPlaintext(24 * MIB)
        ciphertext = io.BytesIO()
        client.encrypt(KID, plaintext, ciphertext)
        recovered = HashingSink()
        client.decrypt(ciphertext.getvalue(), recovered)
        assert recovered.digest.hexdigest() == plaintext.digest.hexdigest()
        # A plain file, which over TLS is read through the process to be encrypted.
        (tmp_path / "plain.bin").write_bytes(data := os.urandom(3 * MIB + 1))
        sealed, opened = io.BytesIO(), io.BytesIO()
        with (tmp_path / "plain.bin").open("rb") as file:
            client.encrypt(KID, file, sealed)
        client.decrypt(sealed.getvalue(), opened)
        assert opened.getvalue() == data

        with pytest.raises(ApiError) as unknown:
            client.get_key("no-such-key")
        assert unknown.value.code == "key-not-found"

        untrusted = SealstreamClient(url, ADMIN_TOKEN, timeout=30)
        with pytest.raises(ClientError, match="certificate verify failed"):
            untrusted.get_key(KID)

        # The command takes the CA to check the server with from --ca (or a profile).
        env = {**os.environ, "SEALSTREAM_URL": url, "SEALSTREAM_TOKEN": ADMIN_TOKEN}
        env.pop("SEALSTREAM_CA", None)
        command = [SEALSTREAM, "keys", "get", KID]
        trusted_run = subprocess.run(
            [*command, "--ca", str(certificate)], env=env, capture_output=True, timeout=60
        )
        assert trusted_run.returncode == 0, trusted_run.stderr
        refused = subprocess.run(command, env=env, capture_output=True, timeout=60)
        assert refused.returncode == 1 and b"certificate verify failed" in refused.stderr
