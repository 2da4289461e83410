"""The README and docs/ against the code they describe, so that neither drifts.

The README stays a short user's guide; every link to a repository file (and to a heading
in one) resolves, and every module and function the pages name exists; the configuration
tables name exactly the settings `Settings` has, with its defaults; and every field a
route takes, as the OpenAPI document declares it, is documented on the page for that
route.
"""

import ast
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealstream.server import create_app
from sealstream.settings import Settings
from tests.conftest import local_settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 16_000
# The client command's connection settings, which are not the service's.
CLIENT_VARIABLES = {
    "SEALSTREAM_URL",
    "SEALSTREAM_TOKEN",
    "SEALSTREAM_TOKEN_FILE",
    "SEALSTREAM_TOKEN_COMMAND",
    "SEALSTREAM_CA",
    "SEALSTREAM_KID",
    "SEALSTREAM_PROFILE",
    "SEALSTREAM_CONFIG",
}
PROSE = object()  # a documented default told in words (machine-dependent, or what unset does)

_LINK = re.compile(r"\]\(([^)\s]+)\)")
# A repository path written as code: a top-level folder of ours, down to a module or page.
_PATH = re.compile(
    r"`((?:api|bench|cli|docs|envelope|keystore|sealstream|services|storage|tests|tools|"
    r"workers)/[\w./-]+\.(?:py|md))`"
)
# A module in code, then a name in code: what the module defines.
_DEFINITION = re.compile(r"`((?:[\w]+/)+\w+\.py)` `([A-Za-z_][\w.]*)")
_VARIABLE = re.compile(r"SEALSTREAM_[A-Z0-9_]+")
_UNITS = {
    None: 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "min": 60,
    "h": 3600,
    "days": 86400,
}
_TERM = r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|TiB|min|h|days)?"
_QUANTITY = re.compile(rf"{_TERM}(?:\s+{_TERM})*")


def test_the_readme_stays_short() -> None:
    assert len(README.read_bytes()) < README_LIMIT


# ---- links ----


def _prose(page: Path) -> str:
    """The page without its fenced code blocks, where a `#` line is no heading."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """The anchors of `page`'s headings, slugged as GitHub does (`-1` on a repeated one)."""
    slugs: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(page), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = counts.get(slug, 0)
        counts[slug] = count + 1
        slugs.add(f"{slug}-{count}" if count else slug)
    return slugs


def links(page: Path) -> Iterator[str]:
    """The targets of `page`'s Markdown links that are not URLs."""
    for target in _LINK.findall(_prose(page)):
        if not re.match(r"[a-z][a-z+.-]*:", target):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_to_a_repository_file_resolves(page: Path) -> None:
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_relative_to(ROOT) and linked.exists(), (page.name, target)
        if anchor:
            assert anchor in anchors(linked), (page.name, target)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_module_named_exists(page: Path) -> None:
    for path in _PATH.findall(page.read_text()):
        assert (ROOT / path).exists(), (page.name, path)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_function_named_in_its_module_exists(page: Path) -> None:
    """A module followed by a name (`api/app.py` `make_app`, `keystore/store.py`
    `KeyStore.get`) names a function or class defined there, or a method of that class."""
    for path, name in _DEFINITION.findall(page.read_text()):
        assert name in definitions(ROOT / path), (page.name, path, name)


def definitions(module: Path) -> set[str]:
    """The functions and classes `module` defines at its top level, and their methods as
    `Class.method`."""
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return names


# ---- settings ----


def variable(name: str) -> str:
    return f"SEALSTREAM_{name.upper()}"


def settings_variables() -> dict[str, str]:
    return {variable(name): name for name in Settings.model_fields}


def table(page: Path) -> Iterator[tuple[str, str, str]]:
    """Each setting in `page`'s tables, with its default and meaning cells; a row naming
    two settings (`A` / `B`) gives each its own side of a default like `1 / 2`."""
    for line in page.read_text().splitlines():
        if not line.startswith("| `SEALSTREAM_"):
            continue
        names, default, meaning = (cell.strip() for cell in line.strip("| ").split(" | "))
        variables = [name.strip(" `") for name in names.split(" / ")]
        defaults = default.split(" / ")
        if len(defaults) != len(variables):
            defaults = [default] * len(variables)
        for name, value in zip(variables, defaults, strict=True):
            yield name, value, meaning


def documented(cell: str) -> object:
    """A default as documented: a literal (a number with its unit, a boolean, JSON, or a
    string in code), or PROSE when told in words."""
    code = re.fullmatch(r"`([^`]*)`", cell.strip())
    text = code.group(1) if code else cell.strip()
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("{"):
        return json.loads(text)
    if _QUANTITY.fullmatch(text):
        terms = re.findall(_TERM, text)
        return sum(float(number) * _UNITS[unit or None] for number, unit in terms)
    return text if code else PROSE


def expected_default(name: str) -> object:
    """What the docs must show for the setting `name`: its default, or PROSE for one that
    depends on the machine or is unset."""
    field = Settings.model_fields[name]
    if field.default_factory in (dict, list):
        return field.default_factory()
    if field.default_factory is not None or field.default is None:
        return PROSE
    return field.default


def test_the_configuration_page_names_every_setting_once() -> None:
    names = [name for name, _, _ in table(ROOT / "docs" / "configuration.md")]
    assert len(names) == len(set(names))
    assert set(names) == set(settings_variables())


@pytest.mark.parametrize(
    "page", [README, ROOT / "docs" / "configuration.md"], ids=lambda page: page.name
)
def test_the_documented_defaults_are_the_settings_defaults(page: Path) -> None:
    fields = settings_variables()
    for name, default, meaning in table(page):
        assert name in fields, (page.name, name)
        assert documented(default) == expected_default(fields[name]), (page.name, name, default)
        assert meaning, (page.name, name)


def test_every_setting_says_what_it_does() -> None:
    """`sealstream serve --help` shows these."""
    for name, field in Settings.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_docs_name_only_settings_that_exist(page: Path) -> None:
    known = set(settings_variables()) | CLIENT_VARIABLES
    assert set(_VARIABLE.findall(page.read_text())) <= known, page.name


# ---- request fields ----


def _document() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        document: dict[str, Any] = create_app(local_settings(Path(root))).openapi()
        return document


def _fields(schema: dict[str, Any], schemas: dict[str, Any]) -> Iterator[str]:
    """The property names of `schema` and of every schema within it."""
    if "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    yield from schema.get("properties", {})
    nested = [*schema.get("properties", {}).values(), *schema.get("$defs", {}).values()]
    for key in ("anyOf", "oneOf", "allOf"):
        nested += schema.get(key, [])
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            nested.append(schema[key])
    for inner in nested:
        yield from _fields(inner, schemas)


def request_fields(document: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(method, path, field) for each query parameter and body field a route takes; of a
    form, its parts and the fields of its `metadata`."""
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query":
                    yield method, path, parameter["name"]
            for content in operation.get("requestBody", {}).get("content", {}).values():
                for field in _fields(content["schema"], schemas):
                    yield method, path, field


def test_every_request_field_is_documented() -> None:
    """Each field is named, in code or in quotes (`name`, "name", `?name=`, `name:`), on
    the page for its route."""
    pages = {page.name: page.read_text() for page in DOCS}
    missing = []
    for method, path, field in request_fields(_document()):
        page = "jobs.md" if path.startswith("/api/jobs") else "api.md"
        if not re.search(rf"[`\"?&]{re.escape(field)}[`\"=:?]", pages[page]):
            missing.append((page, method, path, field))
    assert not missing
