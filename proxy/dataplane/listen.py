"""A listener that cannot bind: which one, at which address, and the config key that sets it."""

from __future__ import annotations

import os
import socket

DATA_PLANE = ("the data plane", "listen")
ADMIN_API = ("the admin API", "admin.listen")


class ListenError(OSError):
    """``weir run`` prints it as one line and exits 2 (see app.run); an OSError still, so
    that code catching those (a worker's start) goes on working."""

    def __init__(self, listener: tuple[str, str], address: str, cause: OSError) -> None:
        super().__init__(cause.errno, reason(cause))
        self.what, self.key = listener
        self.address = address

    def __str__(self) -> str:
        return self.message()

    def message(self, config_file: str = "the config file") -> str:
        """E.g. cannot listen on 127.0.0.1:8080 for the data plane (listen: in weir.yaml):
        address already in use."""
        return (f"cannot listen on {self.address} for {self.what} ({self.key}: in "
                f"{config_file}): {self.strerror}")


def reason(exc: OSError) -> str:
    """"address already in use", not "[Errno 98] error while attempting to bind on address
    ('127.0.0.1', 8080): address already in use"."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        text = exc.strerror  # a host name that does not resolve
    elif exc.errno:
        text = os.strerror(exc.errno)
    else:
        text = str(exc)
    return text[:1].lower() + text[1:]
