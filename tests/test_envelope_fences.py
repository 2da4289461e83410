"""Operations that are unsafe outside their module, fenced in by name.

A frame's decryption releases plaintext before its tag has verified; `envelope/frames.py`
hands out only what a tag vouched for, so nothing else may reach that decryption.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCED = "_decrypt_unauthenticated"
ITS_MODULE = ROOT / "envelope" / "frames.py"
THIS_MODULE = Path(__file__).resolve()  # names it too, as the string it looks for


def python_files() -> list[Path]:
    """Every Python file of the repository, tests and tools included; not the virtualenv
    or any other hidden directory."""
    return [
        path
        for path in sorted(ROOT.rglob("*.py"))
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    ]


def names_in(path: Path) -> set[str]:
    """Every name a module's code uses (variables, attributes, imported and defined
    names) and every string it holds, which `getattr` could name something with."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.rpartition(".")[2])
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
    return names


def test_unauthenticated_decryption_is_named_only_in_its_module() -> None:
    assert FENCED in names_in(ITS_MODULE)  # else this test would guard nothing
    outside = [path for path in python_files() if path not in (ITS_MODULE, THIS_MODULE)]
    assert ROOT / "envelope" / "decrypt.py" in outside
    assert ROOT / "tests" / "test_envelope_roundtrip.py" in outside
    assert [str(path.relative_to(ROOT)) for path in outside if FENCED in names_in(path)] == []
