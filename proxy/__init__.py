"""Weir: a traffic-splitting HTTP/1.1 reverse proxy for zero-downtime deployments."""

__version__ = "0.1.0"


def request_path_build() -> str:
    """"compiled" when the request path's modules are C extensions built by mypyc (setup.py),
    "interpreted" when Weir was installed as pure Python (no compiler, or WEIR_PURE_PYTHON)."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from . import server

    return "compiled" if server.__file__.endswith(tuple(EXTENSION_SUFFIXES)) else "interpreted"
