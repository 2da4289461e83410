"""The project's own layout, as pyproject.toml declares it: the packages the wheel ships."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def wheel_packages() -> list[str]:
    """The top-level packages the wheel ships (`[tool.hatch.build.targets.wheel]`): the
    code the service runs."""
    with (REPO / "pyproject.toml").open("rb") as file:
        pyproject = tomllib.load(file)
    packages: list[str] = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return packages
