"""What is shipped: every package of the repository is one that exactly one of the two
wheels ships (the service's, and the client's built from client/), as the pyproject.toml
files declare (the tests that search the shipped code read their list from them); the
service depends on the client distribution of its own version; and the image copies and
installs both."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.project import (
    CLIENT_PROJECT,
    REPO,
    SERVICE_PROJECT,
    distribution_packages,
    wheel_packages,
)

NOT_SHIPPED = {"tests"}  # tools/ and bench/ are scripts, not packages


def test_every_package_of_the_repository_is_shipped_once() -> None:
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert {"services", "sealstream_client", "envelope"} <= packages  # the glob found ours
    assert sorted(packages - NOT_SHIPPED) == sorted(wheel_packages())
    assert len(wheel_packages()) == len(set(wheel_packages()))


def test_the_service_depends_on_the_client_of_its_own_version() -> None:
    with SERVICE_PROJECT.open("rb") as file:
        service = tomllib.load(file)["project"]
    with CLIENT_PROJECT.open("rb") as file:
        client = tomllib.load(file)["project"]
    assert f"{client['name']}=={client['version']}" in service["dependencies"]
    assert service["version"] == client["version"]


def test_the_packages_are_imported_from_the_repository(tmp_path: Path) -> None:
    """In the editable install the tests and the servers they start run in, every package
    is the repository's own, also for a process started elsewhere (as the `sealstream`
    command is): a copy in site-packages (as a build hook that forced them into an
    editable wheel left) would shadow the code being edited and tested."""
    probe = "import importlib, json, sys; print(json.dumps("
    probe += "[importlib.import_module(name).__file__ for name in sys.argv[1:]]))"
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", probe, *wheel_packages()],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    places = {
        name: Path(file).resolve().parent
        for name, file in zip(wheel_packages(), json.loads(run.stdout), strict=True)
    }
    assert {name: place for name, place in places.items() if place != REPO / name} == {}


def copied_into_image() -> set[str]:
    """What the Dockerfile's COPY lines take from the build context."""
    sources: set[str] = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            sources.update(word.rstrip("/") for word in words[1:-1] if not word.startswith("--"))
    return sources


def test_the_image_copies_every_package_the_wheels_ship() -> None:
    """`pip install ./client .` in the image builds the wheels from what was copied in: a
    package left out would be missing from the image, and the service would not start."""
    copied = copied_into_image()
    assert {"pyproject.toml", "client"} <= copied  # else this read no COPY line
    assert [package for package in wheel_packages() if package not in copied] == []
    assert "pip install ./client ." in (REPO / "Dockerfile").read_text()
    assert distribution_packages(CLIENT_PROJECT)  # the client's are among those checked
