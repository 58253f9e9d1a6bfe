"""Config loading: scalar types, ${ENV} expansion, and error messages that name the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.config.loader import load_config, parse_config
from proxy.config.model import Config, ConfigError, json_schema, parse_duration, parse_size

# The example from /work/shared/interface.md, verbatim.
INTERFACE_EXAMPLE = """\
listen: 127.0.0.1:8080                # data plane
admin:
  listen: 127.0.0.1:9901              # admin API, /metrics, /healthz, /readyz, dashboard
  token: ${WEIR_ADMIN_TOKEN}          # mutations need "Authorization: Bearer <token>"
state_file: weir.state.json           # runtime changes (admin API, controller) survive restarts
services:
  - name: shop
    match: {hosts: [shop.example.com], path_prefix: /}   # optional: default matches all
    versions:
      stable: {upstreams: [127.0.0.1:9001, 127.0.0.1:9011]}
      canary: {upstreams: [127.0.0.1:9002]}
      shadow: {upstreams: [127.0.0.1:9003]}
    weights: {stable: 95, canary: 5}  # integers, any sum; blue/green is 100/0
    sticky: {header: x-user-id, cookie: user_id}        # hashed user ID → same version
    rules:                            # checked first; first match wins
      - match: {headers: {x-user-group: internal-beta}}
        version: canary
    mirror:
      - {version: shadow, percent: 100}
    drain: {timeout: 30s}
    rollout:
      strategy: canary                # or blue_green (then: active, preview, promotion, checks)
      stable: stable
      canary: canary
      steps:
        - set_weight: 5
        - pause: {duration: 5m}
        - set_weight: 25
        - pause: {}                   # until promoted
        - set_weight: 50
      analysis:                       # runs in the background while steps advance
        interval: 30s
        min_requests: 100             # fewer in a window: inconclusive, not failure
        failure_limit: 2
        checks:
          max_error_rate: 0.01
          max_error_rate_increase: 0.005   # canary minus stable, same window
          max_p99: 500ms
          max_p99_ratio: 1.2               # canary over stable, same window
"""


def service(**extra: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": "shop",
        "versions": {
            "stable": {"upstreams": ["127.0.0.1:9001"]},
            "canary": {"upstreams": ["127.0.0.1:9002"]},
        },
    }
    svc.update(extra)
    return svc


def config(*services: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"services": list(services) or [service()], **top}


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors, "a ConfigError must carry at least one line"
    return info.value.errors


def assert_error(errors: list[str], path: str, *fragments: str) -> None:
    """Some line starts with the field path and mentions every fragment (the bad value...)."""
    for line in errors:
        if line.startswith(f"{path}:") and all(f in line for f in fragments):
            return
    pytest.fail(f"no error for {path} mentioning {fragments}; got {errors}")


def write(tmp_path: Path, text: str | bytes, name: str = "weir.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- the example and defaults ---------------------------------------------------------------


def test_interface_example_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_ADMIN_TOKEN", "s3cret")
    cfg = load_config(write(tmp_path, INTERFACE_EXAMPLE))
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.admin.listen == "127.0.0.1:9901"
    assert cfg.admin.token == "s3cret"
    assert cfg.state_file == "weir.state.json"
    (shop,) = cfg.services
    assert shop.name == "shop"
    assert shop.match.hosts == ["shop.example.com"]
    assert shop.match.path_prefix == "/"
    assert list(shop.versions) == ["stable", "canary", "shadow"]
    assert shop.versions["stable"].upstreams == ["127.0.0.1:9001", "127.0.0.1:9011"]
    assert shop.weights == {"stable": 95, "canary": 5}
    assert shop.sticky is not None
    assert (shop.sticky.header, shop.sticky.cookie) == ("x-user-id", "user_id")
    assert shop.rules[0].version == "canary"
    assert shop.rules[0].match.headers["x-user-group"].exact == "internal-beta"
    assert shop.mirror[0].version == "shadow"
    assert shop.mirror[0].percent == 100
    assert shop.drain.timeout == 30.0
    assert shop.rollout is not None
    assert shop.rollout.strategy == "canary"
    assert len(shop.rollout.steps) == 5
    assert shop.rollout.steps[1].pause is not None and shop.rollout.steps[1].pause.duration == 300
    assert shop.rollout.analysis is not None and shop.rollout.analysis.failure_limit == 2


def test_interface_example_without_token_names_field_and_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIR_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, INTERFACE_EXAMPLE))
    assert_error(info.value.errors, "admin.token", "WEIR_ADMIN_TOKEN")


def test_minimal_config_defaults() -> None:
    cfg = parse_config(config(service(versions={"v1": {"upstreams": ["127.0.0.1:9001"]}})))
    assert isinstance(cfg, Config)
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.admin.listen == "127.0.0.1:9901"
    assert cfg.version_header is True
    svc = cfg.services[0]
    assert svc.weights is None
    assert svc.match.hosts == []
    assert svc.match.path_prefix == "/"
    assert svc.rules == [] and svc.mirror == [] and svc.sticky is None
    assert svc.drain.timeout == 30.0


def test_hosts_are_lower_cased() -> None:
    cfg = parse_config(config(service(match={"hosts": ["Shop.Example.COM", "*.Example.com"]})))
    assert cfg.services[0].match.hosts == ["shop.example.com", "*.example.com"]


def test_string_match_bare_string_means_exact() -> None:
    cfg = parse_config(config(service(rules=[
        {"match": {"headers": {"x-a": "one"}, "path": {"prefix": "/p"},
                   "cookies": {"c": {"regex": "^v[0-9]+$"}}}, "version": "canary"},
    ])))
    match = cfg.services[0].rules[0].match
    assert (match.headers["x-a"].exact, match.headers["x-a"].prefix) == ("one", None)
    assert match.path is not None and match.path.prefix == "/p"
    assert match.cookies["c"].regex == "^v[0-9]+$"


def test_config_is_immutable() -> None:
    cfg = parse_config(config())
    with pytest.raises(ValueError):
        cfg.listen = "127.0.0.1:1"  # type: ignore[misc]


def test_json_schema_describes_services() -> None:
    schema = json_schema()
    json.dumps(schema)  # serialisable
    assert "services" in schema["properties"]
    assert "services" in schema.get("required", [])


# --- durations and sizes --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0),
    ("1.5s", 1.5), (" 250ms ", 0.25), ("10", 10.0), (7, 7.0), (0.25, 0.25), (0, 0.0),
])
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "ms", "", "five seconds", "-5s", "5 minutes", -1, True])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("10MiB", 10 * 1024**2), ("512k", 512 * 1024), ("1GB", 10**9), ("1GiB", 1024**3),
    ("2kb", 2000), ("1.5k", 1536), ("4096", 4096), (100, 100), ("64KiB", 65536), ("3mb", 3 * 10**6),
])
def test_parse_size(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10QB", "lots", "-1", -1, "", True])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_durations_and_sizes_in_config() -> None:
    cfg = parse_config(config(
        service(drain={"timeout": "500ms"}, timeouts={"connect": "2s", "read": "5m"},
                sticky={"cookie": "uid", "cookie_max_age": "30d"}),
        limits={"max_header_bytes": "32KiB", "max_body_bytes": "10MiB",
                "header_timeout": 3, "idle_timeout": "1.5m"},
        upstream={"idle_timeout": "45s"},
    ))
    svc = cfg.services[0]
    assert svc.drain.timeout == 0.5
    assert svc.timeouts is not None
    assert (svc.timeouts.connect, svc.timeouts.read) == (2.0, 300.0)
    assert svc.sticky is not None and svc.sticky.cookie_max_age == 30 * 86400
    assert cfg.limits.max_header_bytes == 32 * 1024
    assert cfg.limits.max_body_bytes == 10 * 1024**2
    assert (cfg.limits.header_timeout, cfg.limits.idle_timeout) == (3.0, 90.0)
    assert cfg.upstream.idle_timeout == 45.0


def test_bad_duration_names_field_and_value() -> None:
    errors = errors_of(config(service(drain={"timeout": "5x"})))
    assert_error(errors, "services[0].drain.timeout", "'5x'", "duration")


def test_negative_duration_rejected() -> None:
    errors = errors_of(config(limits={"idle_timeout": -3}))
    assert_error(errors, "limits.idle_timeout", "-3", "negative")


def test_nan_duration_rejected() -> None:
    errors = errors_of(config(service(drain={"timeout": float("nan")})))
    assert_error(errors, "services[0].drain.timeout")


def test_bad_size_names_field_and_value() -> None:
    errors = errors_of(config(limits={"max_body_bytes": "10QB"}))
    assert_error(errors, "limits.max_body_bytes", "'10QB'", "size")


def test_size_below_minimum_rejected() -> None:
    errors = errors_of(config(limits={"max_header_bytes": "512"}))
    assert_error(errors, "limits.max_header_bytes", "1024")


# --- ${ENV} expansion -----------------------------------------------------------------------


def test_env_variable_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_TEST_TOKEN", "tok-123")
    monkeypatch.setenv("WEIR_TEST_PORT", "9055")
    cfg = parse_config(config(
        service(versions={"v1": {"upstreams": ["127.0.0.1:${WEIR_TEST_PORT}"]}}),
        admin={"token": "${WEIR_TEST_TOKEN}"},
    ))
    assert cfg.admin.token == "tok-123"
    assert cfg.services[0].versions["v1"].upstreams == ["127.0.0.1:9055"]


def test_env_default_used_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIR_TEST_HOST", raising=False)
    monkeypatch.delenv("WEIR_TEST_LISTEN_PORT", raising=False)
    monkeypatch.delenv("WEIR_TEST_TOKEN", raising=False)
    cfg = parse_config(config(
        listen="${WEIR_TEST_HOST:-127.0.0.2}:${WEIR_TEST_LISTEN_PORT:-8181}",
        admin={"token": "${WEIR_TEST_TOKEN:-}"},
    ))
    assert cfg.listen == "127.0.0.2:8181"
    assert cfg.admin.token is None  # an empty token means "no token": mutations refused


def test_env_value_wins_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_TEST_LISTEN", "127.0.0.3:8282")
    cfg = parse_config(config(listen="${WEIR_TEST_LISTEN:-127.0.0.1:8080}"))
    assert cfg.listen == "127.0.0.3:8282"


def test_env_default_used_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_TEST_LISTEN", "")
    cfg = parse_config(config(listen="${WEIR_TEST_LISTEN:-127.0.0.1:8383}"))
    assert cfg.listen == "127.0.0.1:8383"


def test_unset_env_variable_names_field_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIR_TEST_MISSING", raising=False)
    errors = errors_of(config(service(
        versions={"stable": {"upstreams": ["127.0.0.1:9001", "${WEIR_TEST_MISSING}"]}})))
    assert_error(errors, "services[0].versions.stable.upstreams[1]", "WEIR_TEST_MISSING")


def test_unset_env_variable_top_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIR_TEST_MISSING", raising=False)
    errors = errors_of(config(admin={"token": "Bearer ${WEIR_TEST_MISSING}"}))
    assert_error(errors, "admin.token", "WEIR_TEST_MISSING", "not set")


def test_env_value_is_not_parsed_as_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expansion happens after YAML parsing: a value can't inject keys or structure."""
    monkeypatch.setenv("WEIR_TEST_TOKEN", "a: b\nlisten: 0.0.0.0:1")
    path = write(tmp_path, "admin: {token: '${WEIR_TEST_TOKEN}'}\n"
                           "services: [{name: s, versions: {v: {upstreams: [127.0.0.1:9001]}}}]\n")
    cfg = load_config(path)
    assert cfg.admin.token == "a: b\nlisten: 0.0.0.0:1"
    assert cfg.listen == "127.0.0.1:8080"


def test_env_expansion_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_TEST_UPSTREAM", "127.0.0.1:9444")
    path = write(tmp_path, "services:\n  - name: s\n    versions:\n"
                           "      v: {upstreams: ['${WEIR_TEST_UPSTREAM}']}\n")
    assert load_config(path).services[0].versions["v"].upstreams == ["127.0.0.1:9444"]


# --- bad input: every error names the field path and the bad value -------------------------


def test_weight_for_unknown_version() -> None:
    errors = errors_of(config(service(weights={"stable": 90, "canari": 10})))
    assert_error(errors, "services[0].weights.canari", "no such version", "stable, canary")


def test_weight_for_unknown_version_canary() -> None:
    svc = service(versions={"stable": {"upstreams": ["127.0.0.1:9001"]}},
                  weights={"stable": 90, "canary": 10})
    assert_error(errors_of(config(svc)), "services[0].weights.canary", "no such version")


def test_negative_weight() -> None:
    errors = errors_of(config(service(weights={"stable": 90, "canary": -5})))
    assert_error(errors, "services[0].weights.canary", "-5")


def test_fractional_weight() -> None:
    errors = errors_of(config(service(weights={"stable": 90, "canary": 2.5})))
    assert_error(errors, "services[0].weights.canary", "2.5")


def test_all_weights_zero() -> None:
    errors = errors_of(config(service(weights={"stable": 0, "canary": 0})))
    assert_error(errors, "services[0].weights", "above 0")


@pytest.mark.parametrize("address", [
    "nope", "127.0.0.1", "127.0.0.1:", ":9001", "127.0.0.1:http", "127.0.0.1:70000",
    "127.0.0.1:-1",
])
def test_bad_upstream_address(address: str) -> None:
    svc = service(versions={"stable": {"upstreams": ["127.0.0.1:9001"]},
                            "canary": {"upstreams": ["127.0.0.1:9002", address]}})
    errors = errors_of(config(svc))
    assert_error(errors, "services[0].versions.canary.upstreams[1]", repr(address), "host:port")


def test_bad_first_upstream_address() -> None:
    svc = service(versions={"stable": {"upstreams": ["localhost"]}})
    assert_error(errors_of(config(svc)), "services[0].versions.stable.upstreams[0]", "'localhost'")


def test_upstream_address_with_scheme_rejected() -> None:
    svc = service(versions={"stable": {"upstreams": ["http://127.0.0.1:9001"]}})
    assert_error(errors_of(config(svc)), "services[0].versions.stable.upstreams[0]")


def test_ipv6_upstream_address_accepted() -> None:
    svc = service(versions={"stable": {"upstreams": ["[::1]:9001"]}})
    assert parse_config(config(svc)).services[0].versions["stable"].upstreams == ["[::1]:9001"]


def test_bad_listen_address() -> None:
    assert_error(errors_of(config(listen="8080")), "listen", "'8080'")
    assert_error(errors_of(config(admin={"listen": "x"})), "admin.listen", "'x'")


def test_version_without_upstreams() -> None:
    errors = errors_of(config(service(versions={"stable": {"upstreams": []}})))
    assert_error(errors, "services[0].versions.stable.upstreams")


def test_service_without_versions() -> None:
    assert_error(errors_of(config(service(versions={}))), "services[0].versions")


def test_no_services() -> None:
    assert_error(errors_of({"services": []}), "services")
    assert_error(errors_of({"listen": "127.0.0.1:8080"}), "services", "required")


def test_bad_version_name() -> None:
    errors = errors_of(config(service(versions={"bad name": {"upstreams": ["127.0.0.1:9001"]}})))
    assert_error(errors, "services[0].versions.bad name", "'bad name'")


def test_bad_service_name() -> None:
    assert_error(errors_of(config(service(name="my shop"))), "services[0].name", "'my shop'")


def test_rule_naming_unknown_version() -> None:
    errors = errors_of(config(service(rules=[
        {"match": {"headers": {"x-a": "1"}}, "version": "canary"},
        {"match": {"headers": {"x-b": "1"}}, "version": "beta"},
    ])))
    assert_error(errors, "services[0].rules[1].version", "'beta'", "no such version")
    assert not any(line.startswith("services[0].rules[0]") for line in errors)


def test_mirror_naming_unknown_version() -> None:
    errors = errors_of(config(service(mirror=[{"version": "shadow"}])))
    assert_error(errors, "services[0].mirror[0].version", "'shadow'", "no such version")


def test_mirror_percent_out_of_range() -> None:
    errors = errors_of(config(service(mirror=[{"version": "canary", "percent": 150}])))
    assert_error(errors, "services[0].mirror[0].percent", "150")


def test_bad_regex() -> None:
    errors = errors_of(config(service(rules=[
        {"match": {"headers": {"x-a": {"regex": "(unclosed"}}}, "version": "canary"}])))
    assert_error(errors, "services[0].rules[0].match.headers.x-a", "invalid regex", "(unclosed")


def test_bad_regex_in_path() -> None:
    errors = errors_of(config(service(rules=[
        {"match": {"path": {"regex": "[a-"}}, "version": "canary"}])))
    assert_error(errors, "services[0].rules[0].match.path", "invalid regex", "[a-")


def test_string_match_with_two_kinds() -> None:
    errors = errors_of(config(service(rules=[
        {"match": {"cookies": {"c": {"exact": "a", "prefix": "b"}}}, "version": "canary"}])))
    assert_error(errors, "services[0].rules[0].match.cookies.c", "exactly one", "exact", "prefix")


def test_string_match_with_none() -> None:
    errors = errors_of(config(service(rules=[
        {"match": {"query": {"q": {}}}, "version": "canary"}])))
    assert_error(errors, "services[0].rules[0].match.query.q", "exactly one")


def test_rule_with_empty_match() -> None:
    errors = errors_of(config(service(rules=[{"match": {}, "version": "canary"}])))
    assert_error(errors, "services[0].rules[0].match", "at least one")


def test_sticky_without_header_or_cookie() -> None:
    errors = errors_of(config(service(sticky={"mint_cookie": False})))
    assert_error(errors, "services[0].sticky", "header", "cookie")


def test_mint_cookie_without_cookie() -> None:
    errors = errors_of(config(service(sticky={"header": "x-user-id", "mint_cookie": True})))
    assert_error(errors, "services[0].sticky", "mint_cookie")


def test_duplicate_service_names() -> None:
    errors = errors_of(config(service(), service(match={"path_prefix": "/b"})))
    assert_error(errors, "services[1].name", "duplicate", "'shop'")


def test_path_prefix_must_start_with_slash() -> None:
    errors = errors_of(config(service(match={"path_prefix": "api"})))
    assert_error(errors, "services[0].match.path_prefix", "'api'")


def test_bad_log_level_and_trusted_proxy() -> None:
    errors = errors_of(config(log_level="loud", trusted_proxies=["10.0.0.0/8", "not-an-ip"]))
    assert_error(errors, "log_level", "'loud'")
    assert_error(errors, "trusted_proxies", "'not-an-ip'")


@pytest.mark.parametrize(("data", "path"), [
    ({"servces": []}, "servces"),
    (config(lisen="127.0.0.1:8080"), "lisen"),
    (config(admin={"tokn": "x"}), "admin.tokn"),
    (config(service(wieghts={"stable": 1})), "services[0].wieghts"),
    (config(service(versions={"stable": {"upstream": ["127.0.0.1:9001"]}})),
     "services[0].versions.stable.upstream"),
    (config(service(sticky={"header": "x-user-id", "heder": "x"})), "services[0].sticky.heder"),
    (config(service(rules=[{"match": {"header": {"x": "y"}}, "version": "canary"}])),
     "services[0].rules[0].match.header"),
    (config(service(drain={"timout": "5s"})), "services[0].drain.timout"),
    (config(limits={"max_body": "1k"}), "limits.max_body"),
])
def test_unknown_keys_rejected(data: dict[str, Any], path: str) -> None:
    assert_error(errors_of(data), path, "not permitted")


def test_every_error_is_reported() -> None:
    data = config(service(drain={"timeout": "soon"},
                          versions={"stable": {"upstreams": ["nope"]}}),
                  listen="bad")
    errors = errors_of(data)
    assert_error(errors, "listen", "'bad'")
    assert_error(errors, "services[0].drain.timeout", "'soon'")
    assert_error(errors, "services[0].versions.stable.upstreams[0]", "'nope'")


def test_every_semantic_error_is_reported() -> None:
    errors = errors_of(config(
        service(weights={"stable": 1, "gone": 1}, rules=[
            {"match": {"path": "/x"}, "version": "beta"}]),
        service(),
    ))
    assert_error(errors, "services[0].weights.gone")
    assert_error(errors, "services[0].rules[0].version", "'beta'")
    assert_error(errors, "services[1].name", "duplicate")


def test_field_and_cross_field_errors_reported_together() -> None:
    errors = errors_of(config(service(drain={"timeout": "soon"},
                                      weights={"stable": 90, "gone": 10})))
    assert_error(errors, "services[0].drain.timeout", "'soon'")
    assert_error(errors, "services[0].weights.gone", "no such version")


def test_parse_config_does_not_mutate_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_TEST_TOKEN", "t")
    data = config(admin={"token": "${WEIR_TEST_TOKEN}"})
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before


def test_config_error_str_lists_source_and_lines() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(listen="bad", log_level="loud"), source="prod.yaml")
    text = str(info.value)
    assert text.startswith("prod.yaml: 2 error(s)")
    assert "\n  - listen: " in text and "\n  - log_level: " in text


# --- files: YAML errors, wrong root, missing -------------------------------------------------


def test_load_config_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  - name: s\n    versions:\n"
                           "      v1: {upstreams: [127.0.0.1:9001]}\n")
    cfg = load_config(path)
    assert cfg.services[0].versions["v1"].upstreams == ["127.0.0.1:9001"]
    assert load_config(str(path)) == cfg


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  - name: s\n    versions: {v1: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    (line,) = info.value.errors
    assert "YAML" in line
    assert "line" in line  # where the parser gave up


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  - name: s\n   versions: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize(("text", "shown"), [
    ("- a\n- b\n", "['a', 'b']"),
    ("just a string\n", "'just a string'"),
    ("42\n", "42"),
    ("", "None"),
    ("# only a comment\n", "None"),
])
def test_non_mapping_root(tmp_path: Path, text: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert_error(info.value.errors, "<root>", "mapping", shown)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert "cannot read" in info.value.errors[0]
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert "cannot read" in info.value.errors[0]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"services:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError):
        load_config(path)
