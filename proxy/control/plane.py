"""The control plane: the one owner of what changes at run time.

Config reloads (file watch, SIGHUP, admin API) and runtime changes (weights, switches) all go
through here. Each builds a new route table off to the side and hands it to the data plane in
one assignment, persists runtime changes, and records what happened for /api/status and the
metrics. A change made through the admin API names who made it (``by``, the token's name):
logged, and kept in the last actions /api/status shows (control/audit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..config.loader import (
    config_from_bytes,
    format_validation_errors,
    load_config,
    read_config_file,
)
from ..config.model import Config, ConfigError, Mirror
from ..config.tls import TLSConfigError, compile_tls
from ..dataplane.build import request_path_build
from ..errors import StateWriteError, UnknownName
from ..rollout.controller import RolloutController, ServiceRollout, fingerprint
from ..tasks import cancel_and_wait
from .audit import ActionLog
from .metrics import Metrics
from .redisstore import redacted
from .state import (
    SOURCE_API,
    RuntimeState,
    build_version,
    effective_config,
    merged_override,
)
from .store import RemoteState, StateStore, StoreConflict, make_store

if TYPE_CHECKING:
    from ..dataplane.proxyserver import ProxyServer

log = logging.getLogger("weir.control")

# A file that fails to parse right after a change may be half-written by an editor: look
# again after this long before calling the reload a failure.
SETTLE_SECONDS = 0.3

# Runtime changes in force but not saved (a full disk, a read-only folder, Redis away) are
# saved again after this long, doubling up to the second; any new change tries at once.
SAVE_RETRY_FIRST = 0.5
SAVE_RETRY_MAX = 5.0
# How long an API answer waits for its change's save, to say whether it was saved.
SAVE_WAIT = 3.0
# A rollout's latest events in /api/status (the rollout's own endpoint has all it keeps).
STATUS_EVENTS = 10


class StateConflictError(StateWriteError):
    """Another instance changed the same state meanwhile; nothing changed, try again (409)."""


class UnknownUpstream(UnknownName):
    """An address that is no upstream of the config (404); ``known`` lists the ones that are."""

    def __init__(self, message: str, known: list[str]) -> None:
        super().__init__(message)
        self.known = known


class InvalidRelease(ValueError):
    """A release's revision or upstreams the config's model refuses (400), with its message."""


class DrainRefused(RuntimeError):
    """Draining would leave a version that has weight with no upstream (409, unless forced);
    ``versions`` names them as "service/version"."""

    def __init__(self, message: str, versions: list[str]) -> None:
        super().__init__(message)
        self.versions = versions


class ControlPlane:
    def __init__(self, config_path: Path | None, config: Config, proxy: ProxyServer,
                 store: StateStore | None = None) -> None:
        """``proxy``: the data plane this control plane drives, built from the same config
        (under --workers, the supervisor's, which forwards every change to the workers and
        sums their statistics); the runtime state's weights are applied to it here.
        ``store``: an opened store (serve() opens a shared one before this); by default the
        state file, read here.

        ``config`` is the file's (kept as ``file_config``); ``self.config`` is what is served
        and what the controller reads: the file's with the releases set through the API
        applied (see use_effective_config)."""
        self.config_path = config_path
        self.file_config = config
        self.config = config
        # A rollout's mirror step in progress, per service: copies to its canary on top of
        # the file's mirror list (see set_rollout_mirror).
        self.rollout_mirrors: dict[str, Mirror] = {}
        self.loop = proxy.loop
        self.metrics = Metrics()
        self.store = store if store is not None else make_store(config)
        self.state = RuntimeState(self.store.path)
        self.store.load_into(self.state)
        self._reconciled_at_start = bool(self.state.reconcile(config))
        self.use_effective_config()
        self._state_lock = asyncio.Lock()  # one change or save of the runtime state at a time
        # Saving: changes made in memory are counted, and each save records up to which
        # count it wrote; the state is unsaved while the two differ after a failed save.
        self.unsaved: dict[str, Any] | None = None  # since, error, attempts (for status)
        self.save_failures = 0
        self._changes = 0
        self._saved_upto = 0
        self._last_save_ok = True
        self._saver: asyncio.Task[None] | None = None
        self._wake_saver = asyncio.Event()
        self._save_attempted = asyncio.Event()
        if self._reconciled_at_start and self.store.kind == "file":
            self.changed()  # a shared store's is saved once it is followed (start_sync)
        self.generation = 1
        # What the listeners, the state store, the watcher and logging were set up from: a
        # reload compares its restart-only settings with these (see restart_required).
        self.started_with = config
        self.restart_required: list[str] = []
        self.previews: dict[str, tuple[str, str]] = {}  # blue/green preview routes
        # The changes made through the admin API and who made them, for /api/status.
        self.actions = ActionLog()
        self.proxy = proxy
        self.metrics.attach(self.proxy)
        self.rollouts = RolloutController(self)
        self.metrics.attach_control(self)
        if self.state.weights or self.previews or self.config is not config:
            self.apply(initial=True)
        self.apply_drained()
        self.last_reload: dict[str, Any] = {"generation": 1, "outcome": "success",
                                            "trigger": "start", "at": time.time(),
                                            "errors": []}
        self._last_read: bytes | None = self._read_file()
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop_watch = asyncio.Event()

    # --- config reloads -------------------------------------------------------------------

    def _read_file(self) -> bytes | None:
        """The config file as it is now (bounded in size, see config.read_config_file)."""
        if self.config_path is None:
            return None
        try:
            return read_config_file(self.config_path)
        except ConfigError:
            return None

    async def reload(self, trigger: str, unless_unchanged: bool = False,
                     by: str | None = None) -> dict[str, Any]:
        """Re-read the config file. An invalid file changes nothing but the record of it.
        ``unless_unchanged``: only if its text differs from what was last read (decided under
        the lock, so a watcher pass and an API change never both take in the same edit).
        ``by``: the token that asked for it through the admin API, recorded with the result."""
        result = await self._reload(trigger, unless_unchanged, by)
        if by is not None:
            detail = (f"generation {result['generation']}" if result["outcome"] == "success"
                      else f"failed ({len(result['errors'])} error(s)); still generation "
                           f"{result['generation']}")
            self.actions.record(by, "reload", detail)
        return result

    async def _reload(self, trigger: str, unless_unchanged: bool,
                      by: str | None) -> dict[str, Any]:
        why = trigger if by is None else f"{trigger}, by {by}"
        async with self._reload_lock:
            if self.config_path is None:
                raise ConfigError("<config>", ["no config file to reload"])
            raw = self._read_file()
            if unless_unchanged and raw == self._last_read:
                return self.last_reload
            self._last_read = raw
            try:
                # In a thread: parsing and validating is CPU-bound (config.py bounds it to
                # some seconds for the worst file it lets through), and the data plane on
                # this loop must keep answering meanwhile. What is parsed is what was just
                # read and compared: a file rewritten in place meanwhile is the next reload's.
                if raw is None:  # unreadable: load_config says why
                    config = await asyncio.to_thread(load_config, self.config_path)
                else:
                    config = await asyncio.to_thread(config_from_bytes, raw,
                                                     str(self.config_path))
                # Loaded once more for use: these are the contexts swapped in below, so what
                # serves is what was checked, even if the files change again meanwhile.
                try:
                    tls = await asyncio.to_thread(compile_tls, config)
                except TLSConfigError as exc:
                    raise ConfigError(str(self.config_path), exc.errors) from None
            except ConfigError as exc:
                self.metrics.config_reloads.labels("failure").inc()
                self.last_reload = {"generation": self.generation, "outcome": "failure",
                                    "trigger": trigger, "at": time.time(),
                                    "errors": exc.errors,
                                    "restart_required": list(self.restart_required)}
                log.error("config reload (%s) failed; still serving generation %d:\n%s",
                          why, self.generation, exc)
                return self.last_reload
            self._warn_about_restart_only_changes(config)
            if self.state.reconcile(config):
                # Saved with the reload (a failure leaves it to the saver's retries; on a
                # restart the same reconciliation drops the same overrides again).
                self.changed()
                await self.save_or_report()
            self.generation += 1
            self.file_config = config
            self.use_effective_config()
            self.proxy.use_tls(tls, config)
            self.rollouts.sync()
            self.apply()
            self.metrics.config_reloads.labels("success").inc()
            self.last_reload = {"generation": self.generation, "outcome": "success",
                                "trigger": trigger, "at": time.time(), "errors": [],
                                "restart_required": list(self.restart_required)}
            log.info("config reloaded (%s): generation %d", why, self.generation)
            return self.last_reload

    def use_effective_config(self) -> bool:
        """``config`` from the file's and the releases set through the API (the one place it
        is built: at start, on a reload, on adopting another instance's change, and with an API
        change); whether it changed. The caller syncs the controller and applies it."""
        config = effective_config(self.file_config, self.state.versions)
        if self.rollout_mirrors:
            config = config.model_copy(update={"services": [
                s.model_copy(update={"mirror": [*s.mirror, self.rollout_mirrors[s.name]]})
                if s.name in self.rollout_mirrors else s for s in config.services]})
        changed = config != self.config
        self.config = config
        return changed

    def set_rollout_mirror(self, service: str, mirror: Mirror | None) -> None:
        """A rollout's mirror step begins (copies of the service's requests to its canary, as
        ``mirror`` says) or ends (None). Not part of the runtime state: the step's own record
        says it is on, and the controller sets it again after a restart."""
        if mirror is None:
            if self.rollout_mirrors.pop(service, None) is None:
                return
        else:
            self.rollout_mirrors[service] = mirror
        if self.use_effective_config():
            self.apply()

    def apply(self, initial: bool = False) -> None:
        """Compile the config with the runtime changes and hand it to the data plane."""
        self.proxy.apply_config(self.config, self.state.weights_override(), self.generation,
                                self.previews, initial=initial)

    def reload_soon(self, trigger: str) -> None:
        """Reload from a signal handler, which cannot await."""
        task = self.loop.create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn_about_restart_only_changes(self, config: Config) -> None:
        """Set ``restart_required`` to the settings of ``config`` that differ from what this
        process runs with and that only a restart applies, each "field: running -> file",
        and log them. Compared with the config the process started with (what its sockets,
        state store, watcher and logging were set up from), not with the last one loaded:
        an edit and its revert leave nothing pending."""
        started = self.started_with
        changes: list[str] = []

        def as_written(value: Any) -> str:  # as the config file writes it: true, null
            if isinstance(value, bool):
                return "true" if value else "false"
            return "null" if value is None else str(value)

        def url(value: Any) -> str:  # its password stays out of logs and status
            return redacted(value) if isinstance(value, str) else as_written(value)

        def compare(field: str, running: Any, wanted: Any,
                    show: Callable[[Any], str] = as_written) -> None:
            if running != wanted:
                changes.append(f"{field}: {show(running)} -> {show(wanted)}")

        compare("listen", started.listen, config.listen)
        compare("admin.listen", started.admin.listen, config.admin.listen)
        # Whether the listener speaks TLS was fixed when it opened (certificates reload).
        compare("tls", "HTTPS" if self.proxy.listener_tls else "plain HTTP",
                "HTTPS" if config.tls else "plain HTTP")
        compare("state_file", started.state_file, config.state_file)
        for field in ("type", "url", "key_prefix", "leader_ttl"):
            compare(f"state_store.{field}", getattr(started.state_store, field),
                    getattr(config.state_store, field), url if field == "url" else as_written)
        compare("watch", started.watch, config.watch)
        compare("log_level", started.log_level, config.log_level)
        if changes:
            log.warning("the config file changes settings that take effect on restart; until "
                        "then Weir keeps what it started with: %s", "; ".join(changes))
        elif self.restart_required:
            log.info("the restart-only settings in the config file are back to what Weir "
                     "runs with: no restart needed")
        self.restart_required = changes

    def start_sync(self) -> None:
        """Follow a shared store: changes other instances make are applied here too."""
        self.store.start(self.state, self._adopt, self._state_lock)
        if self._reconciled_at_start and self.store.kind != "file":
            self._reconciled_at_start = False
            self.changed()  # the dropped overrides

    async def _adopt(self, remote: RemoteState, rollouts_changed: set[str]) -> None:
        """Another instance changed the shared state: take it (called with the state lock
        held, so no local change is half-made meanwhile). Only the rollout records that
        changed there are taken: the controller's own record may be ahead of the store."""
        weights, rollouts, drained, versions = remote
        self.state.weights = dict(weights)
        self.state.drained = dict(drained)
        self.state.versions = {name: dict(own) for name, own in versions.items()}
        # An override that does not fit this instance's config is not applied here; it is
        # left in the store for the instances whose config it fits.
        self.state.reconcile(self.file_config)
        for name in rollouts_changed:
            if name in rollouts:
                self.state.rollouts[name] = rollouts[name]
            else:
                self.state.rollouts.pop(name, None)
        self.rollouts.adopt(rollouts_changed)
        # A release started on another instance comes with its rollout record, in the same
        # write, and that record (adopted just above) already counts the new version: the
        # controller here does not start it a second time.
        if self.use_effective_config():
            self.rollouts.sync()
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
                try:
                    await self._reload_when_settled()
                except Exception:  # a bug in one reload must not end the watching
                    log.exception("config reload (file) failed unexpectedly; still watching")
        except Exception:  # the watcher must never take the proxy down
            log.exception("config file watcher stopped; SIGHUP and POST /api/reload still work")

    async def _reload_when_settled(self) -> None:
        """Reload after a change, but only once the file has stopped changing: an editor that
        saves in two steps must not get its first step applied, nor reported as a failure."""
        text = self._read_file()
        while True:
            await asyncio.sleep(SETTLE_SECONDS)
            again = self._read_file()
            if again == text:
                break
            text = again
        if text != self._last_read:
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
                          source: str = SOURCE_API, fail_safe: bool = False,
                          by: str | None = None) -> dict[str, int]:
        """Replace a service's weights (versions left out get 0) and persist the change.
        ``fail_safe``: traffic going back to safety (a rollback): in force at once, without
        waiting for the state lock or the save, and saved in the background (retried).
        ``source`` is what the runtime state and /api/status keep ("api", "controller");
        ``by`` the token that made the change through the admin API, when one did."""
        applied = await self._set_weights(name, weights, source, fail_safe, by)
        if by is not None:
            self.actions.record(by, "set_weights", describe_weights(applied), service=name)
        return applied

    async def _set_weights(self, name: str, weights: dict[str, int], source: str,
                           fail_safe: bool, by: str | None) -> dict[str, int]:
        service = self.service(name)
        who = source if by is None else f"{by} ({source})"
        unknown = sorted(set(weights) - set(service.versions))
        if unknown:
            raise UnknownName(f"service {name!r} has no version {unknown[0]!r} "
                              f"(versions: {', '.join(service.versions)})")
        if fail_safe:
            self.state.set_weights(self.config, name, weights, source)
            self.apply()
            self.changed()
            applied = self.state.weights[name].weights
            log.info("service %s: weights set to %s by %s", name, applied, who)
            return applied
        async with self._state_lock:  # no change from another instance lands meanwhile
            previous = self.state.weights.get(name)
            self.state.set_weights(self.config, name, weights, source)
            await self._persist_or_undo(restore(self.state.weights, name, previous))
            self.apply()
            applied = self.state.weights[name].weights
        log.info("service %s: weights set to %s by %s", name, applied, who)
        return applied

    async def switch(self, name: str, version: str, source: str = SOURCE_API,
                     by: str | None = None) -> dict[str, int]:
        service = self.service(name)
        if version not in service.versions:
            raise UnknownName(f"service {name!r} has no version {version!r} "
                              f"(versions: {', '.join(service.versions)})")
        applied = await self._set_weights(name, {version: 100}, source, False, by)
        if by is not None:
            self.actions.record(by, "switch", f"to {version} ({describe_weights(applied)})",
                                service=name)
        return applied

    async def rollout_action(self, name: str, action: str, by: str, full: bool = False,
                             revision: str | None = None,
                             upstreams: list[str] | None = None) -> ServiceRollout:
        """A person's action on a service's rollout through the admin API (start, promote,
        abort, pause, resume, retry), recorded with what it did. RolloutError when it does
        not apply to the rollout as it stands (nothing is recorded then)."""
        rollout = await self.rollouts.for_operator(name)
        seen = rollout.record.event_seq
        if action == "promote":
            await rollout.promote(full=full, by=by)
        elif action == "start":
            rollout = await self.start_release(name, by, revision, upstreams)
        elif action == "abort":
            await rollout.abort(f"aborted by {by}", by=by)
        elif action in ("pause", "resume", "retry"):
            await getattr(rollout, action)(by=by)
        else:
            raise ValueError(f"no rollout action {action!r}")
        # What the action did, in the words of the events it added (a promotion in full
        # adds "promoted" and "completed"); a promotion during a step that is no pause
        # does nothing, and says so.
        done = [e["message"] for e in rollout.record.events
                if e.get("seq", 0) > seen and e.get("by") == by]
        what = "; ".join(done) if done else f"nothing to do ({rollout.record.phase})"
        number = f"rollout {rollout.record.number}"
        self.actions.record(by, f"rollout_{action}",
                            what if what.startswith(f"{number} ") else f"{number}: {what}",
                            service=name)
        return rollout

    async def commit(self, change: Callable[[], Callable[[], None]]) -> None:
        """A change to the runtime state that sends traffic somewhere new, as one unit: made in
        memory under the state lock (``change`` returns what undoes it), saved, and only then
        handed to the data plane. If the save fails it is undone, StateWriteError says nothing
        changed, and a table something else applied meanwhile (a rollback elsewhere, which
        does not wait for the lock) is replaced by one without the change."""
        async with self._state_lock:
            table = self.proxy.table
            undo = change()
            try:
                await self._persist_or_undo(undo)
            except StateWriteError:
                if self.proxy.table is not table:
                    self.apply()
                raise
            self.apply()

    async def start_release(self, name: str, by: str, revision: str | None = None,
                            upstreams: list[str] | None = None) -> ServiceRollout:
        """Start a service's rollout through the API, optionally of a new release: the new
        version's ``revision`` and/or ``upstreams`` (weir rollout start --revision R
        --upstreams A,B). The release is a runtime change like weights (kept per field until
        the file's value of that field changes, see state.py), saved in the same write as the
        new rollout's record, so that no instance, and no restart, starts it a second time.
        A release that differs from what the new version runs starts a new rollout from the
        first step even while one is in progress; one that does not is a plain start (refused
        while a rollout is in progress)."""
        self.rollouts.get(name)  # 404 before waiting for anything
        if revision is None and upstreams is None:
            rollout = await self.rollouts.for_operator(name)
            await rollout.start("api", by=by)
            return rollout
        # No reload replaces the file's config between the release being checked against it
        # and its start (a reload's own auto-start would otherwise start it too). Held for the
        # start's save only: reloads need not wait for its pre_rollout webhook.
        async with self._reload_lock:
            rollout = await self.rollouts.for_operator(name)
            set_release: list[bool] = []

            def prepare() -> Callable[[], None] | None:
                undo = self._set_release(rollout, revision, upstreams)
                set_release.append(undo is not None)
                return undo

            await rollout.begin("api", by=by, prepare=prepare)
            if any(set_release):  # saved and in force (a failed save raised above)
                version = self.service(name).versions[rollout.new_version]
                log.info("service %s version %s: release set by %s: revision %s, upstreams "
                         "%s", name, rollout.new_version, by, version.revision,
                         ", ".join(version.upstreams))
        await rollout.after_begin()
        return rollout

    def _set_release(self, rollout: ServiceRollout, revision: str | None,
                     upstreams: list[str] | None) -> Callable[[], None] | None:
        """The release into the runtime state and the config (not saved, not applied: see
        commit); what undoes it, or None if the new version already runs exactly that.
        Raises InvalidRelease for a value the config's model refuses."""
        name, version = rollout.name, rollout.new_version
        configured = next(s for s in self.file_config.services if s.name == name)
        file_version = configured.versions[version]
        current = self.state.versions.get(name, {}).get(version)
        override = merged_override(current, file_version, revision, upstreams)
        try:
            built = build_version(file_version, override.revision if override else None,
                                  override.upstreams if override else None)
        except ValidationError as exc:
            raise InvalidRelease(f"service {name!r} version {version!r}: "
                                 + "; ".join(format_validation_errors(exc))) from None
        running = self.service(name).versions[version]
        if (sorted(built.upstreams), built.revision) == (sorted(running.upstreams),
                                                         running.revision):
            return None
        before_versions = {n: dict(own) for n, own in self.state.versions.items()}
        before_config, before_revision = self.config, rollout.record.revision
        own = self.state.versions.setdefault(name, {})
        if override is None:  # back to what the file says
            own.pop(version, None)
        else:
            own[version] = override
        if not own:
            del self.state.versions[name]
        self.use_effective_config()
        # The start this goes with brings the version in: the controller's check for a changed
        # version (config_changed, in sync) must not start it as well.
        rollout.record.revision = fingerprint(self.service(name), version)
        self.rollouts.sync()

        def undo() -> None:
            self.state.versions = before_versions
            self.config = before_config
            rollout.record.revision = before_revision
            self.rollouts.sync()

        return undo

    async def _persist_or_undo(self, undo: Callable[[], None]) -> None:
        """Save a runtime change just made to ``self.state`` (under the state lock). Persisted
        first: a change that would not survive a restart (or reach the other instances) is
        refused rather than silently applied, so on failure ``undo`` puts the state back and
        the caller's change is reported as not made."""
        try:
            await self._save_locked()
        except OSError as exc:
            undo()
            if isinstance(exc, StoreConflict):
                raise StateConflictError(f"nothing changed: {exc}") from exc
            raise StateWriteError(f"could not write {self.store_name()}: "
                                  f"{exc.strerror or exc}; nothing changed") from exc

    # --- saving what is in force ----------------------------------------------------------
    # Two kinds of runtime change. Those that send traffic somewhere new on an operator's or
    # the controller's say (weights, switches, drains, a rollout's steps forward) are saved
    # before they count: if the save fails they are undone and reported as not made. Those
    # that take traffic back to safety (an abort, a rollback, a pause) and the controller's
    # bookkeeping are in force at once and saved after, by one background saver that keeps
    # retrying; until it succeeds the state is "unsaved" (/api/status, weir_state_unsaved).

    def store_name(self) -> str:
        return (f"the state file {self.state.path}" if self.store.kind == "file"
                else f"the {self.store.kind} state store")

    def changed(self) -> None:
        """The runtime state changed in memory and is in force: save it in the background,
        now and then again until a save succeeds."""
        self._changes += 1
        self._save_soon()

    def _save_soon(self) -> None:
        """The saver tries at once: started if it is not running, woken from its backoff."""
        self._wake_saver.set()
        if self._saver is None or self._saver.done():
            self._saver = self.loop.create_task(self._save_until_saved())

    @property
    def saved(self) -> bool:
        return self._saved_upto >= self._changes

    async def _save_locked(self) -> None:
        """One save of the whole state (the state lock held): what it writes is taken when it
        starts, so it covers every change counted so far."""
        upto = self._changes
        try:
            await self.store.save(self.state)
        except OSError as exc:
            self._last_save_ok = False
            if not self.saved:
                self._record_unsaved(exc)
            raise
        finally:
            attempted, self._save_attempted = self._save_attempted, asyncio.Event()
            attempted.set()
        self._last_save_ok = True
        self._saved_upto = max(self._saved_upto, upto)
        if self.saved and self.unsaved is not None:
            log.warning("runtime state saved to %s after %d failed attempt(s); it was "
                        "unsaved for %.1fs", self.store_name(), self.unsaved["attempts"],
                        time.time() - self.unsaved["since"])
            self.unsaved = None

    def _record_unsaved(self, exc: OSError) -> None:
        self.save_failures += 1
        error = str(exc.strerror or exc)
        previous = self.unsaved
        self.unsaved = {"since": previous["since"] if previous else time.time(),
                        "error": error, "store": self.store_name(),
                        "attempts": previous["attempts"] + 1 if previous else 1}
        if previous is None or previous["error"] != error:
            log.error("runtime state not saved: could not write %s: %s; the changes are in "
                      "force here, and Weir keeps trying to save them", self.store_name(),
                      error)

    async def _save_until_saved(self) -> None:
        delay = SAVE_RETRY_FIRST
        while not self.saved:
            self._wake_saver.clear()
            try:
                async with self._state_lock:
                    if self.saved:
                        return  # a change saved first (under the lock) took these along
                    await self._save_locked()
            except OSError:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_saver.wait(), delay)
                delay = min(delay * 2, SAVE_RETRY_MAX)

    async def save_or_report(self) -> bool:
        """For an answer to the API: wait (a while) for the changes made so far to be saved.
        True once they are; False after a failed attempt or ``SAVE_WAIT``: they stay in force
        and the saver keeps trying."""
        target = self._changes
        if self._saved_upto >= target:
            return True
        self._save_soon()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SAVE_WAIT):
                while self._saved_upto < target:
                    await self._save_attempted.wait()
                    if not self._last_save_ok:
                        break
        return self._saved_upto >= target

    def unsaved_warning(self) -> str:
        error = self.unsaved["error"] if self.unsaved else "the save is still under way"
        return (f"applied, not saved: could not write {self.store_name()} ({error}); the "
                f"change is in force on this instance and Weir keeps trying to save it")

    async def stop_saving(self) -> None:
        """On stopping: one last try to save what is unsaved; a failure is logged (the state
        on record is then the last one saved)."""
        if self._saver is not None:
            await cancel_and_wait(self._saver)
        if self.saved:
            return
        try:
            async with self._state_lock:
                await self._save_locked()
        except OSError as exc:
            log.error("stopping with runtime changes not saved to %s: %s", self.store_name(),
                      exc.strerror or exc)

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

    async def drain(self, address: str, force: bool = False,
                    by: str | None = None) -> dict[str, Any]:
        """Take an upstream address out of rotation in every service and version, persisted.
        Its requests in flight finish; its idle pooled connections close. ``by``: the token
        that asked for it through the admin API."""
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
        forced = f"; forced: {', '.join(stranded)} left with no upstream" if stranded else ""
        if changed:
            log.warning("upstream %s drained%s (used by %s): no new requests; %d in flight%s",
                        address, f" by {by}" if by else "", ", ".join(entry["used_by"]),
                        entry["inflight"], forced)
        if by is not None:
            outcome = forced if changed else ": already drained"
            self.actions.record(by, "drain", f"{address} (used by "
                                             f"{', '.join(entry['used_by'])}){outcome}")
        return {**entry, "changed": changed, "without_upstream": stranded,
                "drained": sorted(self.state.drained)}

    async def undrain(self, address: str, by: str | None = None) -> dict[str, Any]:
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
        used_by = ", ".join(users.get(address, [])) or "no service"
        if previous is not None:
            log.warning("upstream %s undrained%s (used by %s): back in rotation", address,
                        f" by {by}" if by else "", used_by)
        if by is not None:
            outcome = "" if previous is not None else ": was not drained"
            self.actions.record(by, "undrain", f"{address} (used by {used_by}){outcome}")
        return {"upstream": address, "used_by": users.get(address, []),
                "changed": previous is not None, "drained": sorted(self.state.drained)}

    # --- reporting ------------------------------------------------------------------------

    def _mirror_status(self, service: str, version: str, percent: float) -> dict[str, Any]:
        stats = self.proxy.stats.for_mirror(service, version)
        outcomes = stats.outcomes
        selected = sum(outcomes.values())  # every copy the percent chose
        return {"version": version, "percent": percent, "outcomes": dict(outcomes),
                # Shares of the copies selected: sent to the shadow, and dropped (why:
                # dropped_by_reason). None until a copy was selected.
                "delivered_share": (round(1 - outcomes["dropped"] / selected, 4)
                                    if selected else None),
                "dropped_share": round(outcomes["dropped"] / selected, 4) if selected else None,
                "dropped_by_reason": dict(stats.dropped),
                # Field by field against the users' answers, with the noise learnt from the
                # baseline (see dataplane/diff.py); empty until a copy was compared.
                "diff": stats.diff.report() if stats.diff.compared else None,
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
                configured = service.versions.get(name)
                versions[name] = {
                    "upstreams": list(target.upstreams),
                    "revision": configured.revision if configured is not None else None,
                    # "file", or who set them (a release started through the API).
                    **self.state.version_sources(service.name, name),
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
                "rollout": (self.rollouts.rollouts[service.name].status(
                                last_events=STATUS_EVENTS)
                            if service.name in self.rollouts.rollouts else None),
                # The last changes to this service through the admin API, and who made
                # them (in memory: see control/audit.py).
                "actions": self.actions.for_service(service.name),
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
            # Settings the config file changes that wait for a restart ("field: running ->
            # file"); empty when what runs is what the file says.
            "restart_required": list(self.restart_required),
            "ready": not self.proxy.draining,
            "services": services,
            "draining": draining,
            "drained": self.drained_status(),
            # Runtime changes in force here but not yet saved (null when all are saved).
            "state_unsaved": self.unsaved,
            # The last changes through the admin API that concern the whole instance
            # (reloads, drains), and who made them.
            "actions": self.actions.for_instance(),
        }
        workers = getattr(self.proxy, "workers", None)  # only under `weir run --workers N`
        if workers is not None:
            status["workers"] = workers.describe()
        return status


def describe_weights(weights: dict[str, int]) -> str:
    return " ".join(f"{version}={weight}" for version, weight in weights.items())


def restore(entries: dict[str, Any], key: str, previous: Any) -> Callable[[], None]:
    """What undoes setting ``entries[key]``: its previous value back, or the key gone when
    it had none."""
    def undo() -> None:
        if previous is None:
            entries.pop(key, None)
        else:
            entries[key] = previous
    return undo
