"""Command-line options made from a pydantic model, for the server's commands: one
`--kebab-name` option per field, its help the field's description, its default and its
`SEALSTREAM_*` variable; a value given on the command line wins over the variable.

Only the values given on the command line are handed to the model: the others come from
the model's own sources (the environment) and defaults, so that `--help` and the model
never disagree on what a default is.
"""

import json
import types
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cli.exits import EXIT_USAGE, CommandFailed

M = TypeVar("M", bound=BaseModel)


class _Json(click.ParamType[Any]):
    """A value written as JSON (a mapping or a list)."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            self.fail(f"not JSON: {value!r}", param, ctx)


def model_options(model: type[BaseModel], env_prefix: str) -> list[click.Parameter]:
    """An option for each field of `model`."""
    return [_option(name, field, env_prefix) for name, field in model.model_fields.items()]


def build_model(model: type[M], values: dict[str, Any]) -> M:
    """`model` from the options given (those left None were not given); bad values are a
    usage error naming each option."""
    given = {name: value for name, value in values.items() if value is not None}
    try:
        return model(**given)
    except ValidationError as exc:
        problems = "; ".join(_problem(error["loc"], error["msg"]) for error in exc.errors())
        raise CommandFailed(f"invalid options: {problems}", EXIT_USAGE) from None


def _problem(location: tuple[int | str, ...], message: str) -> str:
    if not location:
        return message
    return f"--{str(location[0]).replace('_', '-')}: {message}"


def _option(name: str, field: FieldInfo, env_prefix: str) -> click.Option:
    kind = _without_none(field.annotation)
    variable = f"{env_prefix}{name.upper()}"
    default = _shown_default(field)
    help_text = " ".join(
        part
        for part in (
            field.description or "",
            f"[default: {default}]" if default else "",
            f"[env: {variable}]",
        )
        if part
    )
    return click.Option(
        [f"--{name.replace('_', '-')}", name],
        type=_click_type(kind),
        default=None,
        help=help_text,
    )


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


_SCALARS: dict[Any, click.ParamType[Any]] = {
    bool: click.BOOL,
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    SecretStr: click.STRING,
    Path: click.Path(),
}


def _click_type(kind: Any) -> click.ParamType[Any]:
    if kind in _SCALARS:
        return _SCALARS[kind]
    if get_origin(kind) is Literal:
        return click.Choice([str(arg) for arg in get_args(kind)])
    if isinstance(kind, type) and issubclass(kind, Enum):
        return click.Choice([str(member.value) for member in kind])
    return _Json()


def _shown_default(field: FieldInfo) -> str:
    """The default as `--help` shows it; nothing for None, secrets, or a default that is
    worked out at start (the description says how)."""
    if field.default is PydanticUndefined or field.default is None:
        return ""
    default = field.default
    if isinstance(default, Enum):
        default = default.value
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)
