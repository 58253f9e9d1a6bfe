"""The control plane: the one owner of what changes at run time.

Config reloads (file watch, SIGHUP, admin API) and runtime changes (weights, switches) all go
through here. Each builds a new route table off to the side and hands it to the data plane in
one assignment, persists runtime changes, and records what happened for /api/status and the
metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, load_config
from .metrics import Metrics
from .state import SOURCE_API, RuntimeState

if TYPE_CHECKING:
    from .app import ProxyServer

log = logging.getLogger("weir.control")

# A file that fails to parse right after a change may be half-written by an editor: look
# again after this long before calling the reload a failure.
SETTLE_SECONDS = 0.3


class UnknownName(LookupError):
    """A service or version the config does not have (the admin API answers 404)."""


class ControlPlane:
    def __init__(self, config_path: Path | None, config: Config,
                 loop: asyncio.AbstractEventLoop) -> None:
        from .app import ProxyServer

        self.config_path = config_path
        self.config = config
        self.loop = loop
        self.metrics = Metrics()
        self.state = RuntimeState(Path(config.state_file) if config.state_file else None)
        self.state.load()
        if self.state.reconcile(config):
            self.state.save()
        self.generation = 1
        self.proxy: ProxyServer = ProxyServer(config, loop, self.state.weights_override())
        self.metrics.attach(self.proxy)
        self.last_reload: dict[str, Any] = {"generation": 1, "outcome": "success",
                                            "trigger": "start", "at": time.time(),
                                            "errors": []}
        self._last_text: str | None = self._read_text()
        self._reload_lock = asyncio.Lock()
        self._state_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stop_watch = asyncio.Event()

    # --- config reloads -------------------------------------------------------------------

    def _read_text(self) -> str | None:
        if self.config_path is None:
            return None
        try:
            return self.config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Re-read the config file. An invalid file changes nothing but the record of it."""
        async with self._reload_lock:
            if self.config_path is None:
                raise ConfigError("<config>", ["no config file to reload"])
            self._last_text = self._read_text()
            try:
                config = load_config(self.config_path)
            except ConfigError as exc:
                self.metrics.config_reloads.labels("failure").inc()
                self.last_reload = {"generation": self.generation, "outcome": "failure",
                                    "trigger": trigger, "at": time.time(),
                                    "errors": exc.errors}
                log.error("config reload (%s) failed; still serving generation %d:\n%s",
                          trigger, self.generation, exc)
                return self.last_reload
            self._warn_about_restart_only_changes(config)
            dropped = self.state.reconcile(config)
            if dropped:
                await self._save_state()
            self.generation += 1
            self.config = config
            self.proxy.apply_config(config, self.state.weights_override(), self.generation)
            self.metrics.config_reloads.labels("success").inc()
            self.last_reload = {"generation": self.generation, "outcome": "success",
                                "trigger": trigger, "at": time.time(), "errors": []}
            log.info("config reloaded (%s): generation %d", trigger, self.generation)
            return self.last_reload

    def _warn_about_restart_only_changes(self, config: Config) -> None:
        running = self.proxy.config
        if config.listen != running.listen or config.admin.listen != running.admin.listen:
            log.warning("listen addresses changed in the config file; they take effect on "
                        "restart (still listening on %s, admin %s)", running.listen,
                        running.admin.listen)

    def start_watching(self) -> None:
        if self.config_path is not None and self.config.watch:
            self._watcher = self.loop.create_task(self._watch(self.config_path.resolve()))

    async def stop_watching(self) -> None:
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

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
        """Reload after a change, but only once the file has stopped changing: an editor
        that saves in two steps must not produce a failed reload for the first step."""
        text = self._read_text()
        while text != self._last_text:
            if text is not None and self._parses(text):
                break
            await asyncio.sleep(SETTLE_SECONDS)
            again = self._read_text()
            if again == text:
                break  # stable, and still invalid: report it, once
            text = again
        else:
            return  # touched but unchanged
        await self.reload("file")

    def _parses(self, text: str) -> bool:
        import yaml

        from .config import parse_config

        try:
            parse_config(yaml.safe_load(text), str(self.config_path))
        except (ConfigError, yaml.YAMLError):
            return False
        return True

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
        self.state.set_weights(self.config, name, weights, source)
        self.proxy.apply_config(self.config, self.state.weights_override(), self.generation)
        await self._save_state()
        applied = self.state.weights[name].weights
        log.info("service %s: weights set to %s by %s", name, applied, source)
        return applied

    async def switch(self, name: str, version: str, source: str = SOURCE_API) -> dict[str, int]:
        service = self.service(name)
        if version not in service.versions:
            raise UnknownName(f"service {name!r} has no version {version!r} "
                              f"(versions: {', '.join(service.versions)})")
        return await self.set_weights(name, {version: 100}, source)

    async def _save_state(self) -> None:
        async with self._state_lock:
            await asyncio.to_thread(self.state.save)

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
            })
        draining = [{"upstream": p.address, "service": p.drain_label[0],
                     "version": p.drain_label[1], "open": p.inflight}
                    for p in self.proxy.pools.pools.values() if p.draining]
        return {
            "generation": self.generation,
            "config_file": str(self.config_path) if self.config_path else None,
            "state_file": str(self.state.path) if self.state.path else None,
            "last_reload": self.last_reload,
            "ready": not self.proxy.draining,
            "services": services,
            "draining": draining,
        }
