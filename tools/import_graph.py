"""Print the import graph between the service's packages: for each pair, how many of one's
modules import the other (any import statement counts, those inside functions too, as
import-linter counts them).

    .venv/bin/python tools/import_graph.py                 # this checkout
    .venv/bin/python tools/import_graph.py DIR --split sealstream

`--split P` shows package P's modules one by one instead of as one node: `sealstream`
holds both the settings, which most layers read, and the composition root above them all.
"""

import argparse
import ast
from collections import Counter
from pathlib import Path

NOT_SERVICE = {"tests", "bench", "tools"}


def packages(root: Path) -> list[str]:
    return sorted(
        p.name
        for p in root.iterdir()
        if (p / "__init__.py").is_file() and p.name not in NOT_SERVICE
    )


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def node_of(module: str, split: set[str], known: set[str]) -> str | None:
    """The graph's node for a module: its top-level package, or, for a split package,
    its module below that; None for what is not ours."""
    parts = module.split(".")
    if parts[0] not in known:
        return None
    return ".".join(parts[:2]) if parts[0] in split and len(parts) > 1 else parts[0]


def graph(root: Path, split: set[str]) -> tuple[int, Counter[tuple[str, str]]]:
    """How many modules of each node import each other node, and how many modules."""
    known = set(packages(root))
    edges: Counter[tuple[str, str]] = Counter()
    paths = [path for package in sorted(known) for path in sorted((root / package).rglob("*.py"))]
    for path in paths:
        source = node_of(".".join(path.relative_to(root).with_suffix("").parts), split, known)
        targets = {node_of(name, split, known) for name in imported(path)}
        for target in sorted(t for t in targets if t is not None and t != source):
            # `from sealstream import settings` names both the package and its module.
            if source is not None and not target.startswith(f"{source}."):
                edges[(source, target)] += 1
    return len(paths), edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "root", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent
    )
    parser.add_argument("--split", action="append", default=[], help="show this package's modules")
    args = parser.parse_args()
    modules, edges = graph(args.root, set(args.split))
    nodes = {n for edge in edges for n in edge}
    imports = sum(edges.values())
    print(f"{len(nodes)} nodes, {modules} modules, {len(edges)} edges, {imports} module imports")
    for (source, target), count in sorted(edges.items()):
        print(f"  {source:>22} -> {target:<22} {count}")


if __name__ == "__main__":
    main()
