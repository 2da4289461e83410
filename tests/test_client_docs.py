"""docs/client.md's Python client section runs as written: its Python blocks, in order,
in one namespace and one directory, against a live API server."""

import re
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, Api
from tests.support.project import REPO

PAGE = REPO / "docs" / "client.md"
SECTION = "## The Python client"
_PYTHON = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[str]:
    text = PAGE.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    return _PYTHON.findall(section)


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_the_python_client_section_runs_as_written(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 3
    monkeypatch.setenv("SEALSTREAM_URL", api.url)
    monkeypatch.setenv("SEALSTREAM_TOKEN", ADMIN_TOKEN)
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []  # what the blocks print (the server in this process prints too)

    def printed(*values: object) -> None:
        lines.append(" ".join(str(value) for value in values))

    namespace: dict[str, object] = {"__name__": "docs", "print": printed}
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), namespace)
    # What the comments beside the prints say they print
    assert lines[0] == "docsKey enabled 1"
    assert lines[1].startswith("docsKey#1 3145728 3146")
    assert "404 key-not-found" in lines
    assert "malformed-message" in lines
    assert "docsKey#1 4194304" in lines
