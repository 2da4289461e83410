"""`sealstream` commands. `sealstream serve` runs the API; its options are the settings."""

import secrets
import sys

import uvicorn
from pydantic import SecretStr
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from api import create_app
from sealstream.settings import Settings
from sealstream.wiring import local_storage_dir


class Serve(Settings):
    """Run the API. With no configuration: local storage in ./.sealstream, jobs in-process,
    a KEK generated beside the data, and a fresh admin token printed."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_", cli_kebab_case=True, extra="ignore")

    def cli_cmd(self) -> None:
        settings = self
        if settings.admin_token is None:
            settings = self.model_copy(update={"admin_token": SecretStr(secrets.token_urlsafe(32))})
        app = create_app(settings)
        _announce(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


class Sealstream(BaseSettings):
    """sealstream: streaming envelope encryption."""

    model_config = SettingsConfigDict(cli_prog_name="sealstream", cli_kebab_case=True)

    serve: CliSubCommand[Serve]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def _announce(settings: Settings) -> None:
    storage_dir = local_storage_dir(settings)
    storage = f"{storage_dir} (local directory)" if storage_dir else settings.storage_url
    assert settings.admin_token is not None
    jobs = f"Redis at {settings.redis_url}" if settings.redis_url else "in-process"
    lines = [
        "sealstream is starting",
        f"  URL:          http://{settings.host}:{settings.port}",
        f"  storage:      {storage}",
        f"  jobs:         {jobs}",
        f"  admin token:  {settings.admin_token.get_secret_value()}",
        "  try:         curl -H 'Authorization: Bearer <admin token>' "
        f"http://{settings.host}:{settings.port}/api/key-management/supported-algorithms",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    CliApp.run(Sealstream, cli_args=sys.argv[1:] if argv is None else argv)
