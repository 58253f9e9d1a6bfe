"""The control plane: the one owner of what changes at run time.

Config reloads (file watch, SIGHUP, admin API) and runtime changes (weights, switches) all go
through here. Each builds a new route table off to the side and hands it to the data plane in
one assignment, persists runtime changes, and records what happened for /api/status and the
metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import request_path_build
from .config import Config, ConfigError, load_config
from .metrics import Metrics
from .rollout import RolloutController
from .state import SOURCE_API, RuntimeState
from .store import RemoteState, StateStore, StoreConflict, make_store
from .tasks import cancel_and_wait
from .tls import TLSConfigError, compile_tls

if TYPE_CHECKING:
    from .app import ProxyServer

log = logging.getLogger("weir.control")

# A file that fails to parse right after a change may be half-written by an editor: look
# again after this long before calling the reload a failure.
SETTLE_SECONDS = 0.3


class UnknownName(LookupError):
    """A service or version the config does not have (the admin API answers 404)."""


class StateWriteError(RuntimeError):
    """A runtime change that could not be persisted, and so was not made (500)."""


class StateConflictError(StateWriteError):
    """Another instance changed the same state meanwhile; nothing changed, try again (409)."""


class UnknownUpstream(UnknownName):
    """An address that is no upstream of the config (404); ``known`` lists the ones that are."""

    def __init__(self, message: str, known: list[str]) -> None:
        super().__init__(message)
        self.known = known


class DrainRefused(RuntimeError):
    """Draining would leave a version that has weight with no upstream (409, unless forced);
    ``versions`` names them as "service/version"."""

    def __init__(self, message: str, versions: list[str]) -> None:
        super().__init__(message)
        self.versions = versions


class ControlPlane:
    def __init__(self, config_path: Path | None, config: Config,
                 loop: asyncio.AbstractEventLoop,
                 proxy_class: type[ProxyServer] | None = None,
                 store: StateStore | None = None) -> None:
        """``store``: an opened store (serve() opens a shared one before this); by default
        the state file, read here. ``proxy_class``: the supervisor's under --workers."""
        from .app import ProxyServer

        self.config_path = config_path
        self.config = config
        self.loop = loop
        self.metrics = Metrics()
        self.store = store if store is not None else make_store(config)
        self.state = RuntimeState(self.store.path)
        self.store.load_into(self.state)
        self._reconciled_at_start = bool(self.state.reconcile(config))
        if self._reconciled_at_start and self.store.kind == "file":
            self.state.save()
        self.generation = 1
        self.previews: dict[str, tuple[str, str]] = {}  # blue/green preview routes
        # proxy_class: workers.SupervisorProxy under `weir run --workers N`, which forwards
        # every change to the worker processes and sums their statistics.
        self.proxy: ProxyServer = (proxy_class or ProxyServer)(
            config, loop, self.state.weights_override())
        self.metrics.attach(self.proxy)
        self.rollouts = RolloutController(self)
        self.metrics.attach_rollouts(self.rollouts)
        if self.previews:
            self.apply()
        self.apply_drained()
        self.last_reload: dict[str, Any] = {"generation": 1, "outcome": "success",
                                            "trigger": "start", "at": time.time(),
                                            "errors": []}
        self._last_text: str | None = self._read_text()
        self._reload_lock = asyncio.Lock()
        self._state_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop_watch = asyncio.Event()

    # --- config reloads -------------------------------------------------------------------

    def _read_text(self) -> str | None:
        if self.config_path is None:
            return None
        try:
            return self.config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    async def reload(self, trigger: str, unless_unchanged: bool = False) -> dict[str, Any]:
        """Re-read the config file. An invalid file changes nothing but the record of it.
        ``unless_unchanged``: only if its text differs from what was last read (decided under
        the lock, so a watcher pass and an API change never both take in the same edit)."""
        async with self._reload_lock:
            if self.config_path is None:
                raise ConfigError("<config>", ["no config file to reload"])
            text = self._read_text()
            if unless_unchanged and text == self._last_text:
                return self.last_reload
            self._last_text = text
            try:
                config = load_config(self.config_path)
                # Loaded once more for use: these are the contexts swapped in below, so what
                # serves is what was checked, even if the files change again meanwhile.
                try:
                    tls = compile_tls(config)
                except TLSConfigError as exc:
                    raise ConfigError(str(self.config_path), exc.errors) from None
            except ConfigError as exc:
                self.metrics.config_reloads.labels("failure").inc()
                self.last_reload = {"generation": self.generation, "outcome": "failure",
                                    "trigger": trigger, "at": time.time(),
                                    "errors": exc.errors}
                log.error("config reload (%s) failed; still serving generation %d:\n%s",
                          trigger, self.generation, exc)
                return self.last_reload
            self._warn_about_restart_only_changes(config)
            if self.state.reconcile(config):
                try:
                    await self.save_state()
                except OSError as exc:
                    # On restart the same reconciliation drops the same overrides again.
                    log.error("could not write the state file %s: %s", self.state.path, exc)
            self.generation += 1
            self.config = config
            self.proxy.use_tls(tls, config)
            self.rollouts.sync()
            self.apply()
            self.metrics.config_reloads.labels("success").inc()
            self.last_reload = {"generation": self.generation, "outcome": "success",
                                "trigger": trigger, "at": time.time(), "errors": []}
            log.info("config reloaded (%s): generation %d", trigger, self.generation)
            return self.last_reload

    def apply(self) -> None:
        """Compile the config with the runtime changes and hand it to the data plane."""
        self.proxy.apply_config(self.config, self.state.weights_override(), self.generation,
                                self.previews)

    def reload_soon(self, trigger: str) -> None:
        """Reload from a signal handler, which cannot await."""
        task = self.loop.create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn_about_restart_only_changes(self, config: Config) -> None:
        running = self.proxy.config
        if config.listen != running.listen or config.admin.listen != running.admin.listen:
            log.warning("listen addresses changed in the config file; they take effect on "
                        "restart (still listening on %s, admin %s)", running.listen,
                        running.admin.listen)
        if config.state_store != running.state_store:
            log.warning("state_store changed in the config file; it takes effect on restart")
        if (config.tls is None) != (self.proxy.listener_tls is None):
            log.warning("tls was %s the config file; the listener keeps speaking %s until a "
                        "restart", "added to" if config.tls else "removed from",
                        "HTTPS" if self.proxy.listener_tls else "plain HTTP")

    def start_sync(self) -> None:
        """Follow a shared store: changes other instances make are applied here too."""
        self.store.start(self.state, self._adopt, self._state_lock)
        if self._reconciled_at_start and self.store.kind != "file":
            self._reconciled_at_start = False
            self.rollouts.save_soon()  # the dropped overrides, on the controller's clock

    async def _adopt(self, remote: RemoteState, rollouts_changed: set[str]) -> None:
        """Another instance changed the shared state: take it (called with the state lock
        held, so no local change is half-made meanwhile). Only the rollout records that
        changed there are taken: the controller's own record may be ahead of the store."""
        weights, rollouts, drained = remote
        self.state.weights = dict(weights)
        self.state.drained = dict(drained)
        # An override that does not fit this instance's config is not applied here; it is
        # left in the store for the instances whose config it fits.
        self.state.reconcile(self.config)
        for name in rollouts_changed:
            if name in rollouts:
                self.state.rollouts[name] = rollouts[name]
            else:
                self.state.rollouts.pop(name, None)
        self.rollouts.adopt(rollouts_changed)
        self.apply()
        self.apply_drained()
        log.info("state store: applied a change from another instance (weights %s)",
                 self.state.weights_override())

    def start_watching(self) -> None:
        if self.config_path is not None and self.config.watch:
            # Not resolved: a Kubernetes ConfigMap mounts the file through a '..data' symlink
            # that is swapped on update, so the directory to watch is the one the path names.
            self._watcher = self.loop.create_task(self._watch(self.config_path.absolute()))

    async def stop_watching(self) -> None:
        self._stop_watch.set()
        await cancel_and_wait(self._watcher)

    async def _watch(self, path: Path) -> None:
        from watchfiles import awatch

        def relevant(_change: object, changed: str) -> bool:
            # The file itself, or a Kubernetes ConfigMap's '..data' symlink swap.
            name = Path(changed).name
            return name == path.name or name.startswith("..")

        try:
            async for _ in awatch(path.parent, watch_filter=relevant, recursive=False,
                                  stop_event=self._stop_watch, debounce=400, step=50):
                await self._reload_when_settled()
        except Exception:  # the watcher must never take the proxy down
            log.exception("config file watcher stopped; SIGHUP and POST /api/reload still work")

    async def _reload_when_settled(self) -> None:
        """Reload after a change, but only once the file has stopped changing: an editor that
        saves in two steps must not get its first step applied, nor reported as a failure."""
        text = self._read_text()
        while True:
            await asyncio.sleep(SETTLE_SECONDS)
            again = self._read_text()
            if again == text:
                break
            text = again
        if text != self._last_text:
            await self.reload("file", unless_unchanged=True)

    async def take_in_file_changes(self) -> None:
        """Before an operator's change through the API (the admin API calls it once per
        change, before the change looks anything up): a config file edited on disk since it
        was last read is reloaded first, so the two apply in the order they were made; the
        watcher's later pass then finds nothing new. Without a watcher (``watch: false``)
        edits wait for a reload as always. An invalid file is recorded as a failed reload and
        does not stand in the way of the change."""
        if self._watcher is None or self._watcher.done():
            return
        await self.reload("file", unless_unchanged=True)

    # --- runtime changes ------------------------------------------------------------------

    def service(self, name: str) -> Any:
        for service in self.config.services:
            if service.name == name:
                return service
        raise UnknownName(f"no service named {name!r}")

    async def set_weights(self, name: str, weights: dict[str, int],
                          source: str = SOURCE_API) -> dict[str, int]:
        """Replace a service's weights (versions left out get 0) and persist the change."""
        service = self.service(name)
        unknown = sorted(set(weights) - set(service.versions))
        if unknown:
            raise UnknownName(f"service {name!r} has no version {unknown[0]!r} "
                              f"(versions: {', '.join(service.versions)})")
        async with self._state_lock:  # no change from another instance lands meanwhile
            previous = self.state.weights.get(name)
            self.state.set_weights(self.config, name, weights, source)
            await self._persist_or_undo(restore(self.state.weights, name, previous))
            self.apply()
            applied = self.state.weights[name].weights
        log.info("service %s: weights set to %s by %s", name, applied, source)
        return applied

    async def switch(self, name: str, version: str, source: str = SOURCE_API) -> dict[str, int]:
        service = self.service(name)
        if version not in service.versions:
            raise UnknownName(f"service {name!r} has no version {version!r} "
                              f"(versions: {', '.join(service.versions)})")
        return await self.set_weights(name, {version: 100}, source)

    async def save_state(self) -> None:
        async with self._state_lock:
            await self.store.save(self.state)

    async def _persist_or_undo(self, undo: Callable[[], None]) -> None:
        """Save a runtime change just made to ``self.state`` (under the state lock). Persisted
        first: a change that would not survive a restart (or reach the other instances) is
        refused rather than silently applied, so on failure ``undo`` puts the state back and
        the caller's change is reported as not made."""
        try:
            await self.store.save(self.state)
        except OSError as exc:
            undo()
            if isinstance(exc, StoreConflict):
                raise StateConflictError(f"nothing changed: {exc}") from exc
            where = (f"the state file {self.state.path}" if self.store.kind == "file"
                     else f"the {self.store.kind} state store")
            raise StateWriteError(f"could not write {where}: {exc.strerror or exc}; "
                                  f"nothing changed") from exc

    # --- draining one app instance (weir drain) -------------------------------------------

    def upstream_users(self) -> dict[str, list[str]]:
        """Every upstream address of the config → the "service/version"s that list it."""
        users: dict[str, list[str]] = {}
        for service in self.config.services:
            for name, version in service.versions.items():
                for address in version.upstreams:
                    used = users.setdefault(address, [])
                    if f"{service.name}/{name}" not in used:
                        used.append(f"{service.name}/{name}")
        return users

    def apply_drained(self) -> None:
        """Hand the drained set to the data plane (and, under --workers, to every worker)."""
        self.proxy.apply_drained(set(self.state.drained))

    def inflight_to(self, address: str) -> int:
        """Requests in flight to an address, over all its pools (under --workers, the sum of
        the workers' last reports)."""
        return sum(p.inflight for p in self.proxy.pools.pools.values() if p.address == address)

    def drained_entry(self, address: str) -> dict[str, Any]:
        workers = getattr(self.proxy, "workers", None)  # only under `weir run --workers N`
        return {"upstream": address, "used_by": self.upstream_users().get(address, []),
                "inflight": self.inflight_to(address),
                "drained_at": self.state.drained.get(address),
                # Under --workers: whether every worker has reported since it applied the
                # drain, so that "inflight" counts everything still open (always in one
                # process). `weir drain --wait` waits for this too.
                "confirmed": workers is None or workers.confirmed_drained(address)}

    def drained_status(self) -> list[dict[str, Any]]:
        return [self.drained_entry(address) for address in sorted(self.state.drained)]

    def _stranded(self, address: str) -> list[str]:
        """The versions that have weight now (runtime weights included) and would be left
        with no upstream that is not drained, were ``address`` drained too."""
        drained = set(self.state.drained) | {address}
        stranded = []
        for route in self.proxy.table.routes:
            for name, target in route.versions.items():
                if (route.weights.get(name, 0) > 0 and address in target.upstreams
                        and all(u in drained for u in target.upstreams)):
                    stranded.append(f"{route.name}/{name}")
        return stranded

    async def drain(self, address: str, force: bool = False) -> dict[str, Any]:
        """Take an upstream address out of rotation in every service and version, persisted.
        Its requests in flight finish; its idle pooled connections close."""
        users = self.upstream_users()
        if address not in users:
            known = sorted(users)
            raise UnknownUpstream(f"no upstream {address!r} in the config (known upstreams: "
                                  f"{', '.join(known)})", known)
        async with self._state_lock:  # no change from another instance lands meanwhile
            changed = address not in self.state.drained
            stranded = self._stranded(address)
            if changed:
                if stranded and not force:
                    which = " and ".join("service {!r} version {!r}".format(*v.split("/", 1))
                                         for v in stranded)
                    raise DrainRefused(
                        f"{address} is the last upstream in rotation of {which}, which "
                        f"{'has' if len(stranded) == 1 else 'have'} weight: draining it would "
                        f"leave no upstream to answer (move the weight first, or force)",
                        stranded)
                self.state.drained[address] = time.time()
                await self._persist_or_undo(restore(self.state.drained, address, None))
                self.apply_drained()
        entry = self.drained_entry(address)
        if changed:
            log.warning("upstream %s drained (used by %s): no new requests; %d in flight%s",
                        address, ", ".join(entry["used_by"]), entry["inflight"],
                        f"; forced: {', '.join(stranded)} left with no upstream"
                        if stranded else "")
        return {**entry, "changed": changed, "without_upstream": stranded,
                "drained": sorted(self.state.drained)}

    async def undrain(self, address: str) -> dict[str, Any]:
        """Put a drained address back into rotation everywhere, persisted."""
        users = self.upstream_users()
        async with self._state_lock:
            previous = self.state.drained.get(address)
            if previous is None and address not in users:
                known = sorted(users)
                raise UnknownUpstream(f"no upstream {address!r} in the config nor drained "
                                      f"(known upstreams: {', '.join(known)})", known)
            if previous is not None:
                del self.state.drained[address]
                await self._persist_or_undo(restore(self.state.drained, address, previous))
                self.apply_drained()
        if previous is not None:
            log.warning("upstream %s undrained (used by %s): back in rotation", address,
                        ", ".join(users.get(address, [])) or "no service")
        return {"upstream": address, "used_by": users.get(address, []),
                "changed": previous is not None, "drained": sorted(self.state.drained)}

    # --- reporting ------------------------------------------------------------------------

    def _mirror_status(self, service: str, version: str, percent: float) -> dict[str, Any]:
        stats = self.proxy.stats.for_mirror(service, version)
        return {"version": version, "percent": percent, "outcomes": dict(stats.outcomes),
                "comparisons": dict(stats.comparisons),
                "last_mismatches": list(stats.mismatches)}

    def status(self) -> dict[str, Any]:
        table = self.proxy.table
        services = []
        for service in self.config.services:
            route = next(r for r in table.routes if r.name == service.name)
            source = self.state.weights_source(service.name)
            versions = {}
            for name, target in route.versions.items():
                pools = target.balancer.pools
                versions[name] = {
                    "upstreams": list(target.upstreams),
                    "weight": route.weights.get(name, 0),
                    "inflight": sum(p.inflight for p in pools),
                    "draining": sum(p.inflight for p in pools if p.draining),
                    "upstream_health": {p.key: self.proxy.health.describe(p.key)
                                        for p in pools},
                    # Each upstream's expected part of the version's requests (slow start
                    # holds a joining one's back; one out of rotation gets none).
                    "upstream_share": {key: round(share, 3) for key, share
                                       in target.balancer.shares().items()},
                }
            services.append({
                "name": service.name,
                "match": {"hosts": list(service.match.hosts),
                          "path_prefix": service.match.path_prefix},
                "weights": dict(route.weights),
                "weights_source": source,
                "versions": versions,
                "rules": len(service.rules),
                "sticky": service.sticky is not None,
                "mirror": [self._mirror_status(service.name, m.version, m.percent)
                           for m in service.mirror],
                "rollout": (self.rollouts.rollouts[service.name].status()
                            if service.name in self.rollouts.rollouts else None),
            })
        draining = [{"upstream": p.address, "service": p.drain_label[0],
                     "version": p.drain_label[1], "open": p.inflight}
                    for p in self.proxy.pools.pools.values() if p.draining]
        status: dict[str, Any] = {
            "generation": self.generation,
            "request_path": request_path_build(),
            "config_file": str(self.config_path) if self.config_path else None,
            "state_file": str(self.state.path) if self.state.path else None,
            "state_store": self.store.describe(),
            "last_reload": self.last_reload,
            "ready": not self.proxy.draining,
            "services": services,
            "draining": draining,
            "drained": self.drained_status(),
        }
        workers = getattr(self.proxy, "workers", None)  # only under `weir run --workers N`
        if workers is not None:
            status["workers"] = workers.describe()
        return status


def restore(entries: dict[str, Any], key: str, previous: Any) -> Callable[[], None]:
    """What undoes setting ``entries[key]``: its previous value back, or the key gone when
    it had none."""
    def undo() -> None:
        if previous is None:
            entries.pop(key, None)
        else:
            entries[key] = previous
    return undo
