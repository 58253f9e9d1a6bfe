"""What a client connection, and each exchange on it, needs of the process.

``ProxyServer`` builds one ``DataPlaneContext`` and hands it to every connection it accepts;
the data plane never sees the process object itself. Compiled classes, so that a read of one
of their fields from the request path is a native load, not a lookup by name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from ..config.model import Config
    from .accesslog import AccessLog
    from .corking import Corker
    from .routing import RouteTable
    from .stats import StatsRegistry

# File descriptors kept back from the default max_connections for listeners, the admin API,
# idle pooled upstream connections, health checks and log files.
RESERVED_FDS: Final = 100


def default_max_connections() -> int:
    """Half the process's open-file limit (less a reserve), as HAProxy derives its maxconn:
    each client connection may hold an upstream connection too, and a client refused with a
    503 is better off than one whose accept fails for want of a file descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1, (soft - RESERVED_FDS) // 2)


class DataPlaneSettings:
    """Per-config values the hot path reads, resolved once at load time."""

    __slots__ = ("header_timeout", "idle_timeout", "max_body_bytes", "max_concurrent_streams",
                 "max_connections", "max_header_bytes", "trusted_networks")

    def __init__(self, config: Config) -> None:
        self.max_connections = config.limits.max_connections or default_max_connections()
        self.max_header_bytes = config.limits.max_header_bytes
        self.max_body_bytes = config.limits.max_body_bytes
        self.max_concurrent_streams = config.limits.max_concurrent_streams
        self.header_timeout = config.limits.header_timeout
        self.idle_timeout = config.limits.idle_timeout
        self.trusted_networks = tuple(ipaddress.ip_network(n, strict=False)
                                      for n in config.trusted_proxies)

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_networks)


# An address whose HTTP/2 connection was cut for abuse (rapid reset, a control-frame flood)
# gets no HTTP/2 connection for PENALTY_FIRST seconds, doubling with each cut while it keeps
# coming back, up to PENALTY_MAX; PENALTIES_KEPT addresses are remembered at most.
PENALTY_FIRST: Final = 1.0
PENALTY_MAX: Final = 60.0
PENALTIES_KEPT: Final = 10_000


class Penalties:
    """Client addresses that abused HTTP/2, and until when (loop time) they are refused: the
    per-connection defences bound what one connection costs, this bounds a client that
    reconnects as fast as it is cut."""

    __slots__ = ("strikes", "until")

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self.strikes: dict[str, int] = {}

    def penalize(self, address: str, now: float) -> float:
        """A cut for abuse: returns how long the address is refused."""
        until = self.until
        if address not in until and len(until) >= PENALTIES_KEPT:
            for other in [a for a, end in until.items() if end + PENALTY_MAX < now]:
                del until[other]
                self.strikes.pop(other, None)
            if len(until) >= PENALTIES_KEPT:
                return 0.0  # a flood from this many addresses is beyond a per-client defence
        previous = until.get(address)
        # Strikes count while the address keeps coming back; a long quiet spell forgives.
        strikes = (self.strikes.get(address, 0) if previous is not None
                   and now < previous + PENALTY_MAX else 0) + 1
        seconds = min(PENALTY_FIRST * 2 ** (strikes - 1), PENALTY_MAX)
        self.strikes[address] = strikes
        until[address] = now + seconds
        return seconds

    def refuses(self, address: str, now: float) -> bool:
        end = self.until.get(address)
        return end is not None and now < end


class ClientSide(Protocol):
    """What the process asks of every client connection, whatever protocol it speaks."""

    def shutdown(self) -> None:
        """Finish what is in flight, then close."""

    def abort(self) -> None:
        """Close now (the shutdown timeout has passed)."""


class DataPlaneContext:
    """All a client connection and its exchanges need of the process. ``ProxyServer`` builds
    it and is the only writer of what changes: ``table``, ``access_log``, ``settings`` (a
    reload) and ``draining`` (a shutdown); the rest is fixed for the life of the process."""

    __slots__ = ("access_log", "connections", "corker", "draining", "health", "listener_tls",
                 "loop", "penalties", "scheme", "settings", "stats", "table")

    def __init__(self, table: RouteTable, access_log: AccessLog | None,
                 settings: DataPlaneSettings, stats: StatsRegistry, health: Any,
                 corker: Corker, loop: asyncio.AbstractEventLoop, scheme: bytes,
                 listener_tls: Any) -> None:
        self.table = table
        self.access_log = access_log
        self.draining = False  # shutting down: answers tell clients to reconnect elsewhere
        self.settings = settings  # read by each new connection
        self.stats = stats
        self.health = health  # health.HealthMonitor: marks upstreams failed or back
        self.corker = corker  # holds writes, tells the time (see corking.py)
        self.loop = loop
        self.scheme = scheme  # b"https" on a TLS listener, else b"http"
        self.listener_tls = listener_tls  # None for plain HTTP
        self.connections: set[ClientSide] = set()
        self.penalties = Penalties()  # addresses refused HTTP/2 for a while after abuse


class Peer:
    """The client at the other end of a connection, as its requests are forwarded: fixed
    when the connection is made and shared by every exchange on it."""

    __slots__ = ("address", "address_bytes", "forwarded_for", "trusted")

    def __init__(self, address: str, settings: DataPlaneSettings, scheme: bytes) -> None:
        self.address = address  # an IP address, or "unix"
        self.address_bytes = address.encode()
        # Whether the X-Forwarded-* headers it sends are kept (and added to) or replaced.
        self.trusted = settings.is_trusted(address)
        # The forwarding headers of every request it sends, up to the host's value.
        self.forwarded_for = (b"x-forwarded-for: " + self.address_bytes
                              + b"\r\nx-forwarded-proto: " + scheme
                              + b"\r\nx-forwarded-host: ")
