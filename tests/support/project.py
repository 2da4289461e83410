"""The project's own layout, as its two pyproject.toml files declare it: the packages each
distribution's wheel ships (`sealstream`, the service; `sealstream-client`, from client/)."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
SERVICE_PROJECT = REPO / "pyproject.toml"
CLIENT_PROJECT = REPO / "client" / "pyproject.toml"


def distribution_packages(pyproject: Path) -> list[str]:
    """The top-level packages one distribution's wheel ships
    (`[tool.hatch.build.targets.wheel]`)."""
    with pyproject.open("rb") as file:
        project = tomllib.load(file)
    packages: list[str] = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return packages


def wheel_packages() -> list[str]:
    """The top-level packages the two wheels ship: all the code the project runs."""
    return distribution_packages(SERVICE_PROJECT) + distribution_packages(CLIENT_PROJECT)
