"""Upstream health: active readiness checks, passive outlier ejection, circuit breakers.

State is kept per upstream address for the life of the process, so it survives reloads as the
pools do. The request path only reads ``UpstreamPool.available`` and ``max_requests`` (in
``Balancer.pick``) and resets or bumps ``UpstreamPool.failures``; everything here runs off that
path: probes on their own tasks, an ejection when a pool reports its N-th failure in a row, and
the return from it on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config.model import Config, HealthCheck, OutlierDetection, SlowStart
from ..tasks import cancel_and_wait
from .upstream import pool_key
from .upstream_h2 import Http2Pool
from .upstream_h2 import probe as probe_http2

if TYPE_CHECKING:
    import aiohttp

    from .pools import PoolRegistry
    from .routing import RouteTable
    from .upstream import Balancer, UpstreamPool

log = logging.getLogger("weir.health")

CHECK_OUTCOMES = ("success", "failure", "timeout", "error")
UNLIMITED = sys.maxsize  # no circuit breaker (the pools' default)

# An upstream taken out after a failed connect is probed with a bare connect: first after
# CONNECT_PROBE_FIRST, then at doubling intervals up to CONNECT_PROBE_MAX. An app server that
# restarts in a second is back in rotation within about half a second of listening again.
CONNECT_PROBE_FIRST = 0.1
CONNECT_PROBE_MAX = 1.0
# The balancer's handicap for an upstream whose latest connect failed but that stayed in
# rotation (the last of its version): it is picked only when nothing else can be.
FAILING_PENALTY = 1 << 20


@dataclass(frozen=True)
class UpstreamPolicy:
    """What the config asks of one address. An address listed by several versions is checked
    once, with the settings of the first version (in file order) that lists it."""

    check: HealthCheck | None
    outlier: OutlierDetection | None
    max_requests: int
    slow_start: SlowStart | None
    used_by: str  # "service/version, ..." for log lines


class UpstreamHealth:
    """One address's health record."""

    __slots__ = ("address", "awaiting_first_check", "back_since", "checked", "checks",
                 "connect_ejected", "connect_failed", "connect_failed_since", "ejected_for",
                 "ejected_until", "ejections", "fails", "healthy", "last_check", "passes",
                 "timer", "times_ejected", "unreachable")

    def __init__(self, address: str) -> None:
        self.address = address
        self.healthy = True               # by active checks; upstreams known at start begin so
        self.awaiting_first_check = False  # added by a reload: out until its first pass
        self.passes = 0                   # checks passed in a row
        self.fails = 0                    # checks failed in a row
        self.checks = dict.fromkeys(CHECK_OUTCOMES, 0)
        self.checked = False              # ever configured to be: its counters are exported
        self.last_check: str | None = None
        self.ejected_until = 0.0          # loop time; 0 while not ejected
        self.ejected_for = 0.0            # length of the current (or last) ejection
        self.times_ejected = 0            # the ejection time multiplier
        self.ejections = 0                # for the counter; never goes down
        self.back_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.unreachable = False  # ejected after a failed connect (not for its answers)
        # A connect to it failed: probed until a connect succeeds, and meanwhile out of
        # rotation (connect_ejected) or, as the last upstream of a version, handicapped.
        self.connect_failed = False
        self.connect_ejected = False
        self.connect_failed_since = 0.0  # wall clock, for /api/status


class HealthMonitor:
    """Owns every upstream's health record and the probes; ``sync`` after every config
    change (it is cheap and idempotent), ``start``/``stop`` with the data plane."""

    def __init__(self, pools: PoolRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.pools = pools
        self.loop = loop
        self.upstreams: dict[str, UpstreamHealth] = {}
        self.policies: dict[str, UpstreamPolicy] = {}
        self.balancers: dict[str, list[Balancer]] = {}  # address → live versions' upstream sets
        self.rejections: dict[tuple[str, str], int] = {}  # circuit breaker 503s by version
        # Addresses ("host:port") an operator drained: every pool of that address, in every
        # service and version, TLS or not, gets no new requests until undrained.
        self.drained: set[str] = set()
        self.running = False
        self.stopped = False  # shutting down: no new connect probes
        # Whether a failed connect takes its upstream out of rotation at once (the default;
        # upstream.eject_on_connect_failure).
        self.eject_on_connect_failure = True
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._connect_probes: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def state(self, address: str) -> UpstreamHealth:
        state = self.upstreams.get(address)
        if state is None:
            state = self.upstreams[address] = UpstreamHealth(address)
        return state

    # --- config ---------------------------------------------------------------------------

    def sync(self, config: Config, table: RouteTable, initial: bool = False) -> None:
        """Apply a config the data plane has just swapped in. Synchronous, so that an
        upstream the reload added is marked unhealthy before any request can pick it."""
        policies = resolve_policies(config)
        self.eject_on_connect_failure = config.upstream.eject_on_connect_failure
        added = set() if initial else set(policies) - set(self.policies)
        changed = {a for a, p in policies.items()
                   if a in self.policies and self.policies[a].check != p.check}
        self.policies = policies
        for service in config.services:
            if service.circuit_breaker is not None:
                for version in service.versions:  # exported from now on, even at 0
                    self.rejections.setdefault((service.name, version), 0)
        self.balancers = {}
        for route in table.routes:
            for target in route.versions.values():
                balancer: Balancer = target.balancer  # type: ignore[assignment]
                for pool in balancer.pools:
                    members = self.balancers.setdefault(pool.key, [])
                    if balancer not in members:
                        members.append(balancer)
        for address, policy in policies.items():
            self.configure(self.pools.pools[address], policy, address in added)
        for address in added:
            self.begin_slow_start(self.pools.pools[address])  # if it serves from now on
        for address, balancers in self.balancers.items():
            if self.pools.pools[address].ramp_window > 0.0:
                for balancer in balancers:  # a reload's new upstream set, with a ramp on
                    balancer.ramping = True
        for address in list(self._probes):
            wanted = policies.get(address)
            if wanted is None or wanted.check is None or address in added | changed:
                self._probes.pop(address).cancel()
        if self.running:
            self.start_probes()

    def configure(self, pool: UpstreamPool, policy: UpstreamPolicy, added: bool) -> None:
        state = self.state(pool.key)
        pool.max_requests = policy.max_requests
        pool.eject_after = policy.outlier.consecutive_failures if policy.outlier else 0
        pool.on_outlier = self.eject
        pool.on_unreachable = self.connect_failed
        if policy.outlier is None and state.ejected_until:
            self.end_ejection(pool)
        if state.connect_failed and not self.eject_on_connect_failure:
            self.connect_recovered(pool, "eject_on_connect_failure is off")
        if policy.check is None:
            state.awaiting_first_check = False
            if not state.healthy:
                state.healthy = True  # nothing would ever bring it back
                log.info("upstream %s (%s) is no longer health-checked: taking traffic",
                         pool.key, policy.used_by)
        else:
            state.checked = True
            if added:
                # A cold instance: no traffic until it has answered one check.
                state.healthy = False
                state.awaiting_first_check = True
                state.passes = state.fails = 0
        self.update(pool)

    def update(self, pool: UpstreamPool) -> None:
        state = self.state(pool.key)
        pool.available = (state.healthy and not state.ejected_until
                          and not state.connect_ejected and pool.address not in self.drained)

    # --- operator drain -------------------------------------------------------------------

    def set_drained(self, address: str, drained: bool) -> None:
        """Take an address ("host:port") out of rotation everywhere, or put it back. Its
        requests in flight finish; its idle pooled connections close now (and the ones in use
        close as their requests end: a pool that is not available pools nothing). A pool a
        reload adds later for a drained address is drained from the start (``update``)."""
        if drained == (address in self.drained):
            return
        if drained:
            self.drained.add(address)
        else:
            self.drained.remove(address)
        for pool in self.pools.pools.values():
            if pool.address != address:
                continue
            self.update(pool)
            if drained:
                pool.close_idle()
            else:
                self.begin_slow_start(pool)

    # --- active checks --------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.stopped = False
        self.start_probes()

    def start_probes(self) -> None:
        for address, policy in self.policies.items():
            if policy.check is not None and address not in self._probes:
                self._probes[address] = self.loop.create_task(self.probe_loop(address))

    async def stop(self) -> None:
        self.running = False
        self.stopped = True
        probes, self._probes = list(self._probes.values()), {}
        probes += self._connect_probes.values()
        self._connect_probes = {}
        await cancel_and_wait(*probes)
        # Ejection timers stay: they only flip flags, and a restarted monitor needs them.
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe_loop(self, address: str) -> None:
        """Check now, then every interval (measured from the start of each check)."""
        while True:
            policy = self.policies.get(address)
            if policy is None or policy.check is None:
                return
            started = self.loop.time()
            outcome = await self.probe(address, policy.check)
            self.record_check(address, policy, outcome)
            await asyncio.sleep(max(0.0, started + policy.check.interval - self.loop.time()))

    async def probe(self, address: str, check: HealthCheck) -> str:
        import aiohttp

        if self._session is None:
            # One session for every probe; a fresh connection for each (force_close), so that
            # a check proves that new connections are accepted, as a Kubernetes probe does.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": "weir-health-check"})
        pool = self.pools.pools.get(address)
        if pool is None:
            return "error"
        if isinstance(pool, Http2Pool):
            return await self.probe_http2(pool, check)
        scheme = "https" if pool.ssl is not None else "http"
        tls: dict[str, Any] = {}
        if pool.ssl is not None:
            tls = {"ssl": pool.ssl, "server_hostname": pool.server_hostname}
        try:
            async with self._session.get(f"{scheme}://{pool.address}{check.path}",
                                         allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=check.timeout),
                                         **tls) as response:
                await response.read()
                return "success" if 200 <= response.status < 400 else "failure"
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError):
            return "error"
        except Exception:  # a bug must not end this upstream's checks for good
            log.exception("health check of %s failed unexpectedly", address)
            return "error"

    async def probe_http2(self, pool: Http2Pool, check: HealthCheck) -> str:
        grpc = check.grpc.service if check.grpc is not None else None
        try:
            async with asyncio.timeout(check.timeout):
                passed = await probe_http2(pool, check.path, grpc)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "error"
        except Exception:  # a bug must not end this upstream's checks for good
            log.exception("health check of %s failed unexpectedly", pool.key)
            return "error"
        return "success" if passed else "failure"

    def record_check(self, address: str, policy: UpstreamPolicy, outcome: str) -> None:
        check = policy.check
        assert check is not None
        state = self.state(address)
        state.checks[outcome] += 1
        state.last_check = outcome
        pool = self.pools.pools.get(address)
        joined = False
        if outcome == "success":
            # An ejection ends when a check shows the upstream up again: after checks that
            # saw it down, or when it was ejected for failed connects, which a passing check
            # disproves (Envoy's successful_active_health_check_uneject_host, limited so that
            # a passing /healthz does not cut short an ejection for bad answers).
            recovered = state.fails > 0 or not state.healthy or state.unreachable
            if state.connect_failed and pool is not None:
                self.connect_recovered(pool, "its health check passes")
            state.fails = 0
            state.passes += 1
            if not state.healthy and (state.awaiting_first_check
                                      or state.passes >= check.healthy_threshold):
                state.healthy = True
                joined = True
                log.info("upstream %s (%s) is healthy: %s", address, policy.used_by,
                         "passed its first check" if state.awaiting_first_check
                         else f"{state.passes} checks passed in a row")
            state.awaiting_first_check = False
            if recovered and state.healthy and state.ejected_until and pool is not None:
                log.info("upstream %s: its health check passes again", address)
                self.end_ejection(pool)
        else:
            state.passes = 0
            state.fails += 1
            if state.healthy and state.fails >= check.unhealthy_threshold:
                state.healthy = False
                log.warning("upstream %s (%s) is unhealthy: %d checks of %s failed in a row "
                            "(last: %s); it gets no new requests", address, policy.used_by,
                            state.fails, check.path, outcome)
        if pool is not None:
            self.update(pool)
            if joined:
                self.begin_slow_start(pool)

    def set_healthy(self, address: str, healthy: bool) -> None:
        """An active-check verdict reached elsewhere (the supervisor's, under --workers)."""
        state = self.state(address)
        if state.healthy == healthy:
            return
        state.healthy = healthy
        state.awaiting_first_check = False
        pool = self.pools.pools.get(address)
        if pool is not None:
            self.update(pool)
            if healthy:
                self.begin_slow_start(pool)  # back from failing checks

    # --- failed connects ------------------------------------------------------------------

    def connect_failed(self, pool: UpstreamPool) -> None:
        """Called by a pool when a connect to it failed (refused, unreachable, timed out, TLS
        handshake failed). Nothing of a request reached the app, and the next connect would
        most likely fail the same way, so by default the upstream is out of rotation at once
        and a background connect probe brings it back, as a restarting instance comes and
        goes. The last upstream of a version stays in, handicapped so that the balancer does
        not prefer it for failing fast."""
        state = self.state(pool.key)
        if state.ejected_until:
            # Ejected for other failures (a crash resets what was in flight), and now it
            # refuses connects: a passing health check may end that ejection too.
            state.unreachable = True
        if state.connect_failed or not self.eject_on_connect_failure:
            return
        state.connect_failed = True
        state.connect_failed_since = time.time()
        policy = self.policies.get(pool.key)
        used_by = policy.used_by if policy else "no longer configured"
        if self.last_in_rotation(pool):
            pool.penalty = FAILING_PENALTY  # cleared by the next connect that succeeds
            log.warning("upstream %s (%s): a connect to it failed; it stays in rotation as "
                        "the last upstream of its version, probed until a connect succeeds",
                        pool.key, used_by)
        else:
            state.connect_ejected = True
            self.update(pool)
            pool.close_idle()  # the instance went away: what it left open is no use
            log.warning("upstream %s (%s) is out of rotation: a connect to it failed; "
                        "probing it until a connect succeeds", pool.key, used_by)
        if not self.stopped and pool.key not in self._connect_probes:
            self._connect_probes[pool.key] = self.loop.create_task(self.probe_connect(pool))

    def last_in_rotation(self, pool: UpstreamPool) -> bool:
        """Whether some version using this upstream would have none left without it."""
        for balancer in self.balancers.get(pool.key, ()):
            if not any(p.available for p in balancer.pools if p is not pool):
                return True
        return False

    async def probe_connect(self, pool: UpstreamPool) -> None:
        """Connect, close, and bring the upstream back at the first connect that succeeds."""
        state = self.state(pool.key)
        delay = CONNECT_PROBE_FIRST
        try:
            while state.connect_failed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_PROBE_MAX)
                if not state.connect_failed:
                    return  # a passing health check was quicker
                try:
                    conn = await pool.connect()
                except (OSError, TimeoutError):
                    continue
                conn.close()
                self.connect_recovered(pool, "a connect probe succeeded")
        except Exception:  # a bug must not leave the upstream out for good
            log.exception("connect probe of %s failed unexpectedly; it is back in rotation",
                          pool.key)
            self.connect_recovered(pool, "its probe failed")
        finally:
            if self._connect_probes.get(pool.key) is asyncio.current_task():
                del self._connect_probes[pool.key]

    def connect_recovered(self, pool: UpstreamPool, why: str) -> None:
        state = self.state(pool.key)
        pool.penalty = 0
        if not state.connect_failed:
            return
        state.connect_failed = False
        out_for = time.time() - state.connect_failed_since
        if state.connect_ejected:
            state.connect_ejected = False
            self.update(pool)
            log.info("upstream %s is back in rotation after %.1fs: %s", pool.key, out_for, why)
            self.begin_slow_start(pool)
        else:
            log.info("upstream %s accepts connections again after %.1fs: %s", pool.key,
                     out_for, why)

    # --- outlier detection ----------------------------------------------------------------

    def eject(self, pool: UpstreamPool) -> None:
        """Called by a pool on its ``consecutive_failures``-th failure in a row."""
        pool.failures = 0  # the next ejection needs as many failures again
        policy = self.policies.get(pool.key)
        state = self.state(pool.key)
        if policy is None or policy.outlier is None or state.ejected_until:
            return
        outlier = policy.outlier
        for balancer in self.balancers.get(pool.key, ()):
            allowed = max(1, len(balancer.pools) * outlier.max_ejection_percent // 100)
            ejected = sum(1 for p in balancer.pools if self.state(p.key).ejected_until)
            if ejected >= allowed:
                log.debug("not ejecting %s: %d of its version's %d upstreams already are",
                          pool.key, ejected, len(balancer.pools))
                return
        now = self.loop.time()
        if state.times_ejected and state.back_since:
            # Forgiveness: one off the multiplier for every max_ejection_time spent back in.
            served = int((now - state.back_since) // outlier.max_ejection_time)
            state.times_ejected = max(0, state.times_ejected - served)
        state.times_ejected += 1
        state.ejections += 1
        state.ejected_for = min(outlier.base_ejection_time * state.times_ejected,
                                outlier.max_ejection_time)
        state.ejected_until = now + state.ejected_for
        state.unreachable = pool.unreachable
        state.timer = self.loop.call_later(state.ejected_for, self.end_ejection, pool)
        self.update(pool)
        log.warning("upstream %s (%s) ejected for %.3gs after %d failures in a row "
                    "(ejection %d)", pool.key, policy.used_by, state.ejected_for,
                    outlier.consecutive_failures, state.times_ejected)

    def end_ejection(self, pool: UpstreamPool) -> None:
        state = self.state(pool.key)
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        state.ejected_until = 0.0
        state.back_since = self.loop.time()
        pool.failures = 0
        self.update(pool)
        policy = self.policies.get(pool.key)
        log.info("upstream %s (%s) is back from ejection", pool.key,
                 policy.used_by if policy else "no longer configured")
        self.begin_slow_start(pool)

    # --- slow start -----------------------------------------------------------------------

    def begin_slow_start(self, pool: UpstreamPool) -> None:
        """An upstream joins (added, undrained, back from an ejection or failing checks): with
        ``slow_start``, and others of its version serving, its share ramps over the window."""
        policy = self.policies.get(pool.key)
        if policy is None or policy.slow_start is None or not pool.available:
            return
        serving = [b for b in self.balancers.get(pool.key, ())
                   if any(p.available for p in b.pools if p is not pool)]
        if not serving:
            return  # alone in its version: a ramp would only hold requests back
        pool.ramp_start = pool.corker.now()
        pool.ramp_window = policy.slow_start.window
        for balancer in serving:
            balancer.ramping = True
        log.info("upstream %s (%s): slow start, its share grows over %gs", pool.key,
                 policy.used_by, pool.ramp_window)

    # --- no upstream to pick --------------------------------------------------------------

    def unavailable(self, service: str, version: str, balancer: Balancer) -> tuple[str, bool]:
        """Why a version has no upstream for a request: the 503's message, and whether it
        should carry Retry-After (only full upstreams, which free up as requests finish)."""
        pools = balancer.pools
        where = f"service {service!r} version {version!r}"
        if balancer.all_full():
            key = (service, version)
            self.rejections[key] = self.rejections.get(key, 0) + 1
            up = [p for p in pools if p.available]
            return (f"{where}: every upstream that is up ({len(up)} of {len(pools)}) has "
                    f"{max(p.max_requests for p in up)} requests in flight, the circuit "
                    f"breaker's limit; try again shortly", True)
        unhealthy = sum(1 for p in pools if not self.state(p.key).healthy)
        ejected = sum(1 for p in pools if self.state(p.key).ejected_until)
        unreachable = sum(1 for p in pools if self.state(p.key).connect_ejected)
        drained = sum(1 for p in pools if p.address in self.drained)
        reasons = []
        if unhealthy:
            reasons.append(f"{unhealthy} failing health checks")
        if ejected:
            reasons.append(f"{ejected} ejected after consecutive failures")
        if unreachable:
            reasons.append(f"{unreachable} refusing connections")
        if drained:
            reasons.append(f"{drained} drained")
        return (f"{where} has no healthy upstream ({len(pools)} configured: "
                f"{', '.join(reasons)})", False)

    # --- reporting ------------------------------------------------------------------------

    def describe(self, address: str) -> dict[str, Any]:
        """One upstream's health for /api/status."""
        state = self.state(address)
        pool = self.pools.pools.get(address)
        remaining = state.ejected_until - self.loop.time() if state.ejected_until else 0.0
        policy = self.policies.get(address)
        return {
            "healthy": state.healthy,
            "available": pool.available if pool is not None else False,
            "health_checked": policy is not None and policy.check is not None,
            "last_check": state.last_check,
            "checks": dict(state.checks),
            "drained": pool is not None and pool.address in self.drained,  # weir drain
            "slow_start": ({"window": pool.ramp_window,
                            "factor": round(pool.ramp_factor(self.loop.time()), 3)}
                           if pool is not None and pool.ramp_window > 0.0 else None),
            "connect_failed": state.connect_failed,
            "connect_ejected": state.connect_ejected,
            "connect_failed_since": state.connect_failed_since if state.connect_failed else None,
            "ejected": bool(state.ejected_until),
            "ejected_until": time.time() + remaining if state.ejected_until else None,
            "ejection_seconds": state.ejected_for if state.ejected_until else None,
            "times_ejected": state.times_ejected,
            "ejections": state.ejections,
            "consecutive_failures": pool.failures if pool is not None else 0,
            "inflight": pool.inflight if pool is not None else 0,
            "max_requests": (pool.max_requests if pool is not None
                             and pool.max_requests < UNLIMITED else None),
        }


def resolve_policies(config: Config) -> dict[str, UpstreamPolicy]:
    """Each configured address's settings; the first version listing an address sets them."""
    first: dict[str, tuple[HealthCheck | None, OutlierDetection | None, int,
                           SlowStart | None]] = {}
    users: dict[str, list[str]] = {}
    for service in config.services:
        breaker = service.circuit_breaker
        max_requests = breaker.max_requests if breaker else UNLIMITED
        for name, version in service.versions.items():
            check = service.health_check_for(name)
            for address in version.upstreams:
                key = pool_key(address, version.tls, version.protocol)  # separate pools
                users.setdefault(key, []).append(f"{service.name}/{name}")
                first.setdefault(key, (check, service.outlier_detection, max_requests,
                                       service.slow_start_for(name)))
    return {address: UpstreamPolicy(*settings, ", ".join(users[address]))
            for address, settings in first.items()}
