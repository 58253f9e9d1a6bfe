"""TLS: HTTPS on the data listener, and HTTPS to upstreams.

Contexts are built from the config's file paths every time a config is loaded (``weir
validate``, start, reload), so a missing, unreadable or mismatched file is a config error that
names its field. A reload builds the new contexts off to the side and swaps them in: the
listener keeps its socket and moves new handshakes to the new certificate (``ListenerTLS``),
and upstream pools open new connections with the new CA; open connections are left alone.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Config, ServerTLS, UpstreamTLS

log = logging.getLogger("weir.tls")

# To clients: HTTP/2 first, as every browser and gRPC client asks; to upstreams, HTTP/1.1.
LISTENER_ALPN = ["h2", "http/1.1"]
UPSTREAM_ALPN = ["http/1.1"]
# A version with ``protocol: h2`` offers HTTP/2 alone: an upstream that cannot speak it fails
# the handshake rather than answering in a protocol the pool does not expect.
UPSTREAM_ALPN_H2 = ["h2"]
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ValueError):
    """Certificate, key or CA files that cannot be used; one line per problem, each naming
    its field."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read, or None if it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"


def _no_certificate(path: str) -> str | None:
    """Why ``path`` is not a readable file of PEM certificates, or None if it is."""
    problem = _unreadable(path)
    if problem is not None:
        return problem
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        return f"{path!r} holds no PEM certificate"
    return None


def server_context(settings: ServerTLS, where: str = "tls") -> ssl.SSLContext:
    """The data listener's context; raises TLSConfigError."""
    errors = []
    problem = _no_certificate(settings.cert_file)
    if problem is not None:
        errors.append(f"{where}.cert_file: {problem}")
    problem = _unreadable(settings.key_file)
    if problem is not None:
        errors.append(f"{where}.key_file: {problem}")
    if errors:
        raise TLSConfigError(errors)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[settings.min_version]
    context.set_alpn_protocols(LISTENER_ALPN)
    asked = False

    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
        nonlocal asked
        asked = True
        return b""

    try:
        context.load_cert_chain(settings.cert_file, settings.key_file, password=no_password)
    except ssl.SSLError as exc:
        key = settings.key_file
        if asked:
            message = f"{key!r} is encrypted; Weir needs an unencrypted PEM key"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            message = (f"the key in {key!r} does not match the certificate in "
                       f"{where}.cert_file ({settings.cert_file!r})")
        else:
            message = (f"{key!r} is not a usable private key for {where}.cert_file: "
                       f"{exc.reason or exc}")
        raise TLSConfigError([f"{where}.key_file: {message}"]) from None
    return context


def upstream_context(settings: UpstreamTLS, where: str = "tls",
                     http2: bool = False) -> ssl.SSLContext:
    """A client context for a version's upstreams (``http2``: for ``protocol: h2``); raises
    TLSConfigError."""
    if settings.ca_file is not None:
        problem = _no_certificate(settings.ca_file)
        if problem is not None:
            raise TLSConfigError([f"{where}.ca_file: {problem}"])
    # With a ca_file only that CA is trusted (a private CA); without, the system's.
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(UPSTREAM_ALPN_H2 if http2 else UPSTREAM_ALPN)
    return context


@dataclass
class CompiledTLS:
    listener: ssl.SSLContext | None
    upstream: dict[UpstreamTLS, ssl.SSLContext]
    upstream_h2: dict[UpstreamTLS, ssl.SSLContext] = field(default_factory=dict)  # ALPN h2


def compile_tls(config: Config) -> CompiledTLS:
    """Every context a config needs, or TLSConfigError listing every problem."""
    errors: list[str] = []
    listener = None
    if config.tls is not None:
        try:
            listener = server_context(config.tls)
        except TLSConfigError as exc:
            errors += exc.errors
    upstream: dict[UpstreamTLS, ssl.SSLContext] = {}
    upstream_h2: dict[UpstreamTLS, ssl.SSLContext] = {}
    for i, service in enumerate(config.services):
        for name, version in service.versions.items():
            settings = version.tls
            http2 = version.protocol == "h2"
            contexts = upstream_h2 if http2 else upstream
            if settings is None or settings in contexts:
                continue
            try:
                contexts[settings] = upstream_context(
                    settings, f"services[{i}].versions.{name}.tls", http2)
            except TLSConfigError as exc:
                errors += exc.errors
    if errors:
        raise TLSConfigError(errors)
    return CompiledTLS(listener, upstream, upstream_h2)


def warn_unverified(config: Config) -> None:
    for service in config.services:
        for name, version in service.versions.items():
            if version.tls is not None and not version.tls.verify:
                log.warning("service %s, version %s: tls.verify is false: the certificates of "
                            "%s are not checked, so anyone on the path can impersonate them",
                            service.name, name, ", ".join(version.upstreams))


class ListenerTLS:
    """The data listener's SSLContext, fixed when the socket is bound, and the context new
    handshakes use, which a reload replaces.

    OpenSSL calls the servername callback early in every ClientHello (with or without SNI),
    and the callback may move the connection to another context. So a reload builds a whole
    new context off to the side and swaps it in with one assignment; connections already open
    keep the one they shook hands with. Loading the new files into the live context instead
    would not be atomic: a load_cert_chain that fails halfway leaves the new certificate in
    place without its key, and every handshake after that fails."""

    __slots__ = ("current", "listener")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.listener = context
        self.current = context
        context.sni_callback = self._select

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        current = self.current
        if current is not context:
            conn.context = current

    def swap(self, context: ssl.SSLContext) -> None:
        # The version floor is taken from the listener's context when a connection starts,
        # before the callback runs, so it is copied there.
        self.listener.minimum_version = context.minimum_version
        self.current = context
