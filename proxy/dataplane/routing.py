"""The routing table: compiled once per config load, immutable, swapped atomically.

Everything that can be decided at load time is decided here, so that the per-request work in
``Route.pick_version`` is a few dict lookups, byte comparisons and at most one hash per version.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import uuid
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable, Sequence
from itertools import accumulate
from typing import Any, Final, Protocol
from urllib.parse import unquote_to_bytes

from ..config.model import Config, RuleMatch, Service, StringMatch, Timeouts, UpstreamTLS
from .http11 import HEAD_END_WITH_VIA, split_absolute_form
from .mirror import MirrorPolicy
from .retry import RetryPolicy, budget_for
from .stats import StatsRegistry, VersionStats

# Why a request went to its version; shown in access logs and metrics.
REASON_RULE: Final = "rule"
REASON_STICKY: Final = "sticky"
REASON_WEIGHT: Final = "weight"

_HOST_CACHE_LIMIT: Final = 4096
_STICKY_CACHE_LIMIT: Final = 65536


class UpstreamPicker(Protocol):
    """What routing needs of a version's upstreams: upstream.Balancer provides it (owned by the
    data plane's pool registry, looked up by address list)."""

    @property
    def pools(self) -> Sequence[Any]: ...
    def pick(self) -> object: ...
    def pick_excluding(self, tried: Collection[Any]) -> object: ...
    def shares(self) -> dict[str, float]: ...


BytesPredicate = Callable[[bytes], bool]


def compile_string_match(match: StringMatch) -> BytesPredicate:
    if match.exact is not None:
        exact = match.exact.encode("latin-1")
        return exact.__eq__
    if match.prefix is not None:
        prefix = match.prefix.encode("latin-1")
        return lambda value: value.startswith(prefix)
    assert match.regex is not None
    pattern = re.compile(match.regex.encode("latin-1"))
    return lambda value: pattern.search(value) is not None


def parse_cookies(header: bytes | None) -> dict[bytes, bytes]:
    cookies: dict[bytes, bytes] = {}
    if header:
        for part in header.split(b";"):
            name, sep, value = part.partition(b"=")
            if sep:
                cookies.setdefault(name.strip(), value.strip().strip(b'"'))
    return cookies


def parse_query(url: bytes) -> dict[bytes, bytes]:
    _, sep, query = url.partition(b"?")
    params: dict[bytes, bytes] = {}
    if sep:
        for part in query.split(b"#", 1)[0].split(b"&"):
            name, _, value = part.partition(b"=")
            if name:
                params.setdefault(unquote_to_bytes(name.replace(b"+", b" ")),
                                  unquote_to_bytes(value.replace(b"+", b" ")))
    return params


def request_path(url: bytes) -> bytes:
    """The path of an origin-form or absolute-form request target, without the query."""
    if url.startswith((b"http://", b"https://")):
        url = split_absolute_form(url)[1]
    return url.split(b"?", 1)[0].split(b"#", 1)[0]


class CompiledRule:
    __slots__ = ("cookies", "headers", "path", "query", "version")

    def __init__(self, rule_match: RuleMatch, version: VersionTarget) -> None:
        self.headers = tuple((name.lower().encode("latin-1"), compile_string_match(m))
                             for name, m in rule_match.headers.items())
        self.cookies = tuple((name.encode("latin-1"), compile_string_match(m))
                             for name, m in rule_match.cookies.items())
        self.query = tuple((name.encode("latin-1"), compile_string_match(m))
                           for name, m in rule_match.query.items())
        self.path = compile_string_match(rule_match.path) if rule_match.path else None
        self.version = version

    def matches(self, hmap: dict[bytes, bytes], url: bytes) -> bool:
        """``hmap``: the request's headers, lower-cased names to raw values."""
        for name, test in self.headers:
            value = hmap.get(name)
            if value is None or not test(value):
                return False
        if self.cookies:
            cookies = parse_cookies(hmap.get(b"cookie"))
            for name, test in self.cookies:
                value = cookies.get(name)
                if value is None or not test(value):
                    return False
        if self.query:
            params = parse_query(url)
            for name, test in self.query:
                value = params.get(name)
                if value is None or not test(value):
                    return False
        return self.path is None or self.path(request_path(url))


class VersionTarget:
    """One version of one service as the data plane sees it."""

    __slots__ = ("balancer", "name", "response_end", "response_header", "response_pairs",
                 "service", "stats", "sticky_seed", "upstreams")

    def __init__(self, service: str, name: str, upstreams: tuple[str, ...],
                 balancer: UpstreamPicker, emit_header: bool,
                 stats: VersionStats | None = None) -> None:
        self.service = service
        self.stats = stats if stats is not None else VersionStats(service, name)
        self.name = name
        self.upstreams = upstreams
        self.balancer = balancer
        self.response_header = (b"x-weir-version: " + name.encode() + b"\r\n"
                                if emit_header else b"")
        # How the head of most responses it serves ends, as one piece to join.
        self.response_end = self.response_header + HEAD_END_WITH_VIA
        # The same header as an HTTP/2 field.
        self.response_pairs = [(b"x-weir-version", name.encode())] if emit_header else []
        # Rendezvous hashing seeds each version separately; see Route._sticky_pick.
        self.sticky_seed = f"weir\x00{service}\x00{name}\x00".encode()


def sticky_score(seed: bytes, user_key: bytes, weight: int) -> float:
    """Weighted rendezvous score: the version with the lowest score wins.

    ``-ln(u) / w`` with ``u`` uniform in (0, 1) from a keyed blake2b of the user key. Raising one
    version's weight lowers only its own score, so users on it never leave as it grows; every
    process computes the same number because blake2b (unlike ``hash()``) is not salted.
    """
    digest = hashlib.blake2b(seed + user_key, digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 18446744073709551616.0
    return -math.log(u) / weight


class StickyPolicy:
    __slots__ = ("cookie", "cookie_max_age", "header", "mint_cookie")

    def __init__(self, header: str | None, cookie: str | None, mint_cookie: bool,
                 cookie_max_age: float) -> None:
        self.header = header.lower().encode("latin-1") if header else None
        self.cookie = cookie.encode("latin-1") if cookie else None
        self.mint_cookie = mint_cookie
        self.cookie_max_age = int(cookie_max_age)

    def user_key(self, hmap: dict[bytes, bytes]) -> bytes | None:
        if self.header is not None:
            value = hmap.get(self.header)
            if value:
                return value
        if self.cookie is not None:
            raw = hmap.get(b"cookie")
            if raw and self.cookie in raw:
                return parse_cookies(raw).get(self.cookie) or None
        return None

    def new_cookie(self) -> tuple[bytes, bytes]:
        """A fresh user key for an anonymous user, and the Set-Cookie header line that keeps it."""
        key = uuid.uuid4().hex.encode()
        assert self.cookie is not None
        line = (b"set-cookie: " + self.cookie + b"=" + key
                + b"; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax\r\n" % self.cookie_max_age)
        return key, line


class Route:
    """A compiled service: which requests it takes and how it picks a version for each."""

    __slots__ = ("_cumulative", "_only", "_sticky_cache", "_total", "_weighted",
                 "allow_trace", "connect_timeout", "hosts", "mirrors", "name", "path_prefix",
                 "read_timeout", "retry", "rules", "sticky", "versions", "weights")

    def __init__(self, service: Service, weights: dict[str, int],
                 versions: dict[str, VersionTarget], stats: StatsRegistry | None = None,
                 timeouts: Timeouts | None = None,
                 preview: tuple[str, str] | None = None) -> None:
        self.name = service.name
        # The service's own timeouts, else the process-wide upstream ones.
        timeouts = service.timeouts or timeouts or Timeouts()
        self.connect_timeout = timeouts.connect
        self.read_timeout = timeouts.read
        self.hosts = tuple(service.match.hosts)
        self.path_prefix = service.match.path_prefix.encode()
        # TRACE is refused with 405 unless the service takes it (exchange.Exchange.dispatch).
        self.allow_trace = service.allow_trace
        self.versions = versions
        self.weights = dict(weights)
        rules = [CompiledRule(r.match, versions[r.version]) for r in service.rules]
        if preview is not None:
            # Blue/green: "<header>: 1" reaches the idle colour before it takes traffic.
            header, version = preview
            match = RuleMatch(headers={header: StringMatch(exact="1")})
            rules.insert(0, CompiledRule(match, versions[version]))
        self.rules = tuple(rules)
        stats = stats if stats is not None else StatsRegistry()
        mirrors = [MirrorPolicy(m, versions[m.version], stats.for_mirror(service.name,
                                                                        m.version))
                   for m in service.mirror if m.percent > 0]
        for m in service.mirror:
            if m.percent > 0 and m.baseline is not None and m.baseline in versions:
                # Diffy's noise: a share of the copies go to the primary once more, and
                # what differs between its two answers is noise for this shadow's diffs.
                again = m.model_copy(update={
                    "version": m.baseline, "percent": m.percent * m.baseline_percent / 100,
                    "compare": True, "baseline": None})
                baseline = MirrorPolicy(again, versions[m.baseline],
                                        stats.for_mirror(service.name, m.baseline))
                baseline.noise_of = stats.for_mirror(service.name, m.version).diff
                mirrors.append(baseline)
        self.mirrors = tuple(mirrors)
        # None when the service has no `retries` block: the request path then tests one
        # attribute and does nothing else for retries.
        self.retry = (RetryPolicy(service.retries,
                                  budget_for(stats.retry_budgets, service.name,
                                             service.retries.budget))
                      if service.retries is not None else None)
        sticky = service.sticky
        self.sticky = (StickyPolicy(sticky.header, sticky.cookie, sticky.mint_cookie,
                                    sticky.cookie_max_age) if sticky else None)
        self._weighted = tuple((versions[n], w) for n, w in weights.items() if w > 0)
        self._cumulative = list(accumulate(w for _, w in self._weighted))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self._only = self._weighted[0][0] if len(self._weighted) == 1 else None
        # Weights are fixed for the life of a Route, so a user's version can be remembered.
        self._sticky_cache: dict[bytes, VersionTarget | None] = {}

    def pick_version(self, hmap: dict[bytes, bytes],
                     url: bytes) -> tuple[VersionTarget | None, str, bytes]:
        """(version, reason, extra response header lines such as a minted sticky cookie) for a
        request's headers (lower-cased names to raw values) and URL. Plain arguments rather
        than the request: compiled, reading them off an object of no native class costs a
        lookup by name each."""
        for rule in self.rules:
            if rule.matches(hmap, url):
                return rule.version, REASON_RULE, b""
        sticky = self.sticky
        if sticky is not None:
            key = sticky.user_key(hmap)
            extra = b""
            if key is None and sticky.mint_cookie:
                # Minted even while one version has all the traffic, so that the user is
                # already keyed when a split begins.
                key, extra = sticky.new_cookie()
            if key is not None:
                if self._only is not None:
                    return self._only, REASON_WEIGHT, extra
                # _sticky_pick's cache hit, inlined: a returning user costs one lookup.
                known = self._sticky_cache.get(key)
                return known or self._sticky_pick(key), REASON_STICKY, extra
        if self._only is not None:
            return self._only, REASON_WEIGHT, b""
        if not self._total:
            return None, REASON_WEIGHT, b""
        index = bisect_right(self._cumulative, random.random() * self._total)
        return self._weighted[index][0], REASON_WEIGHT, b""

    def _sticky_pick(self, user_key: bytes) -> VersionTarget | None:
        cache = self._sticky_cache
        best = cache.get(user_key)
        if best is None:
            best = self._sticky_hash(user_key)
            if len(cache) >= _STICKY_CACHE_LIMIT:
                cache.clear()
            cache[user_key] = best
        return best

    def _sticky_hash(self, user_key: bytes) -> VersionTarget | None:
        best: VersionTarget | None = None
        best_score = math.inf
        for target, weight in self._weighted:
            score = sticky_score(target.sticky_seed, user_key, weight)
            if score < best_score:
                best, best_score = target, score
        return best


def effective_weights(service: Service) -> dict[str, int]:
    """Weights as configured; versions left out get 0; no weights at all → first version 100."""
    if service.weights is None:
        first = next(iter(service.versions))
        return {name: (100 if name == first else 0) for name in service.versions}
    return {name: service.weights.get(name, 0) for name in service.versions}


class RouteTable:
    """Immutable after construction, but for the caches of ``find_route``, which maps (host,
    path) to a Route."""

    __slots__ = ("_by_host", "_cache", "_default", "_last_candidates", "_last_host",
                 "_wildcards", "generation", "routes")

    def __init__(self, routes: Iterable[Route], generation: int = 1) -> None:
        ordered = sorted(routes, key=lambda r: -len(r.path_prefix))
        self.routes = tuple(ordered)
        self.generation = generation
        self._by_host: dict[str, list[Route]] = {}
        self._wildcards: list[tuple[str, Route]] = []
        self._default = tuple(r for r in ordered if not r.hosts)
        for route in ordered:
            for host in route.hosts:
                host = without_root_dot(host)  # "shop.example.com." names the same host
                if host.startswith("*."):
                    self._wildcards.append((host[1:], route))
                else:
                    self._by_host.setdefault(host, []).append(route)
        self._wildcards.sort(key=lambda item: -len(item[0]))
        self._cache: dict[bytes, tuple[Route, ...]] = {}
        # The Host value of the latest request and its candidates: most instances serve one
        # or a few hosts, and comparing the value costs less than the lookup, which hashes it.
        self._last_host = b""  # no Host (HTTP/1.0): what _candidates says of that
        self._last_candidates: tuple[Route, ...] = self._candidates(b"")

    def _candidates(self, raw_host: bytes) -> tuple[Route, ...]:
        """Routes that may take this Host header value, most specific first; cached by the
        raw value so that the usual request costs one dict lookup (and this normalising
        runs once per distinct value, not per request)."""
        host = raw_host.decode("latin-1").lower()
        if host.startswith("["):
            host = host.split("]", 1)[0] + "]"
        elif ":" in host:
            host = host.rsplit(":", 1)[0]
        # A fully qualified name (RFC 1034 3.1), as some clients and resolvers send it: the
        # same host, which must not miss its service and fall through to a catch-all.
        host = without_root_dot(host)
        found = tuple(self._by_host.get(host, ()))
        found += tuple(r for suffix, r in self._wildcards if host.endswith(suffix))
        found += self._default
        if len(self._cache) < _HOST_CACHE_LIMIT:
            self._cache[raw_host] = found
        return found

    def find_route(self, host: bytes, url: bytes) -> Route | None:
        """Most specific host first (exact, then wildcard, then any), then longest prefix."""
        if host == self._last_host:
            candidates = self._last_candidates
        else:
            found = self._cache.get(host)
            candidates = found if found is not None else self._candidates(host)
            self._last_host = host
            self._last_candidates = candidates
        if url[:1] != b"/":
            url = request_path(url)
        for route in candidates:
            if url.startswith(route.path_prefix):
                return route
        return None


def without_root_dot(host: str) -> str:
    """``shop.example.com.`` → ``shop.example.com``: one trailing dot, the DNS root's, is
    dropped (a second one makes a name no host has). Sliced only when there is one."""
    return host[:-1] if host[-1:] == "." else host


def build_route_table(config: Config,
                      balancer_for: Callable[[tuple[str, ...], UpstreamTLS | None, str],
                                             UpstreamPicker],
                      weights_override: dict[str, dict[str, int]] | None = None,
                      generation: int = 1, stats: StatsRegistry | None = None,
                      previews: dict[str, tuple[str, str]] | None = None) -> RouteTable:
    """Compile a validated config. ``balancer_for`` hands out upstream sets so that pooled
    connections survive a reload, as ``stats`` does for counters; ``weights_override``
    carries runtime weight changes."""
    stats = stats if stats is not None else StatsRegistry()
    routes = []
    for service in config.services:
        versions = {
            name: VersionTarget(service.name, name, tuple(v.upstreams),
                                balancer_for(tuple(v.upstreams), v.tls, v.protocol),
                                config.version_header, stats.for_version(service.name, name))
            for name, v in service.versions.items()
        }
        grpc_errors = frozenset(service.grpc.error_codes)
        for target in versions.values():
            target.stats.grpc_errors = grpc_errors
        weights = effective_weights(service)
        if weights_override and service.name in weights_override:
            weights = {n: weights_override[service.name].get(n, 0) for n in service.versions}
        routes.append(Route(service, weights, versions, stats, config.upstream.timeouts,
                            (previews or {}).get(service.name)))
    return RouteTable(routes, generation)
