"""docs/client.md's interop section runs as written: its shell blocks (the `sealstream`
command) and Python blocks (the `aws-encryption-sdk` package), in order, in one directory,
against a live API server."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, Api
from tests.support.project import REPO

PAGE = REPO / "docs" / "client.md"
SECTION = "## Interop with the AWS Encryption SDK"
_BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def interop_blocks() -> list[tuple[str, str]]:
    text = PAGE.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    return [(match.group(1), match.group(2)) for match in _BLOCK.finditer(section)]


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_the_interop_section_runs_as_written(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = interop_blocks()
    assert [kind for kind, _ in blocks].count("python") >= 2
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("SEALSTREAM")},
        "SEALSTREAM_URL": api.url,
        "SEALSTREAM_TOKEN": ADMIN_TOKEN,
        "SEALSTREAM_CONFIG": str(tmp_path / "no-config.toml"),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
    }
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for kind, code in blocks:
        if kind == "sh":
            run = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, (code, run.stdout, run.stderr)
        else:
            exec(compile(code, str(PAGE), "exec"), namespace)
