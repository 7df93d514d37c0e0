"""The house stands as docs/architecture.md draws it: floors by imports, one place for each decision.

Every import statement of the package counts, also those inside functions: a module's floor is one
above the highest module it imports, so a cycle has no floor at all.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastnst"
FRONT_ENDS = {"api", "batch", "bench", "plan", "video"}


@cache
def modules() -> dict[str, Path]:
    """Module name relative to the package ('run', 'kernels.backend', 'kernels' for __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name or "__init__"] = path
    return found


def _target(name: str, node: ast.ImportFrom) -> str:
    package = name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return ".".join(part for part in (package, node.module or "") if part) or "__init__"


@cache
def imports(name: str) -> frozenset[str]:
    """The package modules ``name`` imports (a submodule named in ``from X import sub`` counts as itself)."""
    found = set()
    for node in ast.walk(ast.parse(modules()[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = _target(name, node)
            subs = [f"{target}.{a.name}" if target != "__init__" else a.name for a in node.names]
            subs = [s for s in subs if s in modules()]
            found.update(subs if len(subs) == len(node.names) else [target, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("fastnst.") for a in node.names if a.name.startswith("fastnst"))
    return frozenset(m for m in found if m in modules() and m != name)


def floor(name: str, visiting: tuple[str, ...] = ()) -> int:
    assert name not in visiting, "import cycle: " + " -> ".join((*visiting, name))
    return 1 + max((floor(m, (*visiting, name)) for m in imports(name)), default=0)


def longest_path(start: str, goal) -> list[str]:
    """The longest import chain from ``start`` to a module for which ``goal`` holds."""
    best: list[str] = []
    for module in imports(start):
        tail = [module] if goal(module) else longest_path(module, goal)
        if tail and len(tail) + 1 > len(best):
            best = [start, *tail]
    return best


def test_no_cycles_and_at_most_nine_storeys():
    floors = {name: floor(name) for name in modules()}
    assert floors["__main__"] <= 9, floors
    assert max(floors.values()) <= 9


def test_the_cli_reaches_the_kernels_through_at_most_five_modules():
    chain = longest_path("cli", lambda m: m == "kernels" or m.startswith("kernels."))
    assert 0 < len(chain) <= 5, chain


def test_only_the_cli_imports_the_bench_harness_and_front_ends_stand_side_by_side():
    for name in modules():
        harness = {"bench", "bench_report"} & imports(name)
        assert not harness or name == "cli", (name, harness)
        if name in FRONT_ENDS:
            assert not (imports(name) & FRONT_ENDS), (name, imports(name) & FRONT_ENDS)


def _callers(*names: str) -> set[str]:
    """The modules whose code (not definitions, docstrings or comments) calls one of ``names``."""
    pattern = re.compile(r"(?<!def )(?<!class )\b(" + "|".join(names) + r")\(")
    hits = set()
    for name, path in modules().items():
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", '"'))]
        if pattern.search("\n".join(code)):
            hits.add(name)
    return hits


def test_one_place_builds_the_network_resolves_precision_and_decides_graph_capture():
    assert _callers("VGGFeatures") == {"run"}
    assert _callers("resolve_precision") == {"run"}
    assert _callers("GraphedStep", "CUDAGraph") == {"run"}
    assert _callers("resolve_runtime") <= {"run", "api", "batch", "bench", "video"}


def test_no_private_names_are_imported_across_modules():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, (name, node.module, private)
