"""What every client command shares: the options that say where the API is and as whom to
call it (cli.config resolves them), how the result is shown (a summary, or `--json`), and
how a failure becomes a message and an exit status (cli.exits)."""

import functools
import json
import os
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import click

from cli.config import Connection, Profile, resolve
from cli.exits import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_USAGE,
    CommandFailed,
    exit_code_of_status,
)
from sealstream_client import (
    ApiError,
    ClientError,
    SealstreamClient,
    SourceChanged,
    TransferAborted,
)

Command = Callable[..., None]
Row = Mapping[str, Any]


class Session:
    """One client command's run: its connection, and how it shows what it did."""

    def __init__(self, given: Profile, profile: str | None, *, json: bool, quiet: bool) -> None:
        self._given = given
        self._profile = profile
        self.json = json
        self.quiet = quiet

    @functools.cached_property
    def connection(self) -> Connection:
        return resolve(self._given, self._profile, os.environ)

    @functools.cached_property
    def client(self) -> SealstreamClient:
        connection = self.connection
        if connection.token is None:
            raise CommandFailed(
                "no token: pass --token, --token-file or --token-command, set "
                "SEALSTREAM_TOKEN, or name one in a profile",
                EXIT_USAGE,
            )
        try:
            context = (
                None if connection.ca is None else ssl.create_default_context(cafile=connection.ca)
            )
            return SealstreamClient(connection.url, connection.token, ssl_context=context)
        except (ValueError, OSError, ssl.SSLError) as exc:
            raise CommandFailed(str(exc), EXIT_USAGE) from None

    def kid(self, given: str | None) -> str:
        """The key a command names, else its profile's default."""
        kid = given or self.connection.kid
        if kid is None:
            raise CommandFailed("no key: pass --kid, or set kid in the profile", EXIT_USAGE)
        return kid

    def show(self, document: Mapping[str, Any], summary: Callable[[], None]) -> None:
        """`document` as JSON with `--json`, else the human `summary`."""
        if self.json:
            print_json(document)
        else:
            summary()

    def show_page(
        self,
        page: Mapping[str, Any],
        items: str,
        columns: Sequence[str],
        rows: Sequence[Row] | None = None,
    ) -> None:
        """A page of a listing: `--json` as it came, else its `items` (or the `rows` made
        of them) as a table, and where the next page starts."""

        def table() -> None:
            print_table(page[items] if rows is None else rows, columns, f"no {items}")
            if page.get("next"):
                self.note(f"more: --after {page['next']}")

        self.show(page, table)

    def note(self, message: str) -> None:
        """A line for the person at the terminal (stderr), unless `--quiet`."""
        if not self.quiet:
            click.echo(message, err=True)


def print_json(document: object) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


@contextmanager
def secret_file(path: str) -> Iterator[TextIO]:
    """A new file at `path` that only its owner can read, for a secret that should not
    go through a terminal: never an existing file (nor a link), and removed again if the
    command fails before the secret is written whole."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise CommandFailed(f"cannot create {path}: {exc.strerror}", EXIT_USAGE) from None
    try:
        with os.fdopen(descriptor, "w") as file:
            yield file
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def print_fields(document: Mapping[str, Any], names: Sequence[str]) -> None:
    """Named fields of `document`, one per line, values aligned."""
    present = [name for name in names if document.get(name) not in (None, "", [], {})]
    width = max((len(name) for name in present), default=0)
    for name in present:
        click.echo(f"{name.ljust(width)}  {_cell(document[name])}")


def print_table(rows: Sequence[Row], columns: Sequence[str], empty: str) -> None:
    """`rows` as a table of `columns`, padded to line up; `empty` when there are none."""
    if not rows:
        click.echo(empty)
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    for line in [list(columns), *cells]:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@contextmanager
def reporting() -> Iterator[None]:
    """A failure of the API or of the connection as a command failure: the problem's code
    and detail, and the exit status its HTTP status stands for."""
    try:
        yield
    except ApiError as exc:
        raise CommandFailed(
            f"{exc.code}: {exc.detail} (HTTP {exc.status})", exit_code_of_status(exc.status)
        ) from None
    except TransferAborted as exc:
        raise CommandFailed(f"transfer aborted: {exc.reason}", EXIT_ABORTED) from None
    except (ClientError, SourceChanged, OSError) as exc:
        raise CommandFailed(str(exc), EXIT_FAILED) from None


_OPTIONS = [
    click.option(
        "--profile", help="the profile of the configuration file to use [env: SEALSTREAM_PROFILE]"
    ),
    click.option("--url", help="the API's base URL [env: SEALSTREAM_URL]"),
    click.option("--token", help="the bearer token [env: SEALSTREAM_TOKEN]"),
    click.option("--token-file", help="a file holding the token [env: SEALSTREAM_TOKEN_FILE]"),
    click.option(
        "--token-command",
        help="a command that prints the token [env: SEALSTREAM_TOKEN_COMMAND]",
    ),
    click.option(
        "--ca", help="a CA bundle (PEM) to check the server's certificate with [env: SEALSTREAM_CA]"
    ),
    click.option("--json", "as_json", is_flag=True, help="print the result as JSON, for scripts"),
    click.option("--quiet", "-q", is_flag=True, help="no progress and no notes on stderr"),
]


def client_command(command: Callable[..., None]) -> Command:
    """`command(session, **options)` as a click callback with the options every client
    command takes; failures of the API become command failures."""

    @functools.wraps(command)
    def run(
        *,
        profile: str | None,
        url: str | None,
        token: str | None,
        token_file: str | None,
        token_command: str | None,
        ca: str | None,
        as_json: bool,
        quiet: bool,
        **options: Any,
    ) -> None:
        given = Profile(
            url=url, token=token, token_file=token_file, token_command=token_command, ca=ca
        )
        session = Session(given, profile, json=as_json, quiet=quiet)
        with reporting():
            command(session, **options)

    for option in reversed(_OPTIONS):
        run = option(run)
    return run
