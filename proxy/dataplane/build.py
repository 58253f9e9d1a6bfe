"""Which build of the request path is running: the mypyc-compiled modules or the
interpreted ones (setup.py decides at install time)."""

from __future__ import annotations


def request_path_build() -> str:
    """"compiled" when the request path's modules are C extensions built by mypyc (setup.py),
    "interpreted" when Weir was installed as pure Python (no compiler, or WEIR_PURE_PYTHON)."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from . import exchange

    return "compiled" if exchange.__file__.endswith(tuple(EXTENSION_SUFFIXES)) else "interpreted"
