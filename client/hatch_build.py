"""Takes the repository's client packages into the build: from the repository, they lie
beside this directory; in an unpacked sdist, where a wheel is built from, they are
already inside it. An editable install takes nothing: it imports them from the
repository (`dev-mode-dirs`), and copies would shadow the code being edited."""

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGES = ("sealstream_client", "envelope")


class RepositoryPackages(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        root = Path(self.root)
        for package in PACKAGES:
            if not (root / package).is_dir():
                build_data["force_include"][str(root.parent / package)] = package
