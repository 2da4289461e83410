"""`sealstream encrypt`, `sealstream decrypt` and `sealstream reencrypt`: local file or
stdin to local file or stdout, or to and from the tenant's storage (a range of a stored
object, if asked; a stored object re-encrypted in place or into another).

An OUTPUT file is written as `OUTPUT.partial` and renamed to OUTPUT only once the
transfer is whole: a transfer that fails, breaks off or is interrupted deletes the
partial file, and never leaves an OUTPUT that looks complete (nor touches an OUTPUT that
was there before).
"""

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click

from cli.exits import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_USAGE, CommandFailed
from cli.progress import Meter, transfer_bar, wanted
from cli.session import Session, client_command, print_fields, print_json
from sealstream_client import ByteRange, ClientError, Transfer, TransferAborted

PARTIAL = ".partial"
F = TypeVar("F", bound=Callable[..., Any])


def _context_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, equals, text = value.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"give a pair k=v, not {value!r}")
        pairs[name] = text
    return pairs


def context_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--context",
        "context",
        multiple=True,
        metavar="K=V",
        callback=_context_pairs,
        help=help_text,
    )


@click.command(short_help="Encrypt a file or stdin, to a file, stdout or storage.")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option(
    "--kid",
    "kids",
    multiple=True,
    help="a key to encrypt for (else the profile's kid); repeat it for several recipients",
)
@click.option(
    "--recipient-key",
    metavar="FILE",
    help="also encrypt for this public JWK (RSA or ML-KEM), a key the service does not hold",
)
@click.option(
    "--signed/--unsigned",
    default=None,
    help="sign the message (ESDK suite 0x0578)  [default: signed for several recipients]",
)
@context_option("an encryption context pair bound to the message (repeatable)")
@click.option("--frame-length", type=int, help="frame length in bytes  [default: 1 MiB]")
@click.option("--output", "-o", default="-", help="where the ciphertext goes; - for stdout")
@click.option("--to-storage", metavar="KEY", help="store the ciphertext as this object key")
@click.option("--bucket", help="with --to-storage: the bucket")
@click.option("--overwrite", is_flag=True, help="with --to-storage: replace an existing object")
@click.option(
    "--resume/--no-resume",
    default=None,
    help="with --to-storage and a file: a resumable upload, which a rerun goes on with "
    "where a failed or interrupted one stopped  [default: for files of 64 MiB or more]",
)
@client_command
def encrypt(
    session: Session,
    input: str,
    kids: tuple[str, ...],
    recipient_key: str | None,
    signed: bool | None,
    context: dict[str, str],
    frame_length: int | None,
    output: str,
    to_storage: str | None,
    bucket: str | None,
    overwrite: bool,
    resume: bool | None,
) -> None:
    """Encrypt INPUT (a file, or - for stdin) under a key, or for several (any one of them
    decrypts it). The ciphertext streams back to --output, or with --to-storage goes into
    object storage (what was stored is printed)."""
    key: str | list[str] = list(kids) if len(kids) > 1 else session.kid(next(iter(kids), None))
    partner = None if recipient_key is None else _jwk_file(recipient_key)
    if to_storage is None:
        if bucket is not None or overwrite:
            raise CommandFailed("--bucket and --overwrite go with --to-storage", EXIT_USAGE)
        with (
            input_file(session, input, "encrypt", output) as source,
            _Output(output) as sink,
            _Stopwatch() as watch,
        ):
            transfer = session.client.encrypt(
                key,
                source,
                sink,
                encryption_context=context,
                frame_length=frame_length,
                recipient_public_key=partner,
                signed=signed,
            )
        _summarise(session, transfer, output, watch.seconds)
        return
    if output != "-":
        raise CommandFailed("--to-storage prints what was stored: drop --output", EXIT_USAGE)
    if _resumable(resume, input, key, partner is not None or bool(signed)):
        assert isinstance(key, str)
        target = Destination(to_storage, bucket, overwrite, context, frame_length)
        resumed = _encrypt_resumable(session, Path(input), key, target)
        session.show(resumed, lambda: print_fields(resumed, RESUMED_FIELDS))
        return
    with input_file(session, input, "encrypt", output) as source:
        stored = session.client.encrypt_to_storage(
            key,
            source,
            key=to_storage,
            bucket=bucket,
            overwrite=overwrite,
            encryption_context=context,
            frame_length=frame_length,
            recipient_public_key=partner,
            signed=signed,
        ).document
    session.show(stored, lambda: print_fields(stored, STORED_FIELDS))


RESUMABLE_FROM = 64 * 1024 * 1024  # bytes of a file that make --resume the default
RESUMED_FIELDS = ("key", "bucket", "kid", "plaintextSize", "upload", "verifyJob")


@dataclass(frozen=True)
class Destination:
    """Where a resumable upload goes, and how it is sealed."""

    key: str
    bucket: str | None
    overwrite: bool
    context: dict[str, str]
    frame_length: int | None


def _resumable(resume: bool | None, input: str, key: str | list[str], signed: bool) -> bool:
    """Whether to upload through a resumable upload: asked for, or by default for a large
    file; it takes a file (it is read again from where the server stopped) and one key."""
    is_file = input != "-" and Path(input).is_file()
    if resume and (not is_file or not isinstance(key, str) or signed):
        raise CommandFailed(
            "--resume takes a file (not stdin), one --kid and no --recipient-key or --signed",
            EXIT_USAGE,
        )
    if resume is None:
        large = is_file and Path(input).stat().st_size >= RESUMABLE_FROM
        return large and isinstance(key, str) and not signed
    return resume


def _encrypt_resumable(
    session: Session, path: Path, kid: str, target: Destination
) -> dict[str, Any]:
    """Upload `path` through a resumable upload, going on with the one a run before this
    one left for the same file and destination (its path is kept in a small file under
    the state directory, with the file's identity: nothing of the file's content and no
    key). A file that is not the one that run read (changed, or replaced) starts a new
    upload, and the earlier one is terminated: going on would make an object of its old
    bytes and its new ones."""
    kept = _upload_note(session, path, kid, target)
    with path.open("rb") as file:
        opened = os.fstat(file.fileno())  # the file read, whatever the path names later
        identity = _file_identity(opened)
        earlier = _earlier_upload(session, kept, identity)

        def keep(upload: str) -> None:
            kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            kept.write_text(json.dumps({"upload": upload, "file": identity}))
            kept.chmod(0o600)

        result = session.client.upload_resumable(
            kid,
            file,
            opened.st_size,
            key=target.key,
            bucket=target.bucket,
            overwrite=target.overwrite,
            encryption_context=target.context,
            frame_length=target.frame_length,
            upload=earlier,
            created=keep,
        )
    kept.unlink(missing_ok=True)
    return {
        "key": target.key,
        "bucket": target.bucket,
        "kid": kid,
        "plaintextSize": opened.st_size,
        "upload": result.upload,
        "verifyJob": result.verify_job,
    }


def _file_identity(stat: os.stat_result) -> list[int]:
    """What tells a file from the same file changed, as git's index and rsync do: its
    device and inode (another file put at the path), size, and modification and change
    times in nanoseconds. The change time is set by the kernel at every write or
    metadata change and no user tool can set it back, so a file rewritten in place with
    its size and modification time restored still differs."""
    return [
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    ]


def _earlier_upload(session: Session, kept: Path, identity: list[int]) -> str | None:
    """The upload a run before this one left for this file, if the file is the one that
    run read; one left for a file since changed is terminated (or, should that fail, left
    to expire) and None returned."""
    try:
        note = json.loads(kept.read_text())
        upload, read = str(note["upload"]), note["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or not one this command wrote
    if read == identity:
        return upload
    with suppress(ClientError):
        session.client.terminate_upload(upload)
    kept.unlink(missing_ok=True)
    return None


def _upload_note(session: Session, path: Path, kid: str, target: Destination) -> Path:
    """Where the path of this file's upload to this destination is kept between runs,
    with the identity of the file it reads (`_file_identity`): named by a digest of the
    server, the file's path, the key and the destination."""
    identity = [session.connection.url, str(path.resolve()), kid, target.key, target.bucket]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "sealstream" / "uploads" / digest


def _jwk_file(path: str) -> dict[str, Any]:
    """The JSON object in `path`: a public JWK."""
    try:
        jwk = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CommandFailed(f"cannot read a JWK from {path}: {exc}", EXIT_USAGE) from None
    if not isinstance(jwk, dict):
        raise CommandFailed(f"{path} holds no JWK (a JSON object)", EXIT_USAGE)
    return jwk


@click.command(short_help="Re-encrypt a message, or a stored object, for another key.")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option("--kid", help="the key to re-encrypt for (else the profile's kid)")
@click.option("--source-kid", help="require the message to be sealed for this key")
@context_option("require this encryption context pair of the message (repeatable)")
@click.option("--output", "-o", default="-", help="where the new message goes; - for stdout")
@click.option("--from-storage", metavar="KEY", help="re-encrypt this stored object, not INPUT")
@click.option(
    "--to-storage", metavar="KEY", help="with --from-storage: into this object, not in place"
)
@click.option("--bucket", help="with --from-storage: the bucket (of both objects)")
@click.option("--overwrite", is_flag=True, help="with --to-storage: replace an existing object")
@client_command
def reencrypt(
    session: Session,
    input: str,
    kid: str | None,
    source_kid: str | None,
    context: dict[str, str],
    output: str,
    from_storage: str | None,
    to_storage: str | None,
    bucket: str | None,
    overwrite: bool,
) -> None:
    """Re-encrypt the message INPUT (a file, or - for stdin) for another key under a fresh
    data key, in one pass: the new message streams back to --output. With --from-storage,
    a stored object is re-encrypted in place (or into --to-storage), and what was stored,
    with the job that verifies it, is printed."""
    key = session.kid(kid)
    if from_storage is None:
        if to_storage is not None or bucket is not None or overwrite:
            raise CommandFailed(
                "--to-storage, --bucket and --overwrite go with --from-storage", EXIT_USAGE
            )
        with (
            input_file(session, input, "reencrypt", output) as source,
            _Output(output) as sink,
            _Stopwatch() as watch,
        ):
            transfer = session.client.reencrypt(
                key, source, sink, source_kid=source_kid, encryption_context=context
            )
        _summarise(session, transfer, output, watch.seconds)
        return
    if input != "-" or output != "-":
        raise CommandFailed("--from-storage takes neither INPUT nor --output", EXIT_USAGE)
    stored = session.client.reencrypt_object(
        key,
        from_storage,
        bucket=bucket,
        source_kid=source_kid,
        destination=to_storage,
        destination_bucket=bucket,
        overwrite=overwrite,
        encryption_context=context,
    ).document
    session.show(stored, lambda: print_fields(stored, STORED_FIELDS))


STORED_FIELDS = (
    "key", "bucket", "kid", "keyVersion", "plaintextSize", "ciphertextSize", "plaintextSha256",
    "verifyJob", "verifyQueued",
)  # fmt: skip


@click.command(short_help="Decrypt a file, stdin or a stored object (or a range of it).")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option("--kid", help="require the message to be sealed for this key")
@context_option("require this encryption context pair (repeatable)")
@click.option("--output", "-o", default="-", help="where the plaintext goes; - for stdout")
@click.option("--from-storage", metavar="KEY", help="decrypt this stored object, not INPUT")
@click.option("--bucket", help="with --from-storage: the bucket")
@click.option(
    "--range",
    "byte_range",
    metavar="RANGE",
    help="with --from-storage: plaintext bytes a-b (inclusive), a- (to the end) or -n (the last n)",
)
@client_command
def decrypt(
    session: Session,
    input: str,
    kid: str | None,
    context: dict[str, str],
    output: str,
    from_storage: str | None,
    bucket: str | None,
    byte_range: str | None,
) -> None:
    """Decrypt INPUT (a file, or - for stdin), or with --from-storage a stored object (a
    --range of it if asked): the plaintext streams back to --output."""
    client = session.client
    if from_storage is None:
        if bucket is not None or byte_range is not None:
            raise CommandFailed("--bucket and --range go with --from-storage", EXIT_USAGE)
        with (
            input_file(session, input, "decrypt", output) as source,
            _Output(output) as sink,
            _Stopwatch() as watch,
        ):
            transfer = client.decrypt(source, sink, kid=kid, encryption_context=context)
        _summarise(session, transfer, output, watch.seconds)
        return
    if input != "-":
        raise CommandFailed("give either INPUT or --from-storage, not both", EXIT_USAGE)
    wanted_range = None if byte_range is None else parse_range(byte_range)
    show = wanted(session.quiet)
    with (
        transfer_bar("decrypt", None, show=show) as meter,
        _Output(output, meter) as sink,
        _Stopwatch() as watch,
    ):
        transfer = client.decrypt_object(
            from_storage,
            sink,
            bucket=bucket,
            byte_range=wanted_range,
            kid=kid,
            encryption_context=context,
            on_length=meter.expect,
        )
    _summarise(session, transfer, output, watch.seconds)


_RANGE = re.compile(r"^(?:(\d+)-(\d*)|-(\d+))$")


def parse_range(text: str) -> ByteRange:
    """`a-b`, `a-` or `-n` as the client's byte range."""
    match = _RANGE.match(text.strip())
    if match is None:
        raise CommandFailed(f"--range takes a-b, a- or -n, not {text!r}", EXIT_USAGE)
    first, last, suffix = match.groups()
    if suffix is not None:
        if int(suffix) == 0:
            raise CommandFailed("--range -n takes n of at least 1", EXIT_USAGE)
        return None, int(suffix)
    if last and int(last) < int(first):
        raise CommandFailed(f"--range {text}: the end comes before the start", EXIT_USAGE)
    return int(first), int(last) if last else None


class _Stopwatch:
    """The seconds a transfer took, from its request to its last byte."""

    def __enter__(self) -> "_Stopwatch":
        self._start = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._start


def _summarise(session: Session, transfer: Transfer, output: str, seconds: float) -> None:
    """What the transfer did: JSON with `--json` (to stderr when the data took stdout),
    else a line on stderr when the data went to a file."""
    summary = {
        "keyRequested": transfer.key_requested,
        "keyUsed": transfer.key_used,
        "algorithm": transfer.algorithm,
        "bytesSent": transfer.bytes_sent,
        "bytesReceived": transfer.bytes_received,
        "status": transfer.status,
        "contentRange": transfer.content_range,
        "output": None if output == "-" else output,
        "seconds": round(seconds, 3),
    }
    if session.json:
        if output == "-":
            click.echo(_json_line(summary), err=True)
        else:
            print_json(summary)
    elif output != "-":
        session.note(f"{transfer.bytes_received} bytes to {output} ({transfer.key_used})")


def _json_line(document: dict[str, Any]) -> str:
    import json

    return json.dumps(document)


class _Counting:
    """A source that reports the bytes read from it to a meter."""

    def __init__(self, source: BinaryIO, meter: Meter) -> None:
        self._source = source
        self._meter = meter

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        self._meter.advance(len(data))
        return data

    def fileno(self) -> int:
        return self._source.fileno()

    def tell(self) -> int:
        return self._source.tell()


@contextmanager
def input_file(session: Session, path: str, verb: str, output: str = "-") -> Iterator[Any]:
    """INPUT opened for reading, counted by a progress bar when one is drawn. Without a
    bar it is handed over as the file itself, which the client sends straight from the
    file when it is a regular one (sendfile)."""
    show = wanted(session.quiet)
    if path == "-":
        # Unbuffered: the upload thread may still be blocked reading it when an interrupted
        # command exits, and a buffered reader's lock held then aborts the interpreter.
        with (
            open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as stdin,
            transfer_bar(verb, None, show=show) as meter,
        ):
            yield _Counting(stdin, meter) if show else stdin
        return
    if output != "-" and _same_file(Path(path), Path(output)):
        raise CommandFailed("--output is INPUT: write to another file", EXIT_USAGE)
    try:
        source = Path(path).open("rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    with source, transfer_bar(verb, _size(source), show=show) as meter:
        yield _Counting(source, meter) if show else source


def _size(source: BinaryIO) -> int | None:
    try:
        return Path(source.name).stat().st_size if Path(source.name).is_file() else None
    except (OSError, TypeError):
        return None


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.samefile(b)


class _Output:
    """OUTPUT as a sink: stdout for -, else `OUTPUT.partial`, created at the first write
    (so a refused request leaves no file) and renamed to OUTPUT once the transfer is whole.
    Whatever stops the transfer deletes the partial file and says so. An OUTPUT that
    exists and is not a regular file (/dev/null, a pipe) is written as it is, like stdout."""

    def __init__(self, path: str, meter: Meter | None = None) -> None:
        target = None if path == "-" else Path(path)
        streamed = target is None or (target.exists() and not target.is_file())
        self._path = None if streamed else target
        self._stream = None if not streamed else target  # None: stdout
        self._file: BinaryIO | None = None
        self._meter = meter

    @property
    def _partial(self) -> Path:
        assert self._path is not None
        return self._path.with_name(self._path.name + PARTIAL)

    def write(self, data: bytes) -> int:
        if self._file is None:
            self._file = self._open()
        if self._meter is not None:
            self._meter.advance(len(data))
        return self._file.write(data)

    def _open(self) -> BinaryIO:
        if self._path is not None:
            return self._partial.open("wb")
        return sys.stdout.buffer if self._stream is None else self._stream.open("wb")

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        if exc is None:
            self.write(b"")  # an empty result still creates its file
        if self._file is None:
            return
        if self._path is None:
            self._file.flush()
            if self._stream is not None:
                self._file.close()
            where = "stdout" if self._stream is None else str(self._stream)
            self._fail(exc, f"the output written to {where} is incomplete")
            return
        self._file.close()
        if exc is None:
            self._partial.replace(self._path)
            return
        self._partial.unlink(missing_ok=True)
        self._fail(exc, f"the output is incomplete: {self._partial} was deleted")

    @staticmethod
    def _fail(exc: BaseException | None, fate: str) -> None:
        """Say what became of the output when the transfer stopped."""
        if isinstance(exc, KeyboardInterrupt):
            raise CommandFailed(f"interrupted; {fate}", EXIT_INTERRUPTED) from None
        if isinstance(exc, TransferAborted):
            raise CommandFailed(f"transfer aborted: {exc.reason}; {fate}", EXIT_ABORTED) from None
