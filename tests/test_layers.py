"""The package's layers (ARCHITECTURE.md): each subpackage imports only from the layers below
it and its own, counting every import, at the top of a module, inside a function or under
TYPE_CHECKING; and no two modules import each other at run time, but for the one lazy import
of the optional Redis extra.

Read from the source with ast, as aiohttp's own import checks do: nothing is imported, so a
violation is found whatever code path would have made it.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "proxy"

# From the bottom up. The base is proxy's own top-level modules (errors, tasks); __main__ is
# the command line's.
LAYERS = ["", "config", "dataplane", "rollout", "control", "admin", "runtime", "demo", "cli"]

# store.make_store imports the Redis store only when the config asks for it (the redis package
# is an optional extra), and the Redis store builds on the store's interface.
ALLOWED_CYCLE_EDGES = {("proxy.control.store", "proxy.control.redisstore")}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))
            if "static" not in path.parts}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("errors", "tasks"):
        return 0
    if parts[1] == "__main__":
        return LAYERS.index("cli")
    return LAYERS.index(parts[1])


class Imports(ast.NodeVisitor):
    """Every import of a module: (target module, line, at run time?)."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[tuple[str, int, bool]] = []
        self.type_only = 0

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self.type_only += 1
            for child in node.body:
                self.visit(child)
            self.type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def add(self, target: str, line: int) -> None:
        if target == "proxy" or target.startswith("proxy."):
            self.found.append((target, line, not self.type_only))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self.add(submodule if submodule in self.known else source, node.lineno)


def import_graph() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, at run time) for every import inside the package."""
    found = modules()
    edges = []
    for module, path in found.items():
        visitor = Imports(module, path.name == "__init__.py", set(found))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        edges += [(module, target, line, runtime) for target, line, runtime in visitor.found]
    return edges


def test_every_subpackage_is_a_layer() -> None:
    found = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert found == set(LAYERS[1:]), "add the new subpackage to LAYERS and ARCHITECTURE.md"


def test_imports_flow_down_the_layers() -> None:
    upward = [f"{importer}:{line} imports {imported} ({LAYERS[layer_of(imported)] or 'base'} "
              f"is above {LAYERS[layer_of(importer)] or 'base'})"
              for importer, imported, line, _ in import_graph()
              if layer_of(imported) > layer_of(importer)]
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_that_imports_it_back_at_run_time() -> None:
    graph: dict[str, set[str]] = {}
    for importer, imported, _, runtime in import_graph():
        if runtime and importer != imported and (importer, imported) not in ALLOWED_CYCLE_EDGES:
            graph.setdefault(importer, set()).add(imported)

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
        return False

    cycles = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                     if reaches(b, a)})
    assert not cycles, f"modules in an import cycle: {cycles}"


@pytest.mark.parametrize("package", LAYERS[1:])
def test_each_subpackage_imports_alone(package: str) -> None:
    """In a fresh interpreter, importing every module of one subpackage first works: no module
    depends on another having been imported before it."""
    names = sorted(m for m in modules() if m.startswith(f"proxy.{package}"))
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert importlib.import_module(f"proxy.{package}")
