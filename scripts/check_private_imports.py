"""Fails when a module uses another module's private name (``_name``): ``from ept_jax.x import _f`` or
``x._f`` on an imported project module. Private names stay inside their module; what another module needs is made
public. Ruff's PLC2701 does not flag imports within one first-party package, hence this check (run by .ci/run and
``tests/unit/test_layers.py``).

    python scripts/check_private_imports.py [PATH ...]   # default: ept_jax train benchmarks configs scripts
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("ept_jax", "train", "benchmarks", "configs")
DEFAULT_PATHS = ("ept_jax", "train", "benchmarks", "configs", "scripts")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in PROJECT


def violations(path: Path) -> list[str]:
    """``"file:line: ..."`` for every use of another project module's private name in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(REPO) if path.is_absolute() and REPO in path.parents else path
    out = []
    modules: dict[str, str] = {}  # local name -> project module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _project(node.module):
            for alias in node.names:
                if _private(alias.name):
                    out.append(f"{rel}:{node.lineno}: imports {node.module}.{alias.name}")
                else:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _project(alias.name):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and _private(node.attr)):
            out.append(f"{rel}:{node.lineno}: uses {modules[node.value.id]}.{node.attr}")
    return out


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv else DEFAULT_PATHS)]
    files = [f for p in paths for f in ((REPO / p).rglob("*.py") if (REPO / p).is_dir() else [REPO / p])]
    found = [v for f in sorted(files) for v in violations(f)]
    for v in found:
        print(v)
    if found:
        print(f"{len(found)} use(s) of another module's private name: make the name public", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
