"""Operations that are unsafe outside their module, fenced in by name and by lint.

A frame's decryption releases plaintext before its tag has verified, and re-sealing a
frame's ciphertext as the final frame tags whatever it is given, a second time under its
IV if it was tagged before. `envelope/frames.py` does either only to what a tag vouched
for or what it sealed itself, so nothing else may name them. Nor may any other shipped
module hold AES-GCM, with which it could do both, under any name it imports it as: only
those that wrap keys under keys of their own do. A message's reader gets a cipher whose
public methods open and check, and nothing else; its writer a sealer that tags one header.

Python enforces no privacy: the AES-GCM a cipher keeps in a private member, or a frame's
decryption context, is reachable by anyone who reaches into it. Ruff's SLF001 forbids
that in shipped code, outside a module's own classes (on a line that says why). These are
fences against honest mistakes, read from the source: code that builds the names it
looks up (`getattr` on a computed string, `vars`, `importlib`) passes both unseen.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envelope import AesKeyring, open_message
from envelope.errors import StateError
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
    # Imports AES-SIV from where `cryptography` keeps its ciphers: deterministic by design,
    # it has no IV to repeat; it holds no AES-GCM.
    "keystore/name_keys.py": "member paths, sealed into object names with AES-SIV",
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


def aes_gcm_in(source: str, filename: str) -> set[str]:
    """What in a module reaches AES-GCM: an import from where `cryptography` keeps its
    ciphers, an import of a name of AES-GCM from any module (one that holds it hands it
    on), a name of AES-GCM (as a string too, which `getattr` could use), or a call that
    starts a cipher context."""
    tree = ast.parse(source, filename)
    found = {
        f"import {module}"
        for module in imported_modules(tree)
        if any(module == prefix or module.startswith(prefix + ".") for prefix in CIPHER_MODULES)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in CONTEXT_CALLS:
                found.add(f".{node.func.attr}()")
        elif isinstance(node, ast.alias) and node.name.rpartition(".")[2] in AES_GCM_NAMES:
            found.add(f"import {node.name}")
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
    assert {".decryptor()", ".encryptor()", "GCM"} <= aes_gcm_in(ITS_MODULE.read_text(), "")
    held = {
        str(path.relative_to(REPO)): aes_gcm_in(path.read_text(), str(path))
        for path in shipped_files()
    }
    assert "services/open_stored.py" in held
    assert sorted(path for path, found in held.items() if found) == sorted(MAY_HOLD_AES_GCM)


def test_a_reader_can_open_but_neither_seal_nor_tag() -> None:
    """Were the reader's cipher able to seal, it could tag a forged frame's ciphertext
    anew and open it; or tag a second header or frame under an IV already used."""
    keyring = AesKeyring("fence#1", os.urandom(32))
    header, sealer = new_message([keyring], {}, 4096)
    opener = open_message(header, [keyring]).cipher

    assert public_names(opener) == {"verify_header_tag", "open", "begin_opening"}
    assert public_names(sealer) == {"header_tag", "seal", "seal_into", "begin_regular"}


def test_aes_gcm_is_found_under_another_name_from_a_module_that_holds_it() -> None:
    handed_on = "from envelope.frames import AESGCM as Sealer\n\nSealer(bytes(32))\n"
    assert aes_gcm_in(handed_on, "handed_on.py") == {"import AESGCM"}


# Reaching into a cipher's privates: its AES-GCM, or a frame's decryption context.
REACHES_IN = """
def tag(opened, iv, plaintext, aad):
    return opened.cipher._aead.encrypt(iv, plaintext, aad)


def unchecked(cipher, prefix, ciphertext):
    return cipher.begin_opening(1, prefix, len(ciphertext), final=False)._context.update(ciphertext)


def held_back(frame_class):
    return frame_class._plaintext
"""


def private_reaches(source: str, filename: str) -> list[str]:
    """What ruff, configured as the project is, reports as private member access in
    `source` were it the file `filename`."""
    ruff = Path(sys.executable).parent / "ruff"
    command = [str(ruff), "check", "--no-cache", "--quiet", "--output-format", "concise"]
    command += ["--stdin-filename", filename, "-"]
    result = subprocess.run(command, input=source, capture_output=True, text=True, cwd=REPO)
    assert result.returncode in (0, 1), result.stderr
    return [line for line in result.stdout.splitlines() if "SLF001" in line]


def test_shipped_code_reaches_into_no_other_objects_privates() -> None:
    """Ruff's SLF001 is on for every shipped package: the whole repository is clean
    under it (`make lint`), so this checks that it is on where it matters."""
    for package in wheel_packages():
        found = private_reaches(REACHES_IN, f"{package}/reach.py")
        assert len(found) == 3, (package, found)
    assert private_reaches(REACHES_IN, "tests/reach.py") == []


def test_a_sealer_tags_one_header() -> None:
    """A second header tag, under the IV the first took, would give away GCM's hash key."""
    keyring = AesKeyring("fence#1", os.urandom(32))
    header, sealer = new_message([keyring], {}, 4096)
    with pytest.raises(StateError):
        sealer.header_tag(header.body)
    with pytest.raises(StateError):
        sealer.header_tag(header.body + b"another body")
