"""What is shipped: every package of the repository is one the wheel ships, as declared in
pyproject.toml (which the tests that search the shipped code read their list from), and
the image copies each of them."""

from tests.support.project import REPO, wheel_packages

NOT_SHIPPED = {"tests"}  # tools/ and bench/ are scripts, not packages


def test_every_package_of_the_repository_is_shipped() -> None:
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert "services" in packages  # else the glob found nothing of ours
    assert sorted(packages - NOT_SHIPPED) == sorted(wheel_packages())


def copied_into_image() -> set[str]:
    """What the Dockerfile's COPY lines take from the build context."""
    sources: set[str] = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            sources.update(word.rstrip("/") for word in words[1:-1] if not word.startswith("--"))
    return sources


def test_the_image_copies_every_package_the_wheel_ships() -> None:
    """`pip install .` in the image builds the wheel from what was copied in: a package
    left out would be missing from the image, and the service would not start."""
    copied = copied_into_image()
    assert "pyproject.toml" in copied  # else this read no COPY line
    assert [package for package in wheel_packages() if package not in copied] == []
