"""The README's quick start runs as written: its `sealstream` commands one by one, in
order, from the directory where `sealstream serve` runs on its embedded default (as
`make dev` runs it), with the dev token the server keeps there; then its curl requests,
with the token exported as the README says, against the same server.

A `<name>` in a command is what the commands before it printed as `name` (the README says
so); the test fills it in from their output, so a field that is not printed fails too.
"""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from tests.support.project import REPO
from tests.support.services import ServeProcess, sealstream_serve

README = REPO / "README.md"
SECTION = "## Quick start"
DOCUMENTED_URL = "http://127.0.0.1:8080"
_SHELL = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_INDENTED = re.compile(r"(?:^    .*\n|^\n)+", re.MULTILINE)
_EXPORT = re.compile(r"`(export TOKEN=[^`]+)`")
_PLACEHOLDER = re.compile(r"<(\w+)>")
_FIELD = re.compile(r"^(\w+) {2,}(\S+(?: \S+)*)$", re.MULTILINE)


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index(SECTION) :]
    return section[: section.find("\n## ", len(SECTION))]


def cli_commands(section: str) -> list[str]:
    """The lines of the section's one `sh` block that are commands (not comments)."""
    (block,) = _SHELL.findall(section)
    lines = (line.strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def curl_blocks(section: str) -> list[str]:
    """The section's indented code blocks, as shell scripts."""
    blocks = _INDENTED.findall(section)
    return [re.sub(r"^    ", "", block, flags=re.MULTILINE) for block in blocks if block.strip()]


def printed_fields(output: str) -> dict[str, str]:
    """The `name  value` lines a command printed (a table's lines have more columns)."""
    return dict(_FIELD.findall(output))


def filled(command: str, fields: dict[str, str]) -> str:
    """`command` with each `<name>` as the field `name` printed before it."""
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], command)


def shell(
    command: str, served: ServeProcess, cwd: Path, env: dict[str, str]
) -> "subprocess.CompletedProcess[str]":
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command.replace(DOCUMENTED_URL, served.url)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, (command, run.stdout, run.stderr)
    return run


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    section = quick_start()
    commands = cli_commands(section)
    assert len(commands) >= 10 and all(line.startswith("sealstream ") for line in commands)
    work = tmp_path / "project"
    work.mkdir()
    plaintext = os.urandom(3 * 1024 * 1024 + 17)  # several frames and a short last one
    (work / "big.bin").write_bytes(plaintext)
    (work / "largeFile.bin").write_bytes(plaintext[: 2 * 1024 * 1024])
    environ = {
        **{name: value for name, value in os.environ.items() if not name.startswith("SEALSTREAM")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "SEALSTREAM_CONFIG": str(tmp_path / "no-config.toml"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    with sealstream_serve(work, {}) as served:
        # The test's server listens on a free port, not the default the command falls back
        # on; so it names the URL, and the dev token by its file as that fallback reads it.
        env = environ | {
            "SEALSTREAM_URL": served.url,
            "SEALSTREAM_TOKEN_FILE": ".sealstream/dev-token",
        }
        fields: dict[str, str] = {}
        outputs: list[str] = []
        for command in commands:
            run = shell(filled(command, fields), served, work, env)
            fields |= printed_fields(run.stdout)
            outputs.append(run.stdout + run.stderr)
        for script in curl_blocks(section):
            (export,) = _EXPORT.findall(section)
            shell(f"{export}\n{script}", served, work, environ)

    assert (work / "big.out").read_bytes() == plaintext
    assert (work / "copy.bin").read_bytes() == plaintext
    assert (work / "tail.bin").read_bytes() == plaintext[-100:]
    assert (work / "largeFile.dec").read_bytes() == plaintext[: 2 * 1024 * 1024]
    said = "\n".join(outputs)
    assert "succeeded" in said  # the watched verify job
    assert "upload" in said and "/api/uploads/" in said  # the resumable upload's path
    assert "reports/big.bin" in said and "backups/big.bin" in said  # listed objects
    assert "revokedAt" in said
    # The new token went only to its owner-only file.
    token_file = work / "acme.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() not in said
