"""The client imports none of the server: `sealstream_client` (sync and asyncio) loads in a
fresh interpreter without the web framework, the job queue, the AWS SDK, the command
line's libraries or any of the service's own packages (it may use `envelope`, and nothing
else of ours); `cli.main`, the command line, loads none of the server either, nor, since
they cost its start-up, pydantic (which only a call answering JSON needs) or asyncio,
nor any command's module but the one of the command run."""

import json
import subprocess
import sys

import click
import pytest

from cli.commands import COMMANDS
from cli.main import command_line

SERVER_STACK = ("fastapi", "starlette", "celery", "boto3", "botocore", "uvicorn")
SERVICE_PACKAGES = ("api", "workers", "services", "sealstream", "keystore", "storage", "audit")
COMMAND_LINE = ("cli", "click", "rich")
START_UP = ("pydantic", "asyncio")
# Each command's module loads when that command runs: `sealstream encrypt` only crypto's.
OTHER_COMMANDS = tuple(
    f"cli.commands.{name}"
    for name in ("archives", "jobs", "keys", "objects", "signatures", "tokens")
)


def loaded(modules: tuple[str, ...], unwanted: tuple[str, ...]) -> list[str]:
    """Which of `unwanted` importing `modules` in a fresh interpreter loads."""
    probe = "\n".join(
        [
            "import importlib, json, sys",
            *(f"importlib.import_module({module!r})" for module in modules),
            f"print(json.dumps([name for name in {unwanted!r} if name in sys.modules]))",
        ]
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    result: list[str] = json.loads(run.stdout)
    return result


@pytest.mark.parametrize(
    ("modules", "unwanted"),
    [
        (
            ("sealstream_client", "sealstream_client.aio"),
            SERVER_STACK + SERVICE_PACKAGES + COMMAND_LINE,
        ),
        (("cli.main",), SERVER_STACK + SERVICE_PACKAGES + START_UP + ("cli.commands.crypto",)),
        (("cli.main", "cli.commands.crypto"), OTHER_COMMANDS),
    ],
)
def test_importing_the_client_loads_nothing_of_the_server(
    modules: tuple[str, ...], unwanted: tuple[str, ...]
) -> None:
    assert loaded(modules, unwanted) == []


def test_every_command_is_found_by_its_name() -> None:
    root = command_line()
    context = click.Context(root)
    for name in COMMANDS:
        command = root.get_command(context, name)
        assert command is not None and command.name == name, name
