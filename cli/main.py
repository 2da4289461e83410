"""The `sealstream` command. `sealstream encrypt` and `sealstream decrypt` are clients of a
running API (cli.client); the server's commands (`sealstream serve`...) are found through
the entry-point group `sealstream.commands`, so the client never imports the server.

Client commands exit 0 on success, 1 when the request fails (the problem's code and
detail go to stderr), 2 on bad usage, and 3 when a transfer is aborted midway: the
output is then incomplete, and an OUTPUT file is deleted rather than left looking whole.
"""

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydantic import Field, SecretStr, ValidationError, create_model
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    CliPositionalArg,
    CliSubCommand,
    SettingsConfigDict,
    SettingsError,
)

from cli.client import ApiError, ByteRange, ClientError, SealstreamClient, TransferAborted
from cli.exits import EXIT_ABORTED, EXIT_USAGE, CommandFailed, fail
from cli.options import CommandOptions

COMMANDS = "sealstream.commands"  # the entry-point group of the commands other packages add


class ClientCommand(CommandOptions):
    """The options of every client command: where the API is and the token to use."""

    # Only these come from SEALSTREAM_* variables: a stray SEALSTREAM_OVERWRITE must not
    # change what a command does.
    from_environment = ("url", "token")

    url: str = Field("http://127.0.0.1:8080", description="the API's base URL (SEALSTREAM_URL)")
    token: SecretStr | None = Field(None, description="the bearer token (SEALSTREAM_TOKEN)")

    def cli_cmd(self) -> None:
        try:
            self.run()
        except CommandFailed as exc:
            fail(str(exc), exc.exit_code)

    def run(self) -> None:
        raise NotImplementedError

    def client(self) -> SealstreamClient:
        if self.token is None:
            raise CommandFailed("no token: pass --token or set SEALSTREAM_TOKEN", EXIT_USAGE)
        try:
            return SealstreamClient(self.url, self.token.get_secret_value())
        except ValueError as exc:
            raise CommandFailed(str(exc), EXIT_USAGE) from None


class Encrypt(ClientCommand):
    """Encrypt INPUT (a file, or - for stdin) under a key: the ciphertext streams back to
    OUTPUT, or with --to-storage goes into object storage (what was stored is printed)."""

    kid: str = Field(description="the key to encrypt under")
    context: dict[str, str] = Field(
        default_factory=dict, description="an encryption context pair k=v (repeatable)"
    )
    frame_length: int | None = Field(None, description="frame length in bytes (default 1 MiB)")
    to_storage: str | None = Field(None, description="store the ciphertext as this object key")
    bucket: str | None = Field(None, description="with --to-storage: the bucket")
    overwrite: CliImplicitFlag[bool] = Field(
        False, description="with --to-storage: replace an existing object"
    )
    input: CliPositionalArg[str] = Field("-", description="the file to encrypt; - for stdin")
    output: str = Field("-", description="where the ciphertext goes; - for stdout")

    def run(self) -> None:
        client = self.client()
        if self.to_storage is None:
            if self.bucket is not None or self.overwrite:
                raise CommandFailed("--bucket and --overwrite go with --to-storage", EXIT_USAGE)
            output = _Output(self.output)
            with _reporting(output), _input(self.input, self.output) as source, output:
                client.encrypt(
                    self.kid,
                    source,
                    output,
                    encryption_context=self.context,
                    frame_length=self.frame_length,
                )
            return
        if self.output != "-":
            raise CommandFailed("--to-storage prints what was stored: drop -o", EXIT_USAGE)
        with _reporting(), _input(self.input, self.output) as source:
            stored = client.encrypt_to_storage(
                self.kid,
                source,
                key=self.to_storage,
                bucket=self.bucket,
                overwrite=self.overwrite,
                encryption_context=self.context,
                frame_length=self.frame_length,
            )
        print(json.dumps(stored, indent=2))


class Decrypt(ClientCommand):
    """Decrypt INPUT (a file, or - for stdin), or with --from-storage a stored object (a
    --range of it if asked): the plaintext streams back to OUTPUT."""

    kid: str | None = Field(None, description="require the message to be sealed for this key")
    context: dict[str, str] = Field(
        default_factory=dict, description="require this encryption context pair k=v (repeatable)"
    )
    from_storage: str | None = Field(None, description="decrypt this stored object, not INPUT")
    bucket: str | None = Field(None, description="with --from-storage: the bucket")
    range: str | None = Field(
        None, description="with --from-storage: plaintext bytes a-b (inclusive) or a- (to the end)"
    )
    input: CliPositionalArg[str] = Field("-", description="the message to decrypt; - for stdin")
    output: str = Field("-", description="where the plaintext goes; - for stdout")

    def run(self) -> None:
        client = self.client()
        output = _Output(self.output)
        if self.from_storage is None:
            if self.bucket is not None or self.range is not None:
                raise CommandFailed("--bucket and --range go with --from-storage", EXIT_USAGE)
            with _reporting(output), _input(self.input, self.output) as source, output:
                client.decrypt(source, output, kid=self.kid, encryption_context=self.context)
            return
        if self.input != "-":
            raise CommandFailed("give either INPUT or --from-storage, not both", EXIT_USAGE)
        byte_range = None if self.range is None else _parse_range(self.range)
        with _reporting(output), output:
            client.decrypt_object(
                self.from_storage,
                output,
                bucket=self.bucket,
                byte_range=byte_range,
                kid=self.kid,
                encryption_context=self.context,
            )


class Sealstream(BaseSettings):
    """sealstream: streaming envelope encryption."""

    model_config = SettingsConfigDict(
        cli_prog_name="sealstream", cli_kebab_case=True, cli_shortcuts={"output": "o"}
    )

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def command_line() -> type[Sealstream]:
    """The root command: the commands installed in the entry-point group, then the
    client's own."""
    commands: dict[str, Any] = {
        command.name.replace("-", "_"): _subcommand(command.load())
        for command in entry_points(group=COMMANDS)
    }
    commands |= {"encrypt": _subcommand(Encrypt), "decrypt": _subcommand(Decrypt)}
    return create_model("Sealstream", __base__=Sealstream, __doc__=Sealstream.__doc__, **commands)


def _subcommand(command: type[BaseSettings]) -> tuple[Any, Any]:
    """The root command's field that runs `command` (a type made at run time, which the
    type checker cannot follow)."""
    return cast(Any, CliSubCommand)[command], ...


_RANGE = re.compile(r"^(\d+)-(\d*)$")


def _parse_range(text: str) -> ByteRange:
    match = _RANGE.match(text.strip())
    if match is None or (match.group(2) and int(match.group(2)) < int(match.group(1))):
        raise CommandFailed(f"--range takes a-b or a-, not {text!r}", EXIT_USAGE)
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


@contextmanager
def _input(path: str, output: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    if output != "-" and _same_file(Path(path), Path(output)):
        raise CommandFailed("OUTPUT is INPUT: write to another file", EXIT_USAGE)
    try:
        source = Path(path).open("rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    with source:
        yield source


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.samefile(b)


@contextmanager
def _reporting(output: "_Output | None" = None) -> Iterator[None]:
    """A failure as a command failure: a refusal's problem code and detail, an aborted
    transfer with what became of the output."""
    try:
        yield
    except ApiError as exc:
        raise CommandFailed(f"{exc.code}: {exc.detail} (HTTP {exc.status})") from None
    except TransferAborted as exc:
        fate = "" if output is None else f"; {output.fate}"
        raise CommandFailed(f"transfer aborted: {exc.reason}{fate}", EXIT_ABORTED) from None
    except (ClientError, OSError) as exc:
        raise CommandFailed(str(exc)) from None


class _Output:
    """OUTPUT as a sink: stdout for -, else a file created at the first write (so a refused
    request leaves an existing file alone) and deleted if the call fails after that."""

    def __init__(self, path: str) -> None:
        self._path = None if path == "-" else Path(path)
        self._file: BinaryIO | None = None
        self.fate = "no output was written"

    def write(self, data: bytes) -> int:
        if self._file is None:
            self._file = sys.stdout.buffer if self._path is None else self._path.open("wb")
        return self._file.write(data)

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        if exc is None:
            self.write(b"")  # an empty result still creates its file
        if self._file is None:
            return
        if self._path is None:
            self._file.flush()
            self.fate = "the output written to stdout is incomplete"
            return
        self._file.close()
        if exc is not None:
            self._path.unlink(missing_ok=True)
            self.fate = f"the output is incomplete: {self._path} was deleted"


def main(argv: list[str] | None = None) -> None:
    try:
        CliApp.run(command_line(), cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(error['loc'][-1]).replace('_', '-')}: {error['msg']}" for error in exc.errors()
        )
        fail(f"invalid options: {problems}", EXIT_USAGE)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
