"""A batch-encrypt job's manifest, written as a stream: a JSON object whose lists are
encoded an item at a time, so a job of a million members never holds their list."""

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_object(fields: dict[str, Any], lists: dict[str, Iterable[Any]]) -> Iterator[bytes]:
    """A JSON object of `fields` then `lists`, each list encoded an item at a time."""
    members = [_member(name, json.dumps(value)) for name, value in fields.items()]
    yield ("{\n" + ",\n".join(members)).encode()
    for name, items in lists.items():
        yield (",\n" + _member(name, "[")).encode()
        separator = "\n"
        for item in items:
            yield (separator + json.dumps(item)).encode()
            separator = ",\n"
        yield b"\n]"
    yield b"\n}\n"


def _member(name: str, value: str) -> str:
    return f"{json.dumps(name)}: {value}"
