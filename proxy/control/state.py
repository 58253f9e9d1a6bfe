"""Runtime state: the changes made through the admin API (and, later, by the controller) that
must survive a restart, kept apart from the config file and merged with it field by field.

The merge rule is "last writer wins, per field": an API change to a service's weights records
what the file said at that moment. While the file still says that, the API value stands, even
across reloads that change other fields. Once the file's weights for that service change, the
file is the newer writer and the API value is dropped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config.model import MAX_WEIGHT, Config
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
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            aside = self.path.with_suffix(self.path.suffix + ".corrupt")
            log.error("state file %s is unreadable (%s); moved it to %s and starting from "
                      "the config file alone", self.path, exc, aside)
            self.weights = {}
            self.rollouts = {}
            self.drained = {}
            os.replace(self.path, aside)

    def document(self) -> dict[str, Any]:
        """The state file's content, as of now: taken on the event loop, so that a write in
        a thread never reads dicts the loop is changing."""
        services: dict[str, dict[str, Any]] = {}
        for name, override in self.weights.items():
            services.setdefault(name, {})["weights"] = asdict(override)
        for name, rollout in self.rollouts.items():
            services.setdefault(name, {})["rollout"] = copy.deepcopy(rollout)
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
