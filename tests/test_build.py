"""The build users get: the request path compiled by mypyc where a C compiler was there.

CI sets WEIR_EXPECT_COMPILED=1 so that a type error or a missing compiler, which setup.py
turns into a quiet fall-back to pure Python, fails here instead of going unnoticed (the
suite would pass on the interpreted build while users ran a compiled one)."""

from __future__ import annotations

import ast
import importlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from proxy.dataplane.build import request_path_build

REPO = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """setup.py's COMPILED_MODULES, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMPILED_MODULES" for t in node.targets):
            paths = ast.literal_eval(node.value)
            return [path.removesuffix(".py").replace("/", ".") for path in paths]
    raise AssertionError("setup.py has no COMPILED_MODULES")


def is_extension(module: str) -> bool:
    return str(importlib.import_module(module).__file__).endswith(tuple(EXTENSION_SUFFIXES))


def test_the_compiled_modules_are_all_or_none() -> None:
    # mypyc's modules share one runtime library: a mix means a half-built tree.
    kinds = {is_extension(module) for module in compiled_modules()}
    assert len(kinds) == 1, {module: is_extension(module) for module in compiled_modules()}
    assert request_path_build() == ("compiled" if kinds == {True} else "interpreted")


@pytest.mark.skipif(os.environ.get("WEIR_EXPECT_COMPILED") != "1",
                    reason="WEIR_EXPECT_COMPILED=1 is set by .ci/run")
def test_ci_tests_the_compiled_request_path() -> None:
    assert request_path_build() == "compiled", (
        "the request path was installed as pure Python: see the `weir:` lines of pip's "
        "output (pip install -v -e .) for mypyc's type errors or the compiler's")


def test_compiled_modules_are_not_older_than_their_source() -> None:
    # An extension module shadows the .py beside it: an edit to a compiled module does
    # nothing until `pip install -e .` builds it again. Fail loudly instead of testing old code.
    stale = []
    for module in compiled_modules():
        built = Path(str(importlib.import_module(module).__file__))
        source = REPO / (module.replace(".", "/") + ".py")
        if is_extension(module) and source.stat().st_mtime > built.stat().st_mtime:
            stale.append(module)
    assert not stale, f"rebuild with `pip install -e .`: {stale} changed since they were compiled"


def test_no_extension_module_outside_the_compiled_list() -> None:
    # A .so left from an older layout (or a module dropped from COMPILED_MODULES) would be
    # imported instead of the .py beside it, or stand in for a module that no longer exists.
    listed = {REPO / (module.replace(".", "/")) for module in compiled_modules()}
    suffixes = sorted(EXTENSION_SUFFIXES, key=len, reverse=True)  # the full ABI tag first
    strays = []
    for path in (REPO / "proxy").rglob("*.so"):
        suffix = next(s for s in suffixes if path.name.endswith(s))
        if path.with_name(path.name.removesuffix(suffix)) not in listed:
            strays.append(path)
    assert not strays, f"extension modules that setup.py does not build: {strays}"
