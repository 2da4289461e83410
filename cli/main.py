"""`sealstream` commands. `sealstream serve` runs the API; its options are the settings.
`sealstream encrypt` and `sealstream decrypt` are clients of a running API (cli.client).

Client commands exit 0 on success, 1 when the request fails (the problem's code and
detail go to stderr), 2 on bad usage, and 3 when a transfer is aborted midway: the
output is then incomplete, and an OUTPUT file is deleted rather than left looking whole.
"""

import ipaddress
import json
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn
from urllib.parse import urlsplit

import uvicorn
from pydantic import Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    CliPositionalArg,
    CliSubCommand,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cli.client import ApiError, ByteRange, ClientError, SealstreamClient, TransferAborted
from sealstream.memory import keep_freed_buffers
from sealstream.settings import Settings, without_credentials

if TYPE_CHECKING:
    from fastapi import FastAPI


# The server's modules (FastAPI, boto3, Celery...) load only when `serve` runs: a client
# command then starts in a third of the time.
def create_app(settings: Settings) -> "FastAPI":
    from api import create_app as create

    return create(settings)


def local_storage_dir(settings: Settings) -> Path | None:
    from sealstream.wiring import local_storage_dir as storage_dir

    return storage_dir(settings)


def server_options(settings: Settings) -> dict[str, Any]:
    from api.serving import server_options as options

    return options(settings)


class Serve(Settings):
    """Run the API. With no configuration: local storage in ./.sealstream, jobs in-process,
    a KEK generated beside the data, and a fresh admin token printed."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_", cli_kebab_case=True, extra="ignore")

    def cli_cmd(self) -> None:
        settings = self
        generated = None
        if settings.admin_token is None:
            generated = SecretStr(secrets.token_urlsafe(32))
            settings = self.model_copy(update={"admin_token": generated})
        keep_freed_buffers()
        from sealstream.wiring import ConfigurationError

        try:
            app = create_app(settings)
            options = server_options(settings)
        except ConfigurationError as exc:
            _fail(f"cannot start: {exc}", EXIT_USAGE)
        _announce(settings, generated)
        warn_if_exposed(settings)
        uvicorn.run(app, log_level="info", **options)


class UpgradeRecords(Settings):
    """Seal the records of a store set up before records were sealed (the service refuses
    to start on one): run once with the service's settings and KEK, and review every
    record it lists, since sealing blesses whatever the bucket holds now (`--dry-run`
    lists them first, sealing nothing)."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_", cli_kebab_case=True, extra="ignore")

    again: CliImplicitFlag[bool] = Field(
        False,
        description="seal unsealed records found in a store whose records were all sealed "
        "already: someone else put them there, so review what this lists",
    )
    dry_run: CliImplicitFlag[bool] = Field(
        False, description="list what would be sealed, and seal nothing"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _ServiceEnvironment(settings_cls)

    def cli_cmd(self) -> None:
        from api.upgrade import AlreadySealed, upgrade_records
        from sealstream.wiring import ConfigurationError

        try:
            report = upgrade_records(self, again=self.again, dry_run=self.dry_run)
        except (AlreadySealed, ConfigurationError) as exc:
            _fail(f"cannot upgrade: {exc}", EXIT_FAILED)
        for line in report.lines():
            print(line)


class _ServiceEnvironment(EnvSettingsSource):
    """Only the service's settings come from SEALSTREAM_* variables: what a command is
    told to do (`--again`, say) is said on its command line, never left in the
    environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[object, str, bool]:
        if field_name not in Settings.model_fields:
            return None, field_name, False
        return super().get_field_value(field, field_name)


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
CONNECTION_OPTIONS = ("url", "token")


class CommandFailed(Exception):
    """A client command stops: the message goes to stderr, the code is the exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _ConnectionEnvironment(EnvSettingsSource):
    """Only the connection options come from SEALSTREAM_* variables: a stray
    SEALSTREAM_OVERWRITE must not change what a command does."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[object, str, bool]:
        if field_name not in CONNECTION_OPTIONS:
            return None, field_name, False
        return super().get_field_value(field, field_name)


class ClientCommand(BaseSettings):
    """The options of every client command: where the API is and the token to use."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_", cli_kebab_case=True, extra="ignore")

    url: str = Field("http://127.0.0.1:8080", description="the API's base URL (SEALSTREAM_URL)")
    token: SecretStr | None = Field(None, description="the bearer token (SEALSTREAM_TOKEN)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _ConnectionEnvironment(settings_cls)

    def cli_cmd(self) -> None:
        try:
            self.run()
        except CommandFailed as exc:
            _fail(str(exc), exc.exit_code)

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

    serve: CliSubCommand[Serve]
    upgrade_records: CliSubCommand[UpgradeRecords]
    encrypt: CliSubCommand[Encrypt]
    decrypt: CliSubCommand[Decrypt]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


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


def _fail(message: str, exit_code: int) -> NoReturn:
    print(f"sealstream: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


def _base_url(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{settings.host}:{settings.port}"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: localhost or a loopback address
    (a name may resolve to anything)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings) -> None:
    """A loud warning when plain HTTP crosses a network: served, or spoken to KMS."""
    if not settings.tls_cert and not is_loopback(settings.host):
        _warn(
            f"WARNING: serving plain HTTP on {settings.host!r}, which is not a loopback address.",
            "Tokens, key material and plaintext cross the network unencrypted. Serve HTTPS with",
            "--tls-cert and --tls-key (SEALSTREAM_TLS_CERT, SEALSTREAM_TLS_KEY), or keep the",
            "API on 127.0.0.1 behind a proxy that terminates TLS.",
        )
    kms = urlsplit(settings.kms_endpoint_url or "")
    if settings.kms_key_id and kms.scheme == "http" and not is_loopback(kms.hostname or ""):
        _warn(
            f"WARNING: KMS at {kms.hostname!r} over plain HTTP, not a loopback address.",
            "Every key the service unwraps, and its record key, cross the network unencrypted.",
            "Give SEALSTREAM_KMS_ENDPOINT_URL an https:// URL.",
        )


def _warn(*lines: str) -> None:
    print("\n".join(["!" * 78, *lines, "!" * 78]), file=sys.stderr, flush=True)


def _announce(settings: Settings, generated_token: SecretStr | None) -> None:
    """Say where the service is and what it uses; every URL without its credentials, and
    the admin token only if it was generated here (a supplied one is never printed)."""
    storage_dir = local_storage_dir(settings)
    if storage_dir is not None:
        storage = f"{storage_dir} (local directory)"
    else:
        storage = without_credentials(settings.storage_url)
        if settings.s3_endpoint_url:
            storage += f" at {without_credentials(settings.s3_endpoint_url)}"
    jobs = (
        f"Redis at {without_credentials(settings.redis_url)}"
        if settings.redis_url
        else "in-process"
    )
    token = (
        generated_token.get_secret_value()
        if generated_token is not None
        else "the one configured (SEALSTREAM_ADMIN_TOKEN)"
    )
    lines = [
        "sealstream is starting",
        f"  URL:          {_base_url(settings)}",
        f"  storage:      {storage}",
        f"  jobs:         {jobs}",
        f"  admin token:  {token}",
        "  try:         curl -H 'Authorization: Bearer <admin token>' "
        f"{_base_url(settings)}/api/key-management/supported-algorithms",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    try:
        CliApp.run(Sealstream, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(error['loc'][-1]).replace('_', '-')}: {error['msg']}" for error in exc.errors()
        )
        _fail(f"invalid options: {problems}", EXIT_USAGE)
    except SettingsError as exc:
        _fail(str(exc), EXIT_USAGE)
