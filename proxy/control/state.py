"""Runtime state: the changes made through the admin API (and by the controller) that must
survive a restart, kept apart from the config file and merged with it field by field.

The merge rule is "last writer wins, per field": an API change to a service's weights records
what the file said at that moment. While the file still says that, the API value stands, even
across reloads that change other fields. Once the file's weights for that service change, the
file is the newer writer and the API value is dropped.

A release started through the API (``weir rollout start SERVICE --revision R --upstreams A,B``)
is kept the same way, per version and per field: a ``VersionOverride`` of the version's
``revision`` and/or ``upstreams``, each with what the file said when it was set. A later edit of
the version's upstreams in the file drops the upstreams override and keeps the revision one,
and the reverse; editing anything else keeps both. ``effective_config`` is the one place the
config the control plane serves is built: the file's, with these overrides applied.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config.loader import format_validation_errors
from ..config.model import MAX_WEIGHT, Config, Service, VersionConfig, parse_address
from ..dataplane.routing import effective_weights
from ..rollout.controller import check_rollout_record

log = logging.getLogger("weir.state")

STATE_FORMAT = 1
SOURCE_FILE = "file"
SOURCE_API = "api"


@dataclass
class WeightOverride:
    weights: dict[str, int]
    source: str                   # who set it: "api" or "controller"
    file_weights: dict[str, int]  # what the config file said when it was set
    changed_at: float


def parse_override(entry: dict[str, Any]) -> WeightOverride:
    """A WeightOverride from the state file, checked as strictly as the admin API checks one;
    raises ValueError (the file is then set aside as corrupt)."""
    override = WeightOverride(**entry)

    def valid_weights(weights: object) -> bool:
        return (isinstance(weights, dict) and bool(weights)
                and all(isinstance(k, str) for k in weights)
                and all(type(w) is int and 0 <= w <= MAX_WEIGHT for w in weights.values()))

    if not (valid_weights(override.weights) and any(override.weights.values())
            and valid_weights(override.file_weights) and isinstance(override.source, str)
            and isinstance(override.changed_at, int | float)):
        raise ValueError(f"invalid weights entry {entry!r}")
    return override


@dataclass
class VersionOverride:
    """A version's ``revision`` and/or ``upstreams`` set through the API (a release started
    from a pipeline). A field that is None is the file's. ``file_revision`` and
    ``file_upstreams`` are what the file said when the field beside them was set: once the
    file says something else, the file is the newer writer of that field."""

    revision: str | None
    upstreams: list[str] | None
    file_revision: str | None
    file_upstreams: list[str] | None
    source: str                   # who set it: "api"
    changed_at: float

    @property
    def empty(self) -> bool:
        return self.revision is None and self.upstreams is None


def parse_version_override(entry: Any) -> VersionOverride:
    """A VersionOverride from the state file or a shared store's field, checked as strictly
    as the admin API checks one (addresses as the config checks them); raises ValueError."""
    if not isinstance(entry, dict):
        raise ValueError(f"invalid version entry {entry!r:.80}")
    override = VersionOverride(**entry)

    def text(value: object) -> bool:
        return value is None or isinstance(value, str)

    def addresses(value: object) -> bool:
        if value is None:
            return True
        if not isinstance(value, list) or not value or not all(isinstance(a, str)
                                                                for a in value):
            return False
        for address in value:
            parse_address(address)  # ValueError with the config's own message
        return True

    if not (text(override.revision) and text(override.file_revision)
            and addresses(override.upstreams) and addresses(override.file_upstreams)
            and not override.empty and isinstance(override.source, str)
            and isinstance(override.changed_at, int | float)
            and not isinstance(override.changed_at, bool)):
        raise ValueError(f"invalid version entry {entry!r:.80}")
    return override


def parse_drained(entry: Any) -> dict[str, float]:
    """The drained upstreams from the state file (``{"host:port": drained_at}``), or from a
    shared store's fields; raises ValueError for anything else."""
    if not isinstance(entry, dict) or not all(
            isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in entry.items()):
        raise ValueError(f"invalid drained upstreams {entry!r}")
    return {address: float(at) for address, at in entry.items()}


class RuntimeState:
    """Owns the overrides and their file. Not thread-safe; lives on the event loop."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.weights: dict[str, WeightOverride] = {}
        # The rollout controller's record per service (phase, step, analyses); it owns the
        # content, this class only keeps it with the rest.
        self.rollouts: dict[str, dict[str, Any]] = {}
        # Upstream addresses ("host:port") an operator drained (weir drain), each with the
        # time it was drained: out of rotation in every service and version until undrained.
        self.drained: dict[str, float] = {}
        # Per service, per version: a revision and/or upstreams set through the API (a release
        # started from a pipeline), on top of what the file says.
        self.versions: dict[str, dict[str, VersionOverride]] = {}

    # --- persistence ----------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file if there is one. A damaged file is set aside, not fatal."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            services = data.get("services", {})
            self.weights = {
                name: parse_override(entry["weights"])
                for name, entry in services.items() if "weights" in entry
            }
            # Checked field by field as the controller will use it: a damaged record is
            # set aside with the file, not found out by the controller on every tick.
            self.rollouts = {name: check_rollout_record(entry["rollout"])
                             for name, entry in services.items() if "rollout" in entry}
            self.drained = parse_drained(data.get("drained", {}))  # absent in older files
            # Absent in older files, and in any service without a release set through the API.
            self.versions = {
                name: {version: parse_version_override(override)
                       for version, override in entry["versions"].items()}
                for name, entry in services.items() if entry.get("versions")
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            aside = self.path.with_suffix(self.path.suffix + ".corrupt")
            log.error("state file %s is unreadable (%s); moved it to %s and starting from "
                      "the config file alone", self.path, exc, aside)
            self.weights = {}
            self.rollouts = {}
            self.drained = {}
            self.versions = {}
            os.replace(self.path, aside)

    def document(self) -> dict[str, Any]:
        """The state file's content, as of now: taken on the event loop, so that a write in
        a thread never reads dicts the loop is changing."""
        services: dict[str, dict[str, Any]] = {}
        for name, override in self.weights.items():
            services.setdefault(name, {})["weights"] = asdict(override)
        for name, rollout in self.rollouts.items():
            services.setdefault(name, {})["rollout"] = copy.deepcopy(rollout)
        for name, overrides in self.versions.items():
            if overrides:
                services.setdefault(name, {})["versions"] = {
                    version: asdict(override) for version, override in overrides.items()}
        data: dict[str, Any] = {"format": STATE_FORMAT, "services": services}
        if self.drained:
            data["drained"] = dict(self.drained)
        return data

    def write(self, data: dict[str, Any]) -> None:
        """Write atomically: a temp file in the same directory, fsync, then rename."""
        if self.path is None:
            return
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- merging with the config file -----------------------------------------------------

    def reconcile(self, config: Config) -> list[str]:
        """Drop overrides the file has since overwritten (or that no longer fit it).
        Returns the names of services whose override was dropped."""
        dropped = []
        services = {s.name: s for s in config.services}
        for name, override in list(self.weights.items()):
            service = services.get(name)
            reason = None
            if service is None:
                reason = "the service is gone from the config file"
            elif set(override.weights) - set(service.versions):
                reason = "it names a version that is gone from the config file"
            elif effective_weights(service) != override.file_weights:
                reason = "the config file's weights for it changed since"
            if reason:
                log.info("service %s: dropping the %s weights %s: %s", name, override.source,
                         override.weights, reason)
                del self.weights[name]
                dropped.append(name)
        for name in list(self.versions):
            if self._reconcile_versions(name, services.get(name)):
                dropped.append(name)
        return dropped

    def _reconcile_versions(self, name: str, service: Service | None) -> bool:
        """Drop what the file has since overwritten of a service's version overrides, field
        by field; whether anything was dropped."""
        dropped = False
        overrides = self.versions[name]
        for version, override in list(overrides.items()):
            configured = service.versions.get(version) if service is not None else None
            kept = override
            if configured is None:
                kept = replace(override, revision=None, upstreams=None)
                why = ("the service is gone from the config file" if service is None
                       else "the version is gone from the config file")
                log.info("service %s version %s: dropping the %s release (revision %s, "
                         "upstreams %s): %s", name, version, override.source,
                         override.revision, override.upstreams, why)
            else:
                if (override.upstreams is not None
                        and list(configured.upstreams) != override.file_upstreams):
                    kept = replace(kept, upstreams=None, file_upstreams=None)
                    log.info("service %s version %s: dropping the %s upstreams %s: the config "
                             "file's upstreams for it changed since (now %s)", name, version,
                             override.source, override.upstreams, list(configured.upstreams))
                if override.revision is not None and configured.revision != override.file_revision:
                    kept = replace(kept, revision=None, file_revision=None)
                    log.info("service %s version %s: dropping the %s revision %r: the config "
                             "file's revision for it changed since (now %r)", name, version,
                             override.source, override.revision, configured.revision)
            if kept is override:
                continue
            dropped = True
            if kept.empty:
                del overrides[version]
            else:
                overrides[version] = kept
        if not overrides:
            del self.versions[name]
        return dropped

    def weights_override(self) -> dict[str, dict[str, int]]:
        return {name: dict(o.weights) for name, o in self.weights.items()}

    def set_weights(self, config: Config, service: str, weights: dict[str, int],
                    source: str = SOURCE_API) -> None:
        svc = next(s for s in config.services if s.name == service)
        self.weights[service] = WeightOverride(
            weights={v: weights.get(v, 0) for v in svc.versions}, source=source,
            file_weights=effective_weights(svc), changed_at=time.time())

    def weights_source(self, service: str) -> str:
        override = self.weights.get(service)
        return override.source if override else SOURCE_FILE

    def version_sources(self, service: str, version: str) -> dict[str, str]:
        """Where a version's upstreams and revision come from: the file, or who set them."""
        override = self.versions.get(service, {}).get(version)
        return {
            "upstreams_source": (override.source if override and override.upstreams is not None
                                 else SOURCE_FILE),
            "revision_source": (override.source if override and override.revision is not None
                                else SOURCE_FILE),
        }


def merged_override(current: VersionOverride | None, configured: VersionConfig,
                    revision: str | None, upstreams: list[str] | None,
                    source: str = SOURCE_API) -> VersionOverride | None:
    """The override after an API change of a version's ``revision`` and/or ``upstreams``
    (None: not changed), over ``current`` and the file's ``configured`` version. Each field
    given replaces that field (last writer wins); a value the file itself says needs no
    override, and that field goes back to the file's. None: nothing left to override."""
    merged = current or VersionOverride(None, None, None, None, source, 0.0)
    if revision is not None:
        merged = (replace(merged, revision=None, file_revision=None)
                  if revision == configured.revision
                  else replace(merged, revision=revision, file_revision=configured.revision))
    if upstreams is not None:
        file_upstreams = list(configured.upstreams)
        merged = (replace(merged, upstreams=None, file_upstreams=None)
                  if upstreams == file_upstreams
                  else replace(merged, upstreams=list(upstreams),
                               file_upstreams=file_upstreams))
    if merged.empty:
        return None
    return replace(merged, source=source, changed_at=time.time())


def build_version(configured: VersionConfig, revision: str | None,
                  upstreams: list[str] | None) -> VersionConfig:
    """``configured`` with another revision and/or upstreams, built through the config's own
    model, so that every value is checked exactly as in the file (pydantic's ValidationError
    with the same messages otherwise)."""
    data = configured.model_dump(exclude_unset=True)
    if revision is not None:
        data["revision"] = revision
    if upstreams is not None:
        data["upstreams"] = upstreams
    return VersionConfig.model_validate(data)


def effective_config(config: Config,
                     overrides: dict[str, dict[str, VersionOverride]]) -> Config:
    """The config the control plane serves and hands the controller: the file's ``config``
    with the versions' overrides applied. Services without one are the file's very objects."""
    if not overrides:
        return config
    services = []
    for service in config.services:
        own = overrides.get(service.name)
        versions = dict(service.versions)
        for name, override in (own or {}).items():
            if name not in versions:
                continue  # reconcile drops it; until then it has nothing to apply to
            try:
                versions[name] = build_version(versions[name], override.revision,
                                               override.upstreams)
            except ValidationError as exc:
                # Checked when read and when set: only a model that became stricter since
                # gets here. The file's version serves; the override stays on record.
                log.error("service %s version %s: not applying the %s release: %s",
                          service.name, name, override.source,
                          "; ".join(format_validation_errors(exc)))
        services.append(service if versions == service.versions
                        else service.model_copy(update={"versions": versions}))
    return config.model_copy(update={"services": services})
