"""Build hook: compile the request path with mypyc where this machine can.

pyproject.toml holds the package's metadata; this file only adds the compiled modules. The
modules below are plain, type-annotated Python; mypyc turns them into C extensions that run
the same code with about 40% fewer instructions per proxied request (bench/RESULTS.md).
When they cannot be built (no C compiler, mypyc missing, or WEIR_PURE_PYTHON=1 in the
environment), Weir installs as pure Python and behaves the same, only slower.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules every proxied request runs through (mirror.py for every request of a mirrored
# service); the rest of Weir stays interpreted.
COMPILED_MODULES = [
    "proxy/dataplane/context.py",
    "proxy/dataplane/corking.py",
    "proxy/dataplane/exchange.py",
    "proxy/dataplane/http1.py",
    "proxy/dataplane/http2.py",
    "proxy/dataplane/http11.py",
    "proxy/dataplane/mirror.py",
    "proxy/dataplane/routing.py",
    "proxy/dataplane/stats.py",
    "proxy/dataplane/upstream.py",
    "proxy/dataplane/upstream_h2.py",
]


def warn(message: str) -> None:
    print(f"weir: {message}; installing the pure-Python build", file=sys.stderr)


def compiled_extensions() -> list:
    if os.environ.get("WEIR_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        warn("mypyc is not available")
        return []
    try:
        # The build environment need not have Weir's dependencies: their types count as Any.
        return mypycify(["--ignore-missing-imports", *COMPILED_MODULES], opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error it cannot compile
        warn(f"mypyc could not translate the request path ({exc})")
        return []


class OptionalBuildExt(build_ext):
    """All or nothing: a compiler error leaves no half-built set of extensions behind, since
    mypyc's modules share one runtime library and cannot be mixed with interpreted ones."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, or it failed: fall back to the .py files
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            warn(f"the C extensions could not be built ({exc})")


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": OptionalBuildExt})
