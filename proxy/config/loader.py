"""Reading a config file: bounded YAML, `${ENV}` expansion, validation against the model
and the checks across fields (TLS files included), with every error and the path of its field."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .model import ADMIN_TOKEN_NAME, Config, ConfigError
from .tls import TLSConfigError, compile_tls

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: str, errors: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in string values (never in keys or YAML syntax)."""
    if isinstance(node, dict):
        return {k: _expand_env(v, _join(path, k), errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", errors) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if default is not None and not value:
            return default  # like sh: ':-' covers unset and empty
        if value is not None:
            return value
        errors.append(f"{path or '<root>'}: environment variable {name} is not set "
                      f"(write ${{{name}:-}} to allow it to be empty)")
        return ""

    return _ENV_RE.sub(substitute, node)


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def format_location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path = _join(path, part)
    return path or "<root>"


# Fields whose value is a credential: an error about one never shows the value (errors go to
# the terminal, the log and /api/status).
SECRET_FIELDS = frozenset({"token", "secret"})


def format_validation_errors(exc: ValidationError) -> list[str]:
    """One line per error, "field.path: message (got value)", as `weir validate` prints them
    (also what the admin API answers for a value it builds through the same model)."""
    lines = []
    for err in exc.errors(include_url=False):
        # Drop pydantic's internal tags ('function-before[...]') so the path is the user's.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = ("" if isinstance(value, dict | list) or repr(value) in message
                 or (loc and loc[-1] in SECRET_FIELDS) else f" (got {value!r})")
        lines.append(f"{format_location(loc)}: {message}{shown}")
    return lines


def _semantic_errors(data: dict[str, Any]) -> list[str]:
    """Checks that span fields (references to versions, weights that can route traffic).

    They read the raw data, tolerating wrong types that pydantic reports on its own, so that
    one run shows field errors and cross-field errors together.
    """
    errors: list[str] = _admin_token_errors(data.get("admin"))
    services = data.get("services")
    if not isinstance(services, list):
        return errors
    seen: set[str] = set()
    for i, svc in enumerate(services):
        if not isinstance(svc, dict):
            continue
        where = f"services[{i}]"
        name = svc.get("name")
        if isinstance(name, str):
            if name in seen:
                errors.append(f"{where}.name: duplicate service name {name!r}")
            seen.add(name)
        versions = svc.get("versions")
        if not isinstance(versions, dict) or not versions:
            continue
        known = ", ".join(map(str, versions))
        weights = svc.get("weights")
        if isinstance(weights, dict):
            for version in weights:
                if version not in versions:
                    errors.append(f"{where}.weights.{version}: no such version "
                                  f"(versions: {known})")
            values = list(weights.values())
            if values and all(isinstance(w, int) and w == 0 for w in values):
                errors.append(f"{where}.weights: at least one version needs a weight above 0")
        rollout = svc.get("rollout")
        if isinstance(rollout, dict):
            blue_green = rollout.get("strategy") == "blue_green"
            keys = ("active", "preview") if blue_green else ("stable", "canary")
            defaults = {"stable": "stable", "canary": "canary", "active": "blue",
                        "preview": "green"}
            names = [rollout.get(k, defaults[k]) for k in keys]
            for key, version in zip(keys, names, strict=True):
                if isinstance(version, str) and version not in versions:
                    errors.append(f"{where}.rollout.{key}: no such version {version!r} "
                                  f"(versions: {known})")
            if names[0] == names[1]:
                errors.append(f"{where}.rollout: {keys[0]} and {keys[1]} must differ")
        for key in ("rules", "mirror"):
            items = svc.get(key)
            for j, item in enumerate(items if isinstance(items, list) else []):
                version = item.get("version") if isinstance(item, dict) else None
                if isinstance(version, str) and version not in versions:
                    errors.append(f"{where}.{key}[{j}].version: no such version {version!r} "
                                  f"(versions: {known})")
                baseline = item.get("baseline") if key == "mirror" and isinstance(
                    item, dict) else None
                if isinstance(baseline, str) and baseline not in versions:
                    errors.append(f"{where}.mirror[{j}].baseline: no such version "
                                  f"{baseline!r} (versions: {known})")
                elif isinstance(baseline, str) and baseline == version:
                    errors.append(f"{where}.mirror[{j}].baseline: the primary version the "
                                  f"users' answers come from, not the shadow itself")
    errors += _notification_errors(data.get("notifications"), seen)
    return errors


def _notification_errors(notifications: Any, services: set[str]) -> list[str]:
    """A notification's ``services`` name services of the file (a typo would silence it)."""
    errors: list[str] = []
    for i, item in enumerate(notifications if isinstance(notifications, list) else []):
        names = item.get("services") if isinstance(item, dict) else None
        for j, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in services:
                errors.append(f"notifications[{i}].services[{j}]: no such service {name!r} "
                              f"(services: {', '.join(sorted(services))})")
    return errors


def _admin_token_errors(admin: Any) -> list[str]:
    """``admin.tokens``: every name and every token used once, and neither ``admin.token``
    nor its name taken again. A change is recorded under its token's name, so two entries
    that share a name or a token would make the record ambiguous. Errors never show a token."""
    if not isinstance(admin, dict) or not isinstance(admin.get("tokens"), list):
        return []
    errors: list[str] = []
    main = admin.get("token") or None
    names: dict[str, int] = {}
    secrets: dict[str, int] = {}
    for i, entry in enumerate(admin["tokens"]):
        if not isinstance(entry, dict):
            continue
        where = f"admin.tokens[{i}]"
        name, token = entry.get("name"), entry.get("token")
        if isinstance(name, str):
            if name in names:
                errors.append(f"{where}.name: duplicate token name {name!r} (admin.tokens"
                              f"[{names[name]}] has it too)")
            elif main is not None and name == ADMIN_TOKEN_NAME:
                errors.append(f"{where}.name: {name!r} is the name admin.token acts under; "
                              f"choose another")
            names.setdefault(name, i)
        if isinstance(token, str) and token:
            if token in secrets:
                errors.append(f"{where}.token: the same token as admin.tokens[{secrets[token]}]"
                              f"; each entry needs a token of its own")
            elif token == main:
                errors.append(f"{where}.token: the same token as admin.token; each entry "
                              f"needs a token of its own")
            secrets.setdefault(token, i)
    return errors


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate already-parsed YAML; raises ConfigError listing every problem at once."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<root>: expected a mapping of settings, got {data!r}"])
    errors: list[str] = []
    data = _expand_env(data, "", errors)
    env_paths = {line.split(":", 1)[0] for line in errors}
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # A field whose variable was unset already has its error; don't report it twice.
        errors += [e for e in format_validation_errors(exc) if e.split(":", 1)[0] not in env_paths]
    errors += _semantic_errors(data)
    if config is not None:
        # Certificates and keys are loaded here, so that `weir validate`, start and reload all
        # refuse a config whose files are missing or do not fit together.

        try:
            compile_tls(config)
        except TLSConfigError as exc:
            errors += [e for e in exc.errors if e.split(":", 1)[0] not in env_paths]
    if errors or config is None:
        raise ConfigError(source, errors)
    return config


# Bounds on what a config file may make Weir do before it is even validated. YAML aliases
# repeat whatever they point at, so a few hundred bytes can stand for billions of values (a
# "billion laughs" alias bomb): expanding one took minutes and gigabytes. Real configs are a
# few KiB with at most some dozens of aliases, nested about ten levels; these leave a wide
# margin, and the worst file they let through (about 100k values) takes some seconds and
# about 100 MB to load, off the event loop. Each refusal names its limit.
MAX_CONFIG_BYTES = 1 << 20       # the file itself


MAX_YAML_ALIASES = 10_000        # alias uses (*name) in the file


MAX_YAML_NODES = 100_000         # values (keys, scalars, lists, mappings) once aliases expand


MAX_YAML_DEPTH = 64              # nesting, counted through aliases too


class YAMLLimitError(yaml.YAMLError):
    """A file that is YAML but goes past one of the bounds above; the message names it."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the bounds above, checked on the composed node graph, before
    anything is constructed. An alias is one shared node there, so a bomb is cheap to hold
    and to measure: the cost is only in expanding it, which is what is measured (each node
    counted every time the document reaches it) and refused past the limit."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _limit(f"more than {MAX_YAML_ALIASES} alias uses (*name); the limit "
                             f"is {MAX_YAML_ALIASES}", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        # Counted as they are read, to stop early: the pure-Python parser takes some
        # seconds per 100k values, and a file of that many is refused anyway.
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _too_many_values(self.peek_event().start_mark)
        # The composer recurses once per level: bounded here, long before Python's own
        # recursion limit, so that `[[[[…` is an error message and not a RecursionError.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _limit(f"nested more than {MAX_YAML_DEPTH} levels deep; the limit is "
                             f"{MAX_YAML_DEPTH}", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _measure(node, 1, {}, set())
        return node


def _limit(problem: str, mark: Any) -> YAMLLimitError:
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return YAMLLimitError(f"{where}{problem}")


def _too_many_values(mark: Any) -> YAMLLimitError:
    return _limit(f"more than {MAX_YAML_NODES} values once aliases (*name) are expanded (a "
                  f"YAML alias bomb?); the limit is {MAX_YAML_NODES}", mark)


def _measure(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]],
             path: set[int]) -> tuple[int, int]:
    """(values, levels) of ``node`` with every alias expanded, refusing past the limits.
    ``seen`` memoizes by node, so the walk costs the distinct nodes, not the expansion;
    ``path`` holds the nodes above, to catch an alias inside its own anchor."""
    key = id(node)
    if key in path:
        raise _limit("an alias refers to a node that contains it (a recursive alias); that "
                     "cannot be expanded", node.start_mark)
    if key in seen:
        size, height = seen[key]
    else:
        if depth > MAX_YAML_DEPTH:
            raise _limit(f"nested more than {MAX_YAML_DEPTH} levels deep once aliases are "
                         f"expanded; the limit is {MAX_YAML_DEPTH}", node.start_mark)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        size, height = 1, 1
        path.add(key)
        for child in children:
            child_size, child_height = _measure(child, depth + 1, seen, path)
            size += child_size
            height = max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise _too_many_values(node.start_mark)
        path.discard(key)
        seen[key] = size, height
    if depth - 1 + height > MAX_YAML_DEPTH:  # reached again, deeper than the first time
        raise _limit(f"nested more than {MAX_YAML_DEPTH} levels deep once aliases are "
                     f"expanded; the limit is {MAX_YAML_DEPTH}", node.start_mark)
    return size, height


def load_yaml(text: str) -> Any:
    """Parse one YAML document within the bounds above (raises YAMLLimitError past them)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_config_file(path: str | Path) -> bytes:
    """A config file's bytes, never more than one past the size bound however large it is."""
    try:
        with open(path, "rb") as file:
            return file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file."""
    return config_from_bytes(read_config_file(path), str(path))


def config_from_bytes(raw: bytes, source: str) -> Config:
    """Parse and validate a config file's content. CPU-bound (some seconds for the largest
    file the bounds above let through): the event loop calls it in a thread."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [f"refused: the file is larger than {MAX_CONFIG_BYTES} "
                                   f"bytes, the limit for a config file"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text: {exc}"]) from None
    try:
        data = load_yaml(text)
    except YAMLLimitError as exc:
        raise ConfigError(source, [f"refused: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(source, [f"not a usable YAML value: {exc}"]) from None
    return parse_config(data, source)
