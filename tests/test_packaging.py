"""What is shipped: every package of the repository is one the wheel ships, as declared in
pyproject.toml, which the tests that search the shipped code read their list from."""

from tests.support.project import REPO, wheel_packages

NOT_SHIPPED = {"tests"}  # tools/ and bench/ are scripts, not packages


def test_every_package_of_the_repository_is_shipped() -> None:
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert "services" in packages  # else the glob found nothing of ours
    assert sorted(packages - NOT_SHIPPED) == sorted(wheel_packages())
