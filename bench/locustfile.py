"""A realistic request mix for a running Weir, for Locust.

Four kinds of simulated users, in proportion to their ``weight``:

- ``StickyUser`` (5): logged-in visitors. Each carries a user ID, half of them in the
  ``x-user-id`` header and half in the ``weir_uid`` cookie, and browses pages and an API.
  After about ``--session-requests`` requests a visitor leaves and a new one (a new ID) takes
  its place, so the default 30 s run with 50 Locust users hashes a few hundred distinct IDs,
  not 35: the split between versions then follows the weights more closely than the luck of
  35 draws would.
- ``AnonymousUser`` (3): plain GETs with no user key (split per request by weight).
- ``Uploader`` (1): logged-in users POSTing bodies of 2 KiB to 256 KiB (log-uniform).
- ``BetaTester`` (1): logged-in users with ``x-user-group: internal-beta``, which the rules
  of config/beta-header.yaml (and bench/locust_run.py's config) send to version ``beta``.

Checks, each counted as a Locust failure: a non-2xx answer; a sticky user whose
``x-weir-version`` changes between requests (Weir must keep a user on one version); a beta
tester answered by another version than ``--beta-version``; an upload whose size the backend
reports (``x-received-bytes``, sent by bench/locust_run.py's backends) differs from what was
sent. Every request also carries ``x-bench-kind`` so that backends can count each kind.

    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8080 --csv results/weir

bench/locust_run.py starts backends and Weir, runs this and summarizes. See bench/README.md.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from typing import Any

import gevent
from locust import FastHttpUser, events, stats, task
from locust.env import Environment

# One random blob, sliced per upload: generating random bytes per request would cost the
# load generator more CPU than sending them.
_BLOB = random.randbytes(512 * 1024)
# Unique across the processes of a distributed run too: a random prefix per process.
_ID_PREFIX = os.urandom(3).hex()
_ids = itertools.count(1)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("weir bench mix (bench/locustfile.py)")
    group.add_argument("--user-header", default="x-user-id",
                       help="header carrying a sticky user's ID (default x-user-id)")
    group.add_argument("--user-cookie", default="weir_uid",
                       help="cookie carrying a sticky user's ID (default weir_uid)")
    group.add_argument("--beta-header", default="x-user-group: internal-beta",
                       help="'name: value' sent by beta testers")
    group.add_argument("--beta-version", default="beta",
                       help="x-weir-version beta testers must get; empty: not checked")
    group.add_argument("--session-requests", type=int, default=10,
                       help="mean requests per visitor before a new user ID (default 10)")
    group.add_argument("--upload-kib", default="2-256",
                       help="upload body sizes in KiB, MIN-MAX, log-uniform (default 2-256)")
    group.add_argument("--think-ms", default="50-500",
                       help="pause between a user's requests in ms, MIN-MAX (default 50-500)")
    group.add_argument("--no-sticky-check", action="store_true",
                       help="don't fail requests whose version changed for a user (use "
                            "while weights move during the run)")


@events.test_stop.add_listener
def _last_csv_write(environment: Environment, **_kwargs: Any) -> None:
    # Locust rewrites its --csv files once a second and does not write them again at exit, so
    # the requests of the last second would be missing from them (about 10% of a 10 s run).
    # test_stop fires once every user has stopped: one more turn of the writer makes the CSV
    # final.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(stats.CSV_STATS_INTERVAL_SEC + 0.25)


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    lo = float(low)
    hi = float(high or low)
    if not 0 <= lo <= hi:
        raise ValueError(f"bad range {text!r}: want MIN-MAX with 0 <= MIN <= MAX")
    return lo, hi


def _options(env: Environment) -> Any:
    # parsed_options is None when the file is used as a library (e.g. in a test).
    return env.parsed_options


# Each user ID -> the version that first answered it; shared by all users of this process.
_sticky_seen: dict[str, str] = {}


class _WeirUser(FastHttpUser):
    """Shared plumbing: think time, user identity, version checks."""

    abstract = True
    kind = "anon"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = _options(environment)
        self.think = _range(opts.think_ms if opts else "50-500")
        self.user_header: str = opts.user_header if opts else "x-user-id"
        self.user_cookie: str = opts.user_cookie if opts else "weir_uid"
        self.session_requests: int = max(1, opts.session_requests if opts else 10)
        self.check_sticky = not (opts and opts.no_sticky_check)
        # Half the logged-in users send their ID as a header, half as a cookie: Weir reads
        # the header first, then the cookie, and both paths should be exercised.
        self.by_cookie = random.random() < 0.5
        self.user_id = ""
        self.left = 0
        self.new_visitor()

    def wait_time(self) -> float:
        return random.uniform(*self.think) / 1000.0

    def new_visitor(self) -> None:
        self.user_id = f"u{_ID_PREFIX}-{next(_ids)}"
        # Geometric-ish session lengths around the mean, at least 1.
        self.left = max(1, round(random.expovariate(1 / self.session_requests)))

    def identity(self) -> dict[str, str]:
        self.left -= 1
        if self.left < 0:
            self.new_visitor()
            self.left -= 1
        if self.by_cookie:
            return {"cookie": f"{self.user_cookie}={self.user_id}; theme=dark"}
        return {self.user_header: self.user_id}

    def headers(self, **extra: str) -> dict[str, str]:
        return {"x-bench-kind": self.kind, "accept": "text/html,application/json", **extra}

    def check_version(self, response: Any, user_id: str | None) -> None:
        """Fail the request if a sticky user changed version; otherwise report success."""
        if not 200 <= response.status_code < 300:
            response.failure(f"status {response.status_code}")
            return
        version = response.headers.get("x-weir-version") if response.headers else None
        if user_id and version and self.check_sticky:
            first = _sticky_seen.setdefault(user_id, version)
            if first != version:
                response.failure(f"sticky user moved from {first} to {version}")
                return
        response.success()

    def get(self, path: str, name: str, user: bool, **extra: str) -> None:
        headers = self.headers(**extra)
        if user:
            headers.update(self.identity())
        with self.client.get(path, headers=headers, name=name, catch_response=True) as resp:
            self.check_version(resp, self.user_id if user else None)


class StickyUser(_WeirUser):
    """A logged-in visitor browsing: the bulk of the traffic."""

    weight = 5
    kind = "sticky"

    @task(4)
    def home(self) -> None:
        self.get("/", "/", user=True)

    @task(6)
    def product(self) -> None:
        self.get(f"/products/{random.randrange(1, 5000)}", "/products/[id]", user=True)

    @task(3)
    def cart(self) -> None:
        self.get("/api/cart", "/api/cart", user=True, accept="application/json")


class AnonymousUser(_WeirUser):
    """Plain GETs without any user key: Weir splits them per request by weight."""

    weight = 3
    kind = "anon"

    @task(3)
    def home(self) -> None:
        self.get("/", "/ (anonymous)", user=False)

    @task(2)
    def asset(self) -> None:
        self.get(f"/static/app.{random.randrange(20)}.js", "/static/[asset]", user=False)

    @task(1)
    def search(self) -> None:
        self.get(f"/search?q=item{random.randrange(1000)}", "/search", user=False)


class Uploader(_WeirUser):
    """A logged-in user uploading a body of a few KiB to a few hundred KiB."""

    weight = 1
    kind = "upload"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = _options(environment)
        low, high = _range(opts.upload_kib if opts else "2-256")
        if high * 1024 > len(_BLOB):
            raise ValueError(f"--upload-kib: at most {len(_BLOB) // 1024} KiB")
        self.log_sizes = (math.log(max(low, 0.001) * 1024), math.log(high * 1024))

    @task
    def upload(self) -> None:
        size = round(math.exp(random.uniform(*self.log_sizes)))
        offset = random.randrange(len(_BLOB) - size + 1)
        body = _BLOB[offset : offset + size]
        headers = self.headers(**{"content-type": "application/octet-stream"})
        headers.update(self.identity())
        with self.client.post("/upload", data=body, headers=headers, name="/upload",
                              catch_response=True) as resp:
            received = resp.headers.get("x-received-bytes") if resp.headers else None
            if 200 <= resp.status_code < 300 and received is not None and int(received) != size:
                resp.failure(f"sent {size} bytes, the backend got {received}")
                return
            self.check_version(resp, self.user_id)


class BetaTester(_WeirUser):
    """An internal tester: a header rule must send every request to the beta version."""

    weight = 1
    kind = "beta"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = _options(environment)
        name, _, value = (opts.beta_header if opts else "x-user-group: internal-beta").partition(
            ":")
        self.beta_header = {name.strip().lower(): value.strip()}
        self.beta_version: str = opts.beta_version if opts else "beta"

    def beta_get(self, path: str, name: str) -> None:
        headers = self.headers(**self.beta_header)
        headers.update(self.identity())
        with self.client.get(path, headers=headers, name=name, catch_response=True) as resp:
            version = resp.headers.get("x-weir-version") if resp.headers else None
            if (200 <= resp.status_code < 300 and self.beta_version
                    and version != self.beta_version):
                resp.failure(f"beta tester got version {version}, not {self.beta_version}")
                return
            # The rule wins over sticky hashing, so the tester's ID is not checked for
            # stickiness here (it would be on `beta` while the hash says otherwise).
            self.check_version(resp, None)

    @task(2)
    def home(self) -> None:
        self.beta_get("/", "/ (beta)")

    @task(3)
    def product(self) -> None:
        self.beta_get(f"/products/{random.randrange(1, 5000)}", "/products/[id] (beta)")
