"""Every upstream pool of the data plane, kept for the life of the process.

``PoolRegistry`` hands out a ``Balancer`` per set of upstreams a version names, with one pool
per address, TLS settings and protocol: HTTP/1.1 pools (``upstream.UpstreamPool``) or HTTP/2
ones (``upstream_h2.Http2Pool``). Pools outlive config reloads, so a reload keeps warm
connections.
"""

from __future__ import annotations

import asyncio
import ssl

from ..config.model import UpstreamSettings, UpstreamTLS
from ..config.tls import upstream_context
from .corking import Corker
from .upstream import Balancer, UpstreamPool, pool_key
from .upstream_h2 import Http2Pool


class PoolRegistry:
    """One pool per upstream address, TLS settings and protocol for the life of the
    process."""

    def __init__(self, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop,
                 contexts: dict[UpstreamTLS, ssl.SSLContext] | None = None,
                 contexts_h2: dict[UpstreamTLS, ssl.SSLContext] | None = None) -> None:
        self.settings = settings
        self.loop = loop
        # One for the whole data plane: client and upstream writes go out together, and the
        # time read once per loop iteration is the same for all.
        self.corker = Corker(loop)
        self.pools: dict[str, UpstreamPool] = {}
        self._balancers: dict[tuple[tuple[str, ...], UpstreamTLS | None, str], Balancer] = {}
        self.contexts: dict[UpstreamTLS, ssl.SSLContext] = dict(contexts or {})
        # The same settings for protocol: h2, whose contexts offer h2 in ALPN.
        self.contexts_h2: dict[UpstreamTLS, ssl.SSLContext] = dict(contexts_h2 or {})

    def balancer_for(self, addresses: tuple[str, ...], tls: UpstreamTLS | None = None,
                     protocol: str = "http1") -> Balancer:
        balancer = self._balancers.get((addresses, tls, protocol))
        if balancer is None:
            pools = []
            for address in addresses:
                key = pool_key(address, tls, protocol)
                pool = self.pools.get(key)
                if pool is None:
                    context = (self.context_for(tls, protocol == "h2") if tls is not None
                               else None)
                    kind = UpstreamPool if protocol == "http1" else Http2Pool
                    pool = self.pools[key] = kind(address, self.settings, self.loop,
                                                  self.corker, tls, context, protocol)
                pools.append(pool)
            balancer = self._balancers[(addresses, tls, protocol)] = Balancer(pools)
        return balancer

    def context_for(self, tls: UpstreamTLS, http2: bool = False) -> ssl.SSLContext:
        contexts = self.contexts_h2 if http2 else self.contexts
        context = contexts.get(tls)
        if context is None:
            context = contexts[tls] = upstream_context(tls, http2=http2)
        return context

    def use_contexts(self, contexts: dict[UpstreamTLS, ssl.SSLContext],
                     contexts_h2: dict[UpstreamTLS, ssl.SSLContext] | None = None) -> None:
        """A reload's freshly loaded CA files: new connections use them; pools whose settings
        left the config keep theirs while they drain."""
        self.contexts = dict(contexts)
        self.contexts_h2 = dict(contexts_h2 or {})
        for pool in self.pools.values():
            mine = self.contexts_h2 if pool.protocol == "h2" else self.contexts
            if pool.tls is not None and pool.tls in mine:
                pool.ssl = mine[pool.tls]

    def apply(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        for pool in self.pools.values():
            pool.apply(settings)

    def sweep(self) -> None:
        now = self.loop.time()
        for pool in self.pools.values():
            pool.sweep(now)

    def close_all(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()
