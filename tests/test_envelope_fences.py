"""Operations that are unsafe outside their module, fenced in by name and by capability.

A frame's decryption releases plaintext before its tag has verified, and re-sealing a
frame's ciphertext as the final frame tags whatever it is given, a second time under its
IV if it was tagged before. `envelope/frames.py` does either only to what a tag vouched
for or what it sealed itself, so nothing else may name them. Nor may any other shipped
module hold AES-GCM, with which it could do both: only those that wrap keys under keys of
their own do. A message's reader gets a cipher that opens and checks, and nothing else.
"""

import ast
import os
from pathlib import Path

from envelope import AesKeyring, open_message
from envelope.message import new_message
from tests.support.project import REPO, wheel_packages

FENCED = ("_decrypt_unauthenticated", "_reseal_final")
ITS_MODULE = REPO / "envelope" / "frames.py"
THIS_MODULE = Path(__file__).resolve()  # names them too, as the strings it looks for

# The shipped modules that may hold AES-GCM, and what each seals or opens with it.
MAY_HOLD_AES_GCM = {
    "envelope/frames.py": "the frames and the header tag of a message, under its own key",
    "envelope/keyrings/aes.py": "data keys, wrapped under a key version",
    "envelope/keyrings/mlkem.py": "data keys, wrapped under a fresh shared secret",
    "keystore/kek.py": "key material, wrapped under the KEK",
}
# Where `cryptography` keeps its symmetric ciphers, AES-GCM among them.
CIPHER_MODULES = ("cryptography.hazmat.primitives.ciphers", "cryptography.hazmat.bindings")
AES_GCM_NAMES = {"AESGCM", "GCM", "Cipher"}
CONTEXT_CALLS = {"decryptor", "encryptor"}  # start an incremental cipher, tag unchecked


def python_files() -> list[Path]:
    """Every Python file of the repository, tests and tools included; not the virtualenv
    or any other hidden directory."""
    return [
        path
        for path in sorted(REPO.rglob("*.py"))
        if not any(part.startswith(".") for part in path.relative_to(REPO).parts)
    ]


def shipped_files() -> list[Path]:
    return [path for package in wheel_packages() for path in sorted((REPO / package).rglob("*.py"))]


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


def fenced_names_in(path: Path) -> set[str]:
    """The fenced names a module uses, under any number of leading underscores, so that
    a public twin of one is fenced too."""
    return {name for name in names_in(path) if name.lstrip("_") in {f.lstrip("_") for f in FENCED}}


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module a module imports, and every name it imports from one, dotted."""
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def aes_gcm_in(path: Path) -> set[str]:
    """What in a module reaches AES-GCM: an import from where `cryptography` keeps its
    ciphers, a name of AES-GCM (as a string too, which `getattr` could use), or a call
    that starts a cipher context."""
    tree = ast.parse(path.read_text(), str(path))
    found = {
        f"import {module}"
        for module in imported_modules(tree)
        if any(module == prefix or module.startswith(prefix + ".") for prefix in CIPHER_MODULES)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in CONTEXT_CALLS:
                found.add(f".{node.func.attr}()")
        elif isinstance(node, ast.Name) and node.id in AES_GCM_NAMES:
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in AES_GCM_NAMES:
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and node.value in AES_GCM_NAMES:
            found.add(repr(node.value))
    return found


def public_names(value: object) -> set[str]:
    return {name for name in dir(value) if not name.startswith("_")}


def test_the_unsafe_operations_are_named_only_in_their_module() -> None:
    assert fenced_names_in(ITS_MODULE) == set(FENCED)  # else this test would guard nothing
    outside = [path for path in python_files() if path not in (ITS_MODULE, THIS_MODULE)]
    assert REPO / "envelope" / "decrypt.py" in outside
    assert REPO / "tests" / "test_envelope_roundtrip.py" in outside
    named = {str(path.relative_to(REPO)): fenced_names_in(path) for path in outside}
    assert {path: names for path, names in named.items() if names} == {}


def test_only_the_modules_that_wrap_keys_hold_aes_gcm() -> None:
    """Anything else that held it could decrypt a frame without checking its tag, or tag
    one a second time under its IV."""
    assert {".decryptor()", ".encryptor()", "GCM"} <= aes_gcm_in(ITS_MODULE)
    held = {str(path.relative_to(REPO)): aes_gcm_in(path) for path in shipped_files()}
    assert "services/open_stored.py" in held
    assert sorted(path for path, found in held.items() if found) == sorted(MAY_HOLD_AES_GCM)


def test_a_reader_can_open_but_neither_seal_nor_tag() -> None:
    """Were the reader's cipher able to seal, it could tag a forged frame's ciphertext
    anew and open it; or tag a second header or frame under an IV already used."""
    keyring = AesKeyring("fence#1", os.urandom(32))
    header, sealer = new_message([keyring], {}, 4096)
    opener = open_message(header, [keyring]).cipher

    assert public_names(opener) == {"verify_header_tag", "open", "begin_opening"}
    assert public_names(sealer) == {"header_tag", "seal", "begin_regular"}
