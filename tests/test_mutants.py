"""The mutants of `make mutants` still name lines the project has: a guard that moved or
changed would otherwise leave its mutant unable to run, and nothing watching it."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mutants_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MUTANTS = _mutants_module().MUTANTS


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_edits_a_line_its_file_has_once(mutant: Any) -> None:
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.original) == 1
    compile(text.replace(mutant.original, mutant.mutated), mutant.path, "exec")
