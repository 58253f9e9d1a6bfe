"""The config file's model: pydantic classes for every key, with their defaults and
checks. What the YAML means; config/loader.py reads it."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.I)


_SIZE_UNITS = {
    None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
    "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """'500ms', '30s', '5m', '1h', '2d' or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 30s or 5m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 500ms, 30s or 5m, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and not negative, got {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """'10MiB', '512k', '1GB' or a bare number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512k, 10MiB or 1GiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 512k, 10MiB or 1GiB, got {value!r}")
        unit = match.group(2).lower() if match.group(2) else None
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


_HOST_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])$")


def parse_address(value: Any, lowest_port: int = 1) -> str:
    """'host:port' (IPv6 as '[::1]:port'); returned unchanged once checked."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if (not sep or not _HOST_RE.match(host) or not port.isdigit()
            or not lowest_port <= int(port) < 65536):
        raise ValueError(f"expected host:port, like 127.0.0.1:9001, got {value!r}")
    return text


def parse_listen_address(value: Any) -> str:
    """Like an upstream address, but port 0 (any free port) is allowed."""
    return parse_address(value, lowest_port=0)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": ["string", "number"], "examples": ["500ms", "30s", "5m"]}),
]


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": ["string", "integer"], "examples": ["64KiB", "10MiB"]}),
]


Address = Annotated[
    str,
    BeforeValidator(parse_address),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:9001"]}),
]


ListenAddress = Annotated[
    str,
    BeforeValidator(parse_listen_address),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:8080"]}),
]


def _http_url(value: str) -> str:
    """An absolute http:// or https:// URL with a host (the notifier POSTs to it as is)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or any(c.isspace() for c in value)):
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    return value


HttpUrl = Annotated[
    str,
    AfterValidator(_http_url),
    WithJsonSchema({"type": "string", "format": "uri"}),
]


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


# Weights are relative; a bound keeps the arithmetic of weighted picks in range.
MAX_WEIGHT = 1_000_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StringMatch(Strict):
    """One of exact, prefix or regex. A bare string in YAML means exact."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_string_is_exact(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"exact": str(value).lower()}  # YAML's `yes` arrives as True
        if isinstance(value, str | int | float):
            return {"exact": str(value)}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of exact, prefix or regex (got {given or 'none'})")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from None
        return self


class RuleMatch(Strict):
    """All conditions must hold (AND). Header names are case-insensitive."""

    headers: dict[str, StringMatch] = {}
    cookies: dict[str, StringMatch] = {}
    query: dict[str, StringMatch] = {}
    path: StringMatch | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> RuleMatch:
        if not (self.headers or self.cookies or self.query or self.path):
            raise ValueError("a rule needs at least one of headers, cookies, query or path")
        return self


class Rule(Strict):
    match: RuleMatch
    version: str


class Sticky(Strict):
    """Hash a user key (header first, then cookie) to a version, stable across restarts."""

    header: str | None = None
    cookie: str | None = None
    mint_cookie: bool = False
    cookie_max_age: Duration = 365 * 86400.0

    @model_validator(mode="after")
    def _has_key(self) -> Sticky:
        if not self.header and not self.cookie:
            raise ValueError("sticky needs a header, a cookie or both to read the user key from")
        if self.mint_cookie and not self.cookie:
            raise ValueError("mint_cookie needs cookie: the name of the cookie to set")
        return self


class UpstreamTLS(Strict):
    """HTTPS to a version's upstreams. ``tls: {}`` verifies against the system CAs with the
    upstream's host as the name to check (and SNI)."""

    verify: bool = True
    ca_file: str | None = None      # a private CA instead of the system ones
    server_name: str | None = Field(default=None, min_length=1)  # SNI and name to check


class GrpcHealthCheck(Strict):
    """The gRPC health protocol (grpc.health.v1.Health/Check) instead of a GET: a check
    passes when ``service`` ("": the whole server) answers SERVING."""

    service: str = ""


class HealthCheck(Strict):
    """Active readiness probe: a GET of ``path`` on every upstream each ``interval``; a 2xx or
    3xx within ``timeout`` passes. Defaults follow Kubernetes probes (1s timeout, 3 failures
    to go out) with Envoy's habit of 2 passes to come back. With ``grpc``, the probe is the
    gRPC health protocol (upstreams that speak HTTP/2 only)."""

    path: str = "/healthz"
    grpc: GrpcHealthCheck | None = None
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(default=2, ge=1)
    unhealthy_threshold: int = Field(default=3, ge=1)

    @field_validator("path")
    @classmethod
    def _starts_with_slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with '/', got {value!r}")
        return value

    @field_validator("interval", "timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0")
        return value


class OutlierDetection(Strict):
    """Passive ejection, Envoy's meaning: ``consecutive_failures`` 5xx answers, connect
    failures or read timeouts in a row eject an upstream for ``base_ejection_time`` times the
    number of times it has been ejected, capped at ``max_ejection_time``."""

    consecutive_failures: int = Field(default=5, ge=1)
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)  # at least one may always go

    @field_validator("base_ejection_time")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0")
        return value

    @model_validator(mode="after")
    def _max_not_below_base(self) -> OutlierDetection:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError(f"max_ejection_time ({self.max_ejection_time:g}s) must not be "
                             f"below base_ejection_time ({self.base_ejection_time:g}s)")
        return self


class CircuitBreaker(Strict):
    """At most ``max_requests`` requests in flight to one upstream address (Envoy's default
    limit); a version whose upstreams are all full answers 503 with Retry-After."""

    max_requests: int = Field(default=1024, ge=1)


class SlowStart(Strict):
    """An upstream that joins while others of its version serve (added by a reload,
    undrained, back from an ejection or from failing health checks) gets a share of its
    version's requests that grows from a tenth of its full share to all of it over
    ``window``, as Envoy's slow_start_config and HAProxy's slowstart do for a cold instance."""

    window: Duration

    @field_validator("window")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0")
        return value


UpstreamProtocol = Literal["http1", "h2c", "h2"]


class VersionConfig(Strict):
    upstreams: list[Address] = Field(min_length=1)
    revision: str | None = None
    # What its upstreams speak: HTTP/1.1 (over TLS with ``tls``), HTTP/2 in cleartext with
    # prior knowledge (h2c, how gRPC servers listen inside a network), or HTTP/2 over TLS
    # (h2: ``tls`` defaults to ``{}``, ALPN offers h2 alone).
    protocol: UpstreamProtocol = "http1"
    tls: UpstreamTLS | None = None
    health_check: HealthCheck | None = None  # fields set here override the service's
    slow_start: SlowStart | None = None  # overrides the service's

    @model_validator(mode="before")
    @classmethod
    def _h2_means_tls(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") == "h2" and data.get("tls") is None:
            return {**data, "tls": {}}
        return data

    @model_validator(mode="after")
    def _h2c_is_cleartext(self) -> VersionConfig:
        if self.protocol == "h2c" and self.tls is not None:
            raise ValueError("protocol h2c is HTTP/2 without TLS; for HTTP/2 over TLS to the "
                             "upstreams use protocol: h2 (with tls: {...} if needed)")
        return self


class ServiceMatch(Strict):
    hosts: list[str] = []
    path_prefix: str = "/"

    @field_validator("path_prefix")
    @classmethod
    def _starts_with_slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path_prefix must start with '/', got {value!r}")
        return value

    @field_validator("hosts")
    @classmethod
    def _plain_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if host == "*":
                raise ValueError("leave hosts out (or empty) to match any host, not '*'")
            if ":" in host.strip("[]") and not host.startswith("["):
                raise ValueError(f"hosts are matched without the port, got {host!r}")
            if "*" in host and not (host.startswith("*.") and "*" not in host[1:]):
                raise ValueError(f"a wildcard host must look like '*.example.com', got {host!r}")
        return [h.lower() for h in value]


class Drain(Strict):
    timeout: Duration = 30.0


class MirrorIgnore(Strict):
    """Fields never compared: headers by name, JSON paths (``meta.request_id``,
    ``items[*].updated_at``) with everything under them."""

    headers: list[str] = []
    json_paths: list[str] = []


class Mirror(Strict):
    """Copy a share of requests to a shadow version and throw its answers away."""

    version: str
    percent: float = Field(default=100.0, ge=0, le=100)
    methods: list[str] = ["GET", "HEAD", "OPTIONS"]  # idempotent by default
    max_body_bytes: ByteSize = 64 * 1024    # larger request bodies are not mirrored
    max_concurrent: int = Field(default=64, ge=1)
    max_queued_bytes: ByteSize = 8 * 1024 * 1024
    timeout: Duration = 5.0
    host_suffix: bool = False               # send Host as "<host>-shadow"
    compare: bool = False                   # compare status and body digest with the primary
    # Diffy's noise: copies of baseline_percent of the compared requests go to this version
    # (the primary) once more; a field that differs between two of its answers is noise.
    # Implies compare.
    baseline: str | None = None
    baseline_percent: float = Field(default=20.0, gt=0, le=100)
    ignore: MirrorIgnore = MirrorIgnore()

    @property
    def compares(self) -> bool:
        return self.compare or self.baseline is not None

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]


class PrometheusCheck(Strict):
    """A PromQL query whose one value is the check's measure. ``{{service}}``,
    ``{{version}}`` and ``{{window}}`` (the analysis interval, e.g. ``30s``) are filled in,
    once for the canary and once for stable."""

    query: str = Field(min_length=1, max_length=10_000)
    url: HttpUrl | None = None  # default: the analysis source's url


class HttpCheck(Strict):
    """Argo's web provider: GET ``url`` (templated like a query) and read the number at
    ``json_path`` (``data.value``, ``$.items[0].score``) of the JSON answer."""

    url: HttpUrl
    json_path: str = Field(min_length=1, max_length=500)
    headers: dict[str, str] = {}


class CustomCheck(Strict):
    """A check on your own metrics: the canary's value against ``max`` / ``min``, or against
    stable's value in the same window (``max_increase``: canary minus stable; ``max_ratio``:
    canary over stable). No data, or no answer, is inconclusive, never a failure."""

    name: Name
    prometheus: PrometheusCheck | None = None
    http: HttpCheck | None = None
    max: float | None = None
    min: float | None = None
    max_increase: float | None = None
    max_ratio: float | None = Field(default=None, gt=0)
    timeout: Duration = 5.0
    dry_run: bool = False  # measured and shown, never fails the rollout

    @model_validator(mode="after")
    def _one_source_and_a_limit(self) -> CustomCheck:
        if (self.prometheus is None) == (self.http is None):
            raise ValueError(f"custom check {self.name!r} needs exactly one of prometheus or "
                             f"http")
        if all(limit is None for limit in (self.max, self.min, self.max_increase,
                                           self.max_ratio)):
            raise ValueError(f"custom check {self.name!r} needs a limit: max, min, "
                             f"max_increase or max_ratio")
        if self.timeout <= 0:
            raise ValueError("timeout must be above 0")
        return self

    @property
    def relative(self) -> bool:
        return self.max_increase is not None or self.max_ratio is not None


# The built-in checks, by the name a result's failed_checks and dry_run use.
BUILTIN_CHECKS = ("max_error_rate", "max_error_rate_increase", "max_p99", "max_p99_ratio",
                  "max_p95", "max_p50")


class AnalysisChecks(Strict):
    """Absolute limits on the canary, or limits relative to stable in the same window."""

    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_error_rate_increase: float | None = Field(default=None, ge=0, le=1)
    max_p99: Duration | None = None
    max_p99_ratio: float | None = Field(default=None, gt=0)
    max_p95: Duration | None = None
    max_p50: Duration | None = None
    custom: list[CustomCheck] = []
    # Checks (built-in or custom, by name) measured and shown but never failing the rollout:
    # a new check's dry run before it may roll anything back.
    dry_run: list[str] = []

    @model_validator(mode="after")
    def _known_names(self) -> AnalysisChecks:
        names = [c.name for c in self.custom]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"custom check names must be unique: {', '.join(doubled)}")
        clash = sorted(set(names) & set(BUILTIN_CHECKS))
        if clash:
            raise ValueError(f"custom check names must differ from the built-in checks': "
                             f"{', '.join(clash)}")
        unknown = [n for n in self.dry_run if n not in BUILTIN_CHECKS and n not in names]
        if unknown:
            raise ValueError(f"dry_run names no check: {', '.join(unknown)} (the built-in "
                             f"ones are {', '.join(BUILTIN_CHECKS)}; custom: "
                             f"{', '.join(names) or 'none'})")
        return self

    def thresholds(self) -> dict[str, float]:
        """The built-in checks that are set, with their limits."""
        return {name: getattr(self, name) for name in BUILTIN_CHECKS
                if getattr(self, name) is not None}

    def is_dry_run(self, name: str) -> bool:
        return name in self.dry_run or any(c.name == name and c.dry_run for c in self.custom)


class AnalysisSource(Strict):
    """Where analysis reads its numbers: this instance's own counts ("local"), or a Prometheus
    server that scrapes every instance (what a fleet behind a load balancer needs)."""

    type: Literal["local", "prometheus"] = "local"
    url: str | None = None                # e.g. http://127.0.0.1:9090
    timeout: Duration = 5.0
    labels: dict[str, str] = {}           # extra matchers, e.g. {job: weir}

    @model_validator(mode="after")
    def _url_for_prometheus(self) -> AnalysisSource:
        if self.type == "prometheus" and not self.url:
            raise ValueError("a prometheus source needs a url")
        return self


class Analysis(Strict):
    """Judge the canary from Weir's own per-version counts (or Prometheus), every ``interval``.

    Argo's meaning: the analysis fails once more than ``failure_limit`` measurements failed,
    and a rollout with more than ``inconclusive_limit`` inconclusive ones (fewer than
    ``min_requests`` in a window) pauses for a human instead of rolling back."""

    interval: Duration = 30.0
    min_requests: int = Field(default=100, ge=1)
    failure_limit: int = Field(default=0, ge=0)
    inconclusive_limit: int = Field(default=0, ge=0)
    start_step: int = Field(default=0, ge=0)  # background analysis runs from this step on
    checks: AnalysisChecks = AnalysisChecks()
    source: AnalysisSource = AnalysisSource()

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("interval must be above 0")
        return value

    @model_validator(mode="after")
    def _prometheus_for_custom_queries(self) -> Analysis:
        for check in self.checks.custom:
            if check.prometheus is not None and not (check.prometheus.url or self.source.url):
                raise ValueError(f"custom check {check.name!r} queries Prometheus: give it a "
                                 f"prometheus.url, or the analysis a source.url")
        return self


class Pause(Strict):
    duration: Duration | None = None  # none: until promoted
    # Until promoted, but no longer: the rollout is aborted when nobody promoted it in time
    # (argo-rollouts#2200). None: it waits as long as it takes.
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _timeout_without_duration(self) -> Pause:
        if self.timeout is not None and self.duration is not None:
            raise ValueError("timeout is for a pause until promoted (no duration): a pause "
                             "with a duration ends by itself")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be above 0")
        return self


class Gate(Strict):
    """Flagger's confirm-rollout: ``url`` gets a JSON POST every ``interval`` until it answers
    2xx, which lets the rollout go on; past ``timeout`` the rollout is aborted."""

    url: HttpUrl
    interval: Duration = 10.0
    timeout: Duration | None = None  # None: as long as it takes (the state shows how long)
    request_timeout: Duration = 5.0  # for each POST

    @model_validator(mode="after")
    def _positive(self) -> Gate:
        if self.interval <= 0 or self.request_timeout <= 0:
            raise ValueError("interval and request_timeout must be above 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be above 0")
        return self


class WebhookStep(Strict):
    """A step whose answer is a check: ``url`` gets one JSON POST (start a load test, run smoke
    tests) and its answer decides, 2xx going on and anything else (or none within
    ``timeout``) aborting the rollout."""

    url: HttpUrl
    timeout: Duration = 60.0

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("timeout must be above 0")
        return value


class MirrorStep(Strict):
    """Shadow as a rollout step (argo-rollouts#563): for ``duration``, copies of ``percent``
    of the service's requests go to the canary while users are still answered by stable;
    then the canary's answers to them are judged against stable's own in the same window.
    Failing aborts the rollout before any user reaches the canary."""

    percent: float = Field(default=100.0, gt=0, le=100)
    duration: Duration
    methods: list[str] = ["GET", "HEAD", "OPTIONS"]  # copied requests: idempotent ones
    min_requests: int = Field(default=20, ge=1)      # fewer copies answered: inconclusive
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_p99_ratio: float | None = Field(default=None, gt=0)  # canary's over stable's
    max_mismatch_rate: float | None = Field(default=None, ge=0, le=1)  # answers that differ

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]

    @model_validator(mode="after")
    def _checks(self) -> MirrorStep:
        if self.duration <= 0:
            raise ValueError("duration must be above 0")
        if (self.max_error_rate, self.max_p99_ratio, self.max_mismatch_rate) == (None,) * 3:
            raise ValueError("a mirror step judges the canary: give it max_error_rate, "
                             "max_p99_ratio or max_mismatch_rate")
        return self


STEP_KINDS = ("set_weight", "pause", "analysis", "gate", "webhook", "mirror")


class Step(Strict):
    """One of: set_weight, pause, analysis (a check run once, inline), gate (wait for an
    outside system's go), webhook (an outside check run once)."""

    set_weight: int | None = Field(default=None, ge=0, le=100)
    pause: Pause | None = None
    analysis: Analysis | None = None
    gate: Gate | None = None
    webhook: WebhookStep | None = None
    mirror: MirrorStep | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Step:
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step is exactly one of {', '.join(STEP_KINDS)} "
                             f"(got {given or 'none'})")
        return self


class SmokeCheck(Strict):
    """Blue/green pre-promotion check: ``count`` requests to each preview upstream."""

    path: str = "/"
    method: str = "GET"
    status: int = Field(default=200, ge=100, le=599)
    count: int = Field(default=1, ge=1, le=1000)
    timeout: Duration = 5.0


class Promotion(Strict):
    auto: bool = False
    delay: Duration = 0.0


class Webhooks(Strict):
    """URLs that get a JSON POST on these events."""

    pre_rollout: str | None = None   # a failure (non-2xx) aborts the rollout
    promoted: str | None = None
    rollback: str | None = None
    timeout: Duration = 5.0


class Rollout(Strict):
    strategy: Literal["canary", "blue_green"] = "canary"
    # canary
    stable: str = "stable"
    canary: str = "canary"
    steps: list[Step] = []
    # blue/green
    active: str = "blue"
    preview: str = "green"
    preview_header: str = "x-weir-preview"  # requests with it set to "1" see the preview
    checks: list[SmokeCheck] = []
    promotion: Promotion = Promotion()
    post_promotion_window: Duration = 0.0   # analysis after a blue/green switch
    # both
    analysis: Analysis | None = None
    rollback_ramp: list[Annotated[int, Field(ge=0, le=100)]] = []  # canary weights on abort
    rollback_ramp_interval: Duration = 5.0
    auto_start: bool = True  # start when the new version's upstreams or revision change
    webhooks: Webhooks = Webhooks()


# The transitions a rollout announces, in the order a rollout goes through them. Defined here,
# with the config, because ``notifications[].events`` names them; the controller emits them.
ROLLOUT_EVENTS = ("started", "step", "analysis", "paused", "awaiting_promotion", "resumed",
                  "promoted", "aborted", "rolled_back", "completed")


def _rollout_event(value: str) -> str:
    if value not in ROLLOUT_EVENTS:
        raise ValueError(f"unknown event {value!r}; the events are "
                         f"{', '.join(ROLLOUT_EVENTS)}")
    return value


RolloutEvent = Annotated[
    str,
    AfterValidator(_rollout_event),
    WithJsonSchema({"type": "string", "enum": list(ROLLOUT_EVENTS)}),
]


class Notification(Strict):
    """A receiver of rollout events (proxy/rollout/notify.py delivers them): a JSON POST of
    each event, signed with ``secret`` when one is set, or a Slack incoming-webhook message."""

    url: HttpUrl
    format: Literal["json", "slack"] = "json"
    events: list[RolloutEvent] = Field(default=list(ROLLOUT_EVENTS), min_length=1)
    services: list[str] | None = Field(default=None, min_length=1)  # none: every service
    secret: str | None = Field(default=None, repr=False)  # kept out of logs and reprs
    timeout: Duration = 5.0  # for each try

    @field_validator("secret")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None  # `secret: ${HOOK_SECRET:-}` with the variable unset

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0")
        return value


class Timeouts(Strict):
    connect: Duration = 5.0
    read: Duration = 60.0


class RetryBudgetConfig(Strict):
    """Linkerd's retry budget (retryRatio, minRetriesPerSecond, ttl) and its defaults: over
    the last ``window``, retries may add ``ratio`` of the requests plus ``min_per_second``."""

    ratio: float = Field(default=0.2, ge=0, le=100)
    min_per_second: float = Field(default=10.0, ge=0, le=1_000_000)
    window: Duration = 10.0

    @field_validator("window")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("window must be above 0")
        return value


class Retries(Strict):
    """Send a failed request again, to another upstream of the same version when it has one.
    Only idempotent requests without a body, and only while nothing has reached the client."""

    attempts: int = Field(default=2, ge=1, le=10)  # tries in all, the first one included
    on_statuses: list[Annotated[int, Field(ge=400, le=599)]] = [502, 503, 504]
    on_connect_failure: bool = True  # refused, unreachable, connect timeout
    on_reset: bool = True            # closed before sending a byte of a response
    on_timeout: bool = False         # no response byte within the read timeout
    budget: RetryBudgetConfig = RetryBudgetConfig()


GRPC_STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


def _grpc_code(value: Any) -> Any:
    """A gRPC status by its name (``UNAVAILABLE``, any case) or its number."""
    if isinstance(value, str) and not value.isdigit():
        code = GRPC_STATUS_CODES.get(value.strip().upper())
        if code is None:
            raise ValueError(f"unknown gRPC status {value!r}; one of "
                             f"{', '.join(GRPC_STATUS_CODES)} or a number 0-16")
        return code
    return value


GrpcCode = Annotated[int, BeforeValidator(_grpc_code), Field(ge=0, le=16)]


class Grpc(Strict):
    """What a gRPC answer's grpc-status means to the analysis: the codes in ``error_codes``
    count as errors (in the error rate the rollout checks) even with HTTP status 200."""

    error_codes: list[GrpcCode] = [2, 4, 12, 13, 14, 15]


class Service(Strict):
    name: Name
    match: ServiceMatch = ServiceMatch()
    versions: dict[Name, VersionConfig] = Field(min_length=1)
    weights: dict[str, Annotated[int, Field(ge=0, le=MAX_WEIGHT)]] | None = None
    sticky: Sticky | None = None
    rules: list[Rule] = []
    mirror: list[Mirror] = []
    drain: Drain = Drain()
    timeouts: Timeouts | None = None
    rollout: Rollout | None = None
    retries: Retries | None = None  # off unless configured
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    circuit_breaker: CircuitBreaker | None = None
    slow_start: SlowStart | None = None  # off unless configured
    grpc: Grpc = Grpc()
    # TRACE is answered 405 by Weir unless this is set (then it goes to the app, like any
    # method): an app that echoes it would echo credentials and forwarding headers.
    allow_trace: bool = False

    def slow_start_for(self, version: str) -> SlowStart | None:
        return self.versions[version].slow_start or self.slow_start

    def health_check_for(self, version: str) -> HealthCheck | None:
        """The version's probe: the service's block with the version's own fields on top."""
        own = self.versions[version].health_check
        if own is None or self.health_check is None:
            return own or self.health_check
        return HealthCheck.model_validate({**self.health_check.model_dump(exclude_unset=True),
                                           **own.model_dump(exclude_unset=True)})

    @model_validator(mode="after")
    def _grpc_checks_need_http2(self) -> Service:
        for name, version in self.versions.items():
            check = self.health_check_for(name)
            if check is not None and check.grpc is not None and version.protocol == "http1":
                raise ValueError(f"version {name!r}: health_check.grpc (the gRPC health "
                                 "protocol) needs upstreams that speak HTTP/2: set its "
                                 "protocol to h2c or h2")
        return self


# What a token of the admin API may do, from least to most: a viewer changes nothing (reads
# need no token), a promoter drives a rollout that is under way (promote, pause, resume,
# abort), an operator does everything.
Role = Literal["viewer", "promoter", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "promoter", "operator")

# The name ``admin.token`` acts under (an operator) in the rollout records, the log and the
# actions in /api/status; no entry of ``admin.tokens`` may take it while ``admin.token`` is set.
ADMIN_TOKEN_NAME = "admin"


def role_allows(role: Role, needed: Role) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


class AdminToken(Strict):
    """One bearer token of the admin API: ``name`` is who acted, in every record of a change
    made with it (never the token itself)."""

    name: Name
    token: str
    role: Role

    @field_validator("token")
    @classmethod
    def _usable(cls, value: str) -> str:
        if not value:
            raise ValueError("a token must not be empty (is its environment variable set?)")
        if value != value.strip():
            # The Authorization header's value is read stripped: such a token never matches.
            raise ValueError("a token must not start or end with whitespace")
        return value


class Admin(Strict):
    listen: ListenAddress = "127.0.0.1:9901"
    token: str | None = None  # one operator token, named ADMIN_TOKEN_NAME
    # Unique names and tokens (and none equal to ``token``): checked with the file's other
    # cross-field rules in config/loader.py, each error at its entry's path.
    tokens: list[AdminToken] = []
    # Where people reach the admin listener (behind a load balancer, say): the links in
    # notifications point at its /dashboard. None: built from ``listen``.
    public_url: HttpUrl | None = None

    @field_validator("token")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None  # `token: ${WEIR_ADMIN_TOKEN:-}` with the variable unset

    def credentials(self) -> list[AdminToken]:
        """Every token that is accepted, ``admin.token`` first as the operator named
        ADMIN_TOKEN_NAME."""
        # Built unchecked: admin.token has always been taken as written.
        main = ([AdminToken.model_construct(name=ADMIN_TOKEN_NAME, token=self.token,
                                            role="operator")]
                if self.token is not None else [])
        return main + list(self.tokens)


class Limits(Strict):
    # Client connections open at once on the data listener, per process; more are answered
    # 503 and closed. None: half the open-file limit, as each client may hold an upstream
    # connection too (see dataplane.context.default_max_connections).
    max_connections: int | None = Field(default=None, ge=1)
    max_header_bytes: ByteSize = Field(default=64 * 1024, ge=1024)
    # HTTP/2 streams a client may have open at once on one connection (its
    # SETTINGS_MAX_CONCURRENT_STREAMS): HAProxy's default; nginx's is 128.
    max_concurrent_streams: int = Field(default=100, ge=1, le=2**31 - 1)
    max_body_bytes: ByteSize | None = None
    header_timeout: Duration = 10.0
    idle_timeout: Duration = 75.0


class UpstreamSettings(Strict):
    timeouts: Timeouts = Timeouts()
    idle_timeout: Duration = 30.0
    max_idle_per_upstream: int = Field(default=128, ge=0)
    # An upstream whose connect fails is out of rotation at once, until a background connect
    # probe succeeds; the last upstream of a version always stays in.
    eject_on_connect_failure: bool = True


def _tls_version(value: Any) -> Any:
    # YAML reads `min_version: 1.2` as a number.
    return str(value) if isinstance(value, float) else value


class ServerTLS(Strict):
    """HTTPS on the data listener. The files are read again on every reload."""

    cert_file: str          # PEM: the certificate, then any intermediates
    key_file: str           # PEM, unencrypted
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"


class Shutdown(Strict):
    """SIGTERM: /readyz turns 503, then after ``delay`` the listener closes; requests in flight
    get up to ``timeout`` to finish."""

    delay: Duration = 0.0
    timeout: Duration = 30.0


class StateStoreSettings(Strict):
    """Where runtime state lives. "file" (the default) is ``state_file``; "redis" shares it
    between instances behind one load balancer, and elects the one that runs the controller
    (then ``state_file``, if set, only seeds a Redis that holds no state yet)."""

    type: Literal["file", "redis"] = "file"
    url: str | None = None                # redis://127.0.0.1:6379/0
    key_prefix: str = "weir"
    leader_ttl: Duration = 3.0            # a dead controller's lock lapses after this long

    @model_validator(mode="after")
    def _url_for_redis(self) -> StateStoreSettings:
        if self.type == "redis" and not self.url:
            raise ValueError("a redis state_store needs a url")
        if self.leader_ttl < 1.5:
            raise ValueError("leader_ttl must be at least 1.5s (it is renewed every third of it)")
        return self


class Config(Strict):
    listen: ListenAddress = "127.0.0.1:8080"
    tls: ServerTLS | None = None
    admin: Admin = Admin()
    state_file: str | None = None
    state_store: StateStoreSettings = StateStoreSettings()
    watch: bool = True
    shutdown: Shutdown = Shutdown()
    trusted_proxies: list[str] = []
    version_header: bool = True
    limits: Limits = Limits()
    upstream: UpstreamSettings = UpstreamSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: str | None = None  # a file path, or "-" for stdout; JSON lines
    notifications: list[Notification] = []
    services: list[Service] = Field(min_length=1)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"expected an IP address or CIDR, got {item!r}") from None
        return value


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.errors)} error(s)"]
        lines += [f"  - {e}" for e in self.errors]
        return "\n".join(lines)


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["title"] = "Weir configuration"
    return schema
