"""Where a client command connects, and as whom: the command line, then `SEALSTREAM_*`
variables, then a profile of the configuration file, then the defaults.

The file (`~/.config/sealstream/config.toml`, or `$SEALSTREAM_CONFIG`) holds one table
per profile; `--profile` or `SEALSTREAM_PROFILE` picks one (else `default`):

    [default]
    url = "https://sealstream.example.com"
    token_command = "pass show sealstream/admin"
    ca = "/etc/ssl/our-ca.pem"
    kid = "mySymKey"

The token comes from the first source that names one, in that order: `token` itself,
`token_file` (a file holding it) or `token_command` (a command printing it, run without a
shell). With none anywhere, and the local default URL, the token `sealstream serve` keeps
in `.sealstream/dev-token` for the embedded default is used.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from cli.exits import EXIT_USAGE, CommandFailed

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_PROFILE = "default"
DEV_TOKEN = Path(".sealstream") / "dev-token"  # what `make dev` keeps, from where it runs
TOKEN_COMMAND_TIMEOUT = 60.0  # seconds a token command may take


@dataclass(frozen=True)
class Profile:
    """What one source says about the connection; None where it says nothing."""

    url: str | None = None
    token: str | None = None
    token_file: str | None = None
    token_command: str | None = None
    ca: str | None = None  # a CA bundle (PEM) to check the server's certificate with
    kid: str | None = None  # the key `encrypt` uses when given none

    def names_a_token(self) -> bool:
        return any((self.token, self.token_file, self.token_command))

    def over(self, below: "Profile") -> "Profile":
        """This profile, with what it leaves unsaid taken from `below`. The token sources
        go together: the first source that names one names the only one."""
        merged = {
            field.name: getattr(self, field.name) or getattr(below, field.name)
            for field in fields(self)
        }
        if self.names_a_token():
            merged |= {
                "token": self.token,
                "token_file": self.token_file,
                "token_command": self.token_command,
            }
        return Profile(**merged)


@dataclass(frozen=True)
class Connection:
    """Where to connect, the token to present, and the profile's defaults."""

    url: str
    token: str | None
    ca: str | None
    kid: str | None


def config_file(environ: Mapping[str, str]) -> Path:
    if environ.get("SEALSTREAM_CONFIG"):
        return Path(environ["SEALSTREAM_CONFIG"]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "sealstream" / "config.toml"


def from_environment(environ: Mapping[str, str]) -> Profile:
    values = {
        field.name: environ.get(f"SEALSTREAM_{field.name.upper()}") for field in fields(Profile)
    }
    return Profile(**{name: value or None for name, value in values.items()})


def load_profile(name: str | None, environ: Mapping[str, str]) -> Profile:
    """The profile `name` (else `SEALSTREAM_PROFILE`, else `default`) of the configuration
    file. A missing file or default profile is an empty profile; a profile asked for by
    name must exist."""
    chosen = name or environ.get("SEALSTREAM_PROFILE") or DEFAULT_PROFILE
    path = config_file(environ)
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandFailed(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    document = _parsed(path, text) if text else {}
    table = document.get(chosen)
    if table is None:
        if chosen != DEFAULT_PROFILE:
            raise CommandFailed(f"no profile {chosen!r} in {path}", EXIT_USAGE)
        return Profile()
    known = {field.name for field in fields(Profile)}
    if not isinstance(table, dict) or not set(table) <= known:
        unknown = sorted(set(table) - known) if isinstance(table, dict) else []
        raise CommandFailed(
            f"profile {chosen!r} in {path}: unknown settings {unknown} (known: {sorted(known)})",
            EXIT_USAGE,
        )
    if not all(isinstance(value, str) for value in table.values()):
        raise CommandFailed(f"profile {chosen!r} in {path}: every value is a string", EXIT_USAGE)
    return Profile(**table)


def _parsed(path: Path, text: str) -> dict[str, object]:
    import tomllib  # here: a run with no configuration file need not load the parser

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CommandFailed(f"cannot read {path}: {exc}", EXIT_USAGE) from None


def resolve(given: Profile, profile: str | None, environ: Mapping[str, str]) -> Connection:
    """The connection the command line (`given`), the environment and the profile say."""
    merged = given.over(from_environment(environ)).over(load_profile(profile, environ))
    url = merged.url or DEFAULT_URL
    token = _token(merged)
    if token is None and url == DEFAULT_URL and DEV_TOKEN.is_file():
        token = _read_token_file(str(DEV_TOKEN))
    return Connection(url=url, token=token, ca=merged.ca, kid=merged.kid)


def _token(profile: Profile) -> str | None:
    if profile.token:
        return profile.token
    if profile.token_file:
        return _read_token_file(profile.token_file)
    if profile.token_command:
        return _run_token_command(profile.token_command)
    return None


def _read_token_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise CommandFailed(
            f"cannot read the token file {path}: {exc.strerror}", EXIT_USAGE
        ) from None


def _run_token_command(command: str) -> str:
    import shlex  # here: most runs need neither, and every run pays for imports
    import subprocess

    try:
        run = subprocess.run(  # noqa: S603 - the user's own command, split without a shell
            shlex.split(command),
            capture_output=True,
            text=True,
            timeout=TOKEN_COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed(f"the token command failed: {exc}", EXIT_USAGE) from None
    if run.returncode != 0:
        raise CommandFailed(
            f"the token command exited with {run.returncode}: {run.stderr.strip()[:200]}",
            EXIT_USAGE,
        )
    return run.stdout.strip()
