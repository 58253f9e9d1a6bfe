"""proxy/dataplane/routing.py without sockets: host/path matching, rules, weights and sticky
hashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from proxy.config.loader import parse_config
from proxy.dataplane.routing import (
    REASON_RULE,
    REASON_STICKY,
    REASON_WEIGHT,
    Route,
    RouteTable,
    build_route_table,
)

from ..conftest import REPO_ROOT


class FakeBalancer:
    """Routing only stores the balancer; the data plane calls pick()."""

    def __init__(self, upstreams: tuple[str, ...], tls: object = None,
                 protocol: str = "http1") -> None:
        self.pools = list(upstreams)

    def pick(self) -> object:
        return self.pools[0]


class Req:
    """What routing reads from a request: lower-cased header names → raw values, and the URL."""

    def __init__(self, url: bytes = b"/", headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.hmap = {k.lower().encode(): v.encode() for k, v in (headers or {}).items()}


def pick_for(route: Route, req: Req) -> tuple[Any, str, bytes]:
    return route.pick_version(req.hmap, req.url)


def versions(*names: str) -> dict[str, Any]:
    return {name: {"upstreams": [f"127.0.0.1:{9001 + i}"]} for i, name in enumerate(names)}


def svc(name: str = "shop", vers: tuple[str, ...] = ("stable", "canary"), **extra: Any) -> dict:
    return {"name": name, "versions": versions(*vers), **extra}


def table(*services: dict[str, Any], weights_override: dict[str, dict[str, int]] | None = None,
          **top: Any) -> RouteTable:
    config = parse_config({"services": list(services), **top})
    return build_route_table(config, FakeBalancer, weights_override)


def route(**extra: Any) -> Route:
    (only,) = table(svc(**extra)).routes
    return only


def pick(r: Route, url: bytes = b"/", **headers: str) -> str:
    version, _, _ = pick_for(r, Req(url, {k.replace("_", "-"): v for k, v in headers.items()}))
    assert version is not None
    return version.name


def find(t: RouteTable, host: bytes, url: bytes = b"/") -> str | None:
    r = t.find_route(host, url)
    return r.name if r is not None else None


# --- build ----------------------------------------------------------------------------------


def test_build_hands_each_version_its_balancer() -> None:
    r = route(vers=("stable", "canary"), weights={"stable": 1, "canary": 1})
    assert set(r.versions) == {"stable", "canary"}
    stable = r.versions["stable"]
    assert isinstance(stable.balancer, FakeBalancer)
    assert stable.balancer.pools == ["127.0.0.1:9001"]
    assert stable.upstreams == ("127.0.0.1:9001",)
    assert r.versions["canary"].balancer.pools == ["127.0.0.1:9002"]
    assert stable.response_header == b"x-weir-version: stable\r\n"


def test_version_header_can_be_turned_off() -> None:
    t = table(svc(), version_header=False)
    assert all(v.response_header == b"" for v in t.routes[0].versions.values())


def test_generation_is_kept() -> None:
    config = parse_config({"services": [svc()]})
    assert build_route_table(config, FakeBalancer, generation=7).generation == 7


# --- host and path matching -----------------------------------------------------------------


def host_table() -> RouteTable:
    return table(
        svc("exact", match={"hosts": ["shop.example.com"]}),
        svc("wild", match={"hosts": ["*.example.com"]}),
        svc("deep-wild", match={"hosts": ["*.eu.example.com"]}),
        svc("catchall"),
    )


def test_exact_host() -> None:
    assert find(host_table(), b"shop.example.com") == "exact"


def test_host_is_case_insensitive() -> None:
    assert find(host_table(), b"SHOP.Example.COM") == "exact"


def test_host_with_port() -> None:
    t = host_table()
    assert find(t, b"shop.example.com:8080") == "exact"
    assert find(t, b"api.example.com:443") == "wild"


def test_the_latest_host_remembered_never_answers_for_another() -> None:
    # find_route keeps the latest Host value's candidates; no Host at all (HTTP/1.0) starts
    # out remembered, and must get the catch-all, not an empty answer.
    t = host_table()
    for host, expected in ((b"", "catchall"), (b"shop.example.com", "exact"),
                           (b"shop.example.com", "exact"), (b"", "catchall"),
                           (b"a.eu.example.com", "deep-wild"), (b"other.test", "catchall"),
                           (b"shop.example.com", "exact")):
        assert find(t, host) == expected, host


def test_wildcard_host() -> None:
    t = host_table()
    assert find(t, b"api.example.com") == "wild"
    assert find(t, b"a.b.example.com") == "wild"
    assert find(t, b"x.eu.example.com") == "deep-wild"  # the longer suffix is more specific


def test_wildcard_does_not_match_apex_or_lookalike() -> None:
    t = host_table()
    assert find(t, b"example.com") == "catchall"
    assert find(t, b"badexample.com") == "catchall"


def test_no_host_route_is_catch_all() -> None:
    t = host_table()
    assert find(t, b"other.test") == "catchall"
    assert find(t, b"") == "catchall"
    assert find(t, b"127.0.0.1:8080") == "catchall"


def test_ipv6_host_with_port() -> None:
    t = table(svc("v6", match={"hosts": ["[::1]"]}), svc("other"))
    assert find(t, b"[::1]:8080") == "v6"
    assert find(t, b"[::1]") == "v6"
    assert find(t, b"[::2]:8080") == "other"


def test_no_match_gives_none() -> None:
    t = table(svc("a", match={"hosts": ["a.test"]}), svc("b", match={"path_prefix": "/b"}))
    assert find(t, b"z.test", b"/x") is None
    assert find(t, b"a.test", b"/x") == "a"
    assert find(t, b"z.test", b"/b/x") == "b"


def test_longest_path_prefix_wins() -> None:
    t = table(svc("root"), svc("api", match={"path_prefix": "/api"}),
              svc("v2", match={"path_prefix": "/api/v2/"}))
    assert find(t, b"h", b"/") == "root"
    assert find(t, b"h", b"/index.html") == "root"
    assert find(t, b"h", b"/api") == "api"
    assert find(t, b"h", b"/api/v1/users") == "api"
    assert find(t, b"h", b"/api/v2/users?x=1") == "v2"


def test_longest_path_prefix_wins_regardless_of_order() -> None:
    t = table(svc("v2", match={"path_prefix": "/api/v2/"}), svc("root"),
              svc("api", match={"path_prefix": "/api"}))
    assert find(t, b"h", b"/api/v2/users") == "v2"
    assert find(t, b"h", b"/api/x") == "api"
    assert find(t, b"h", b"/x") == "root"


def test_path_prefix_within_a_host() -> None:
    t = table(svc("shop-api", match={"hosts": ["shop.test"], "path_prefix": "/api"}),
              svc("shop", match={"hosts": ["shop.test"]}), svc("rest"))
    assert find(t, b"shop.test", b"/api/cart") == "shop-api"
    assert find(t, b"shop.test", b"/cart") == "shop"
    assert find(t, b"blog.test", b"/api/cart") == "rest"


def test_host_specific_route_falls_back_to_catch_all_by_path() -> None:
    t = table(svc("shop-api", match={"hosts": ["shop.test"], "path_prefix": "/api"}),
              svc("rest"))
    assert find(t, b"shop.test", b"/api/x") == "shop-api"
    assert find(t, b"shop.test", b"/other") == "rest"


def test_absolute_form_url() -> None:
    t = table(svc("api", match={"path_prefix": "/api"}), svc("root"))
    assert find(t, b"h", b"http://h/api/x?y=1") == "api"
    assert find(t, b"h", b"http://h/other") == "root"
    assert find(t, b"h", b"http://h") == "root"


# --- rules ----------------------------------------------------------------------------------


def rule_route(*rules: dict[str, Any], **extra: Any) -> Route:
    return route(vers=("stable", "beta", "other"), weights={"stable": 100},
                 rules=list(rules), **extra)


def test_no_rule_match_falls_back_to_weights() -> None:
    r = rule_route({"match": {"headers": {"x-group": "beta"}}, "version": "beta"})
    version, reason, extra = pick_for(r, Req(b"/", {"x-group": "alpha"}))
    assert version is not None and version.name == "stable"
    assert (reason, extra) == (REASON_WEIGHT, b"")


def test_header_exact() -> None:
    r = rule_route({"match": {"headers": {"X-User-Group": "internal-beta"}}, "version": "beta"})
    version, reason, _ = pick_for(r, Req(b"/", {"x-user-group": "internal-beta"}))
    assert version is not None and version.name == "beta"
    assert reason == REASON_RULE
    assert pick(r, x_user_group="internal-beta-2") == "stable"
    assert pick(r, x_user_group="Internal-Beta") == "stable"  # values are case-sensitive
    assert pick(r) == "stable"


def test_header_prefix_and_regex() -> None:
    r = rule_route(
        {"match": {"headers": {"x-client": {"prefix": "ios/"}}}, "version": "beta"},
        {"match": {"headers": {"x-email": {"regex": r"@example\.com$"}}}, "version": "other"},
    )
    assert pick(r, x_client="ios/17.1") == "beta"
    assert pick(r, x_client="android/ios/") == "stable"
    assert pick(r, x_email="ann@example.com") == "other"
    assert pick(r, x_email="ann@example.com.evil") == "stable"


def test_cookie_match() -> None:
    r = rule_route(
        {"match": {"cookies": {"beta": "1"}}, "version": "beta"},
        {"match": {"cookies": {"plan": {"prefix": "gold"}}}, "version": "other"},
        {"match": {"cookies": {"ab": {"regex": "^b[0-9]$"}}}, "version": "other"},
    )
    assert pick(r, cookie="a=b; beta=1; c=d") == "beta"
    assert pick(r, cookie='beta="1"') == "beta"
    assert pick(r, cookie="beta=10") == "stable"
    assert pick(r, cookie="xbeta=1") == "stable"
    assert pick(r, cookie="plan=gold-annual") == "other"
    assert pick(r, cookie="ab=b7") == "other"
    assert pick(r, cookie="ab=b77") == "stable"
    assert pick(r) == "stable"


def test_query_match() -> None:
    r = rule_route(
        {"match": {"query": {"beta": "1"}}, "version": "beta"},
        {"match": {"query": {"name": "a b"}}, "version": "other"},
        {"match": {"query": {"ref": {"prefix": "mail"}}}, "version": "other"},
    )
    assert pick(r, b"/p?x=2&beta=1") == "beta"
    assert pick(r, b"/p?beta=2") == "stable"
    assert pick(r, b"/p?name=a%20b") == "other"
    assert pick(r, b"/p?name=a+b") == "other"
    assert pick(r, b"/p?ref=mail-2024#frag") == "other"
    assert pick(r, b"/beta=1") == "stable"


def test_path_match() -> None:
    r = rule_route(
        {"match": {"path": "/exact"}, "version": "beta"},
        {"match": {"path": {"prefix": "/new/"}}, "version": "other"},
        {"match": {"path": {"regex": r"^/items/[0-9]+$"}}, "version": "beta"},
    )
    assert pick(r, b"/exact") == "beta"
    assert pick(r, b"/exact?q=1") == "beta"  # the query is not part of the path
    assert pick(r, b"/exact/more") == "stable"
    assert pick(r, b"/new/thing") == "other"
    assert pick(r, b"http://host/new/thing") == "other"
    assert pick(r, b"/items/42") == "beta"
    assert pick(r, b"/items/abc") == "stable"


def test_conditions_in_one_rule_all_must_hold() -> None:
    r = rule_route({"match": {"headers": {"x-group": "beta"}, "path": {"prefix": "/app"}},
                    "version": "beta"})
    assert pick(r, b"/app/x", x_group="beta") == "beta"
    assert pick(r, b"/other", x_group="beta") == "stable"
    assert pick(r, b"/app/x") == "stable"


def test_first_matching_rule_wins() -> None:
    r = rule_route(
        {"match": {"headers": {"x-group": {"prefix": "be"}}}, "version": "other"},
        {"match": {"headers": {"x-group": "beta"}}, "version": "beta"},
    )
    assert pick(r, x_group="beta") == "other"
    r2 = rule_route(
        {"match": {"headers": {"x-group": "beta"}}, "version": "beta"},
        {"match": {"headers": {"x-group": {"prefix": "be"}}}, "version": "other"},
    )
    assert pick(r2, x_group="beta") == "beta"
    assert pick(r2, x_group="bet") == "other"


def test_rules_win_over_sticky() -> None:
    r = route(weights={"stable": 50, "canary": 50}, sticky={"header": "x-user-id"},
              rules=[{"match": {"headers": {"x-force": "canary"}}, "version": "canary"}])
    stable_users = [f"u{i}" for i in range(200) if pick(r, x_user_id=f"u{i}") == "stable"]
    assert stable_users
    for user in stable_users:
        assert pick(r, x_user_id=user, x_force="canary") == "canary"


def test_rule_can_target_version_with_weight_zero() -> None:
    r = route(weights={"stable": 100, "canary": 0},
              rules=[{"match": {"headers": {"x-beta": "1"}}, "version": "canary"}])
    assert pick(r, x_beta="1") == "canary"
    assert pick(r) == "stable"


# --- weights --------------------------------------------------------------------------------


def test_weights_90_10() -> None:
    r = route(weights={"stable": 90, "canary": 10})
    counts = Counter(pick(r) for _ in range(20_000))
    assert set(counts) == {"stable", "canary"}
    assert abs(counts["canary"] / 20_000 - 0.10) <= 0.02


def test_weights_any_sum() -> None:
    r = route(vers=("a", "b", "c"), weights={"a": 1, "b": 1, "c": 2})
    counts = Counter(pick(r) for _ in range(20_000))
    assert abs(counts["c"] / 20_000 - 0.5) <= 0.02
    assert abs(counts["a"] / 20_000 - 0.25) <= 0.02


def test_weight_zero_is_never_picked() -> None:
    r = route(vers=("a", "b", "c"), weights={"a": 50, "b": 0, "c": 50})
    counts = Counter(pick(r) for _ in range(5_000))
    assert counts["b"] == 0
    assert counts["a"] > 0 and counts["c"] > 0


def test_reason_is_weight_without_sticky_key() -> None:
    r = route(weights={"stable": 50, "canary": 50}, sticky={"header": "x-user-id"})
    _, reason, extra = pick_for(r, Req())
    assert (reason, extra) == (REASON_WEIGHT, b"")


def test_blue_green_100_0() -> None:
    r = route(vers=("blue", "green"), weights={"blue": 100, "green": 0})
    assert {pick(r) for _ in range(1_000)} == {"blue"}
    switched = route(vers=("blue", "green"), weights={"blue": 0, "green": 100})
    assert {pick(switched) for _ in range(1_000)} == {"green"}


def test_version_left_out_of_weights_gets_zero() -> None:
    r = route(vers=("blue", "green"), weights={"green": 1})
    assert r.weights == {"blue": 0, "green": 1}
    assert {pick(r) for _ in range(500)} == {"green"}


def test_no_weights_first_version_takes_all() -> None:
    r = route(vers=("v1", "v2"))
    assert r.weights == {"v1": 100, "v2": 0}
    assert {pick(r) for _ in range(500)} == {"v1"}


def test_weights_override() -> None:
    t = table(svc(weights={"stable": 100, "canary": 0}),
              weights_override={"shop": {"stable": 0, "canary": 7}})
    r = t.routes[0]
    assert r.weights == {"stable": 0, "canary": 7}
    assert {pick(r) for _ in range(500)} == {"canary"}


def test_all_weights_zero_at_runtime_picks_nothing() -> None:
    t = table(svc(weights={"stable": 100}), weights_override={"shop": {"stable": 0}})
    version, reason, _ = pick_for(t.routes[0], Req())
    assert version is None
    assert reason == REASON_WEIGHT


# --- sticky ---------------------------------------------------------------------------------


def sticky_route(stable: int = 90, canary: int = 10, **sticky: Any) -> Route:
    return route(weights={"stable": stable, "canary": canary},
                 sticky=sticky or {"header": "x-user-id", "cookie": "uid"})


def sticky_picks(r: Route, users: list[str]) -> dict[str, str]:
    picks = {}
    for user in users:
        version, reason, extra = pick_for(r, Req(b"/", {"x-user-id": user}))
        assert version is not None
        assert (reason, extra) == (REASON_STICKY, b"")
        picks[user] = version.name
    return picks


USERS = [f"user-{i}" for i in range(10_000)]


def test_sticky_same_user_same_version() -> None:
    r = sticky_route(50, 50)
    first = sticky_picks(r, USERS[:500])
    assert set(first.values()) == {"stable", "canary"}
    for _ in range(3):
        assert sticky_picks(r, USERS[:500]) == first


def test_sticky_survives_restart() -> None:
    """Two separately built tables (as after a restart or reload) agree on every user."""
    before = sticky_picks(sticky_route(70, 30), USERS[:2000])
    after = sticky_picks(sticky_route(70, 30), USERS[:2000])
    assert before == after


def test_sticky_share_follows_weights() -> None:
    picks = sticky_picks(sticky_route(90, 10), USERS)
    share = sum(v == "canary" for v in picks.values()) / len(USERS)
    assert abs(share - 0.10) <= 0.02


_SUBPROCESS_PICKS = """
import json, sys
from proxy.config.loader import parse_config
from proxy.dataplane.routing import build_route_table

class Balancer:
    def __init__(self, upstreams, tls=None, protocol="http1"):
        self.pools = list(upstreams)
    def pick(self):
        return self.pools[0]

class Req:
    def __init__(self, user):
        self.url = b"/"
        self.hmap = {b"x-user-id": user.encode()}

config = parse_config(json.loads(sys.argv[1]))
route = build_route_table(config, Balancer).routes[0]
users = json.loads(sys.argv[2])
print(json.dumps({u: route.pick_version(Req(u).hmap, b"/")[0].name for u in users}))
"""


def test_sticky_same_in_another_process() -> None:
    """The hash is stable: a process with a different PYTHONHASHSEED picks the same versions."""
    data = {"services": [svc(weights={"stable": 50, "canary": 50},
                             sticky={"header": "x-user-id"})]}
    users = USERS[:200]
    here = sticky_picks(build_route_table(parse_config(data), FakeBalancer).routes[0], users)
    assert set(here.values()) == {"stable", "canary"}
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS_PICKS, json.dumps(data), json.dumps(users)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=20, check=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == here


def test_raising_canary_keeps_its_users() -> None:
    before = sticky_picks(sticky_route(90, 10), USERS)
    after = sticky_picks(sticky_route(70, 30), USERS)
    on_canary_before = {u for u, v in before.items() if v == "canary"}
    on_canary_after = {u for u, v in after.items() if v == "canary"}
    assert on_canary_before, "some users must start on the canary"
    assert on_canary_before <= on_canary_after  # nobody left the canary
    assert abs(len(on_canary_after) / len(USERS) - 0.30) <= 0.03
    # ...and the users who moved only moved stable → canary.
    assert all(after[u] == "canary" for u in USERS if before[u] != after[u])


def test_canary_steps_only_add_users() -> None:
    users = USERS[:5000]
    previous: set[str] = set()
    for canary in (1, 5, 25, 50, 75, 99):
        picks = sticky_picks(sticky_route(100 - canary, canary), users)
        on_canary = {u for u, v in picks.items() if v == "canary"}
        assert previous <= on_canary
        assert abs(len(on_canary) / len(users) - canary / 100) <= 0.03
        previous = on_canary


def three_way(a: int, b: int, c: int) -> Route:
    return route(vers=("a", "b", "c"), weights={"a": a, "b": b, "c": c},
                 sticky={"header": "x-user-id"})


@pytest.mark.parametrize(("old", "new", "grown"), [
    ((50, 30, 20), (50, 30, 40), "c"),   # only c grows
    ((50, 30, 20), (40, 20, 40), "c"),   # c grows, both others shrink
    ((60, 20, 20), (30, 50, 20), "b"),   # b grows, a shrinks, c unchanged
    ((1, 1, 1), (1, 5, 1), "b"),
])
def test_three_versions_growing_one_keeps_its_users(
        old: tuple[int, int, int], new: tuple[int, int, int], grown: str) -> None:
    users = USERS[:5000]
    before = sticky_picks(three_way(*old), users)
    after = sticky_picks(three_way(*new), users)
    had = {u for u, v in before.items() if v == grown}
    has = {u for u, v in after.items() if v == grown}
    assert had and had <= has
    share = len(has) / len(users)
    assert abs(share - new["abc".index(grown)] / sum(new)) <= 0.03


def test_three_versions_only_the_grown_version_gains() -> None:
    """With the others' weights unchanged, users move only onto the version that grew."""
    users = USERS[:5000]
    before = sticky_picks(three_way(50, 30, 20), users)
    after = sticky_picks(three_way(50, 30, 40), users)
    moved = [u for u in users if before[u] != after[u]]
    assert moved
    assert all(after[u] == "c" for u in moved)


def test_sticky_weight_zero_never_picked() -> None:
    picks = sticky_picks(three_way(50, 0, 50), USERS[:3000])
    assert "b" not in picks.values()
    assert set(picks.values()) == {"a", "c"}


def test_sticky_from_cookie_when_header_absent() -> None:
    r = sticky_route(50, 50)
    by_header = sticky_picks(r, USERS[:300])
    for user in USERS[:300]:
        version, reason, extra = pick_for(r, Req(b"/", {"cookie": f"theme=dark; uid={user}"}))
        assert version is not None and version.name == by_header[user]
        assert (reason, extra) == (REASON_STICKY, b"")


def test_sticky_header_wins_over_cookie() -> None:
    r = sticky_route(50, 50)
    picks = sticky_picks(r, USERS[:200])
    alice = next(u for u in USERS[:200] if picks[u] == "stable")
    bob = next(u for u in USERS[:200] if picks[u] == "canary")
    assert pick(r, x_user_id=alice, cookie=f"uid={bob}") == "stable"
    assert pick(r, x_user_id=bob, cookie=f"uid={alice}") == "canary"


def test_sticky_cookie_only_ignores_other_cookies() -> None:
    r = sticky_route(50, 50, cookie="uid")
    by_header = sticky_picks(sticky_route(50, 50), USERS[:200])
    for user in USERS[:200]:
        assert pick(r, cookie=f"xuid=zzz; uid={user}") == by_header[user]


def test_mint_cookie_for_request_without_key() -> None:
    r = sticky_route(50, 50, header="x-user-id", cookie="weir_uid", mint_cookie=True,
                     cookie_max_age="1d")
    version, reason, extra = pick_for(r, Req(b"/", {"cookie": "theme=dark"}))
    assert version is not None
    assert reason == REASON_STICKY
    assert extra.startswith(b"set-cookie: weir_uid=")
    assert extra.endswith(b"\r\n")
    assert b"Max-Age=86400" in extra
    assert b"Path=/" in extra
    minted = extra[len(b"set-cookie: weir_uid="):].split(b";", 1)[0]
    assert minted
    # The next request carries the minted cookie: same version, no new cookie.
    again, reason2, extra2 = pick_for(r, Req(b"/", {"cookie": "weir_uid=" + minted.decode()}))
    assert again is version
    assert (reason2, extra2) == (REASON_STICKY, b"")


def test_mint_cookie_gives_each_new_user_a_fresh_key() -> None:
    r = sticky_route(50, 50, cookie="weir_uid", mint_cookie=True)
    lines = {pick_for(r, Req())[2] for _ in range(50)}
    assert len(lines) == 50
    assert all(line.startswith(b"set-cookie: weir_uid=") for line in lines)


def test_no_mint_when_key_present() -> None:
    r = sticky_route(50, 50, header="x-user-id", cookie="weir_uid", mint_cookie=True)
    assert pick_for(r, Req(b"/", {"cookie": "weir_uid=abc"}))[2] == b""
    assert pick_for(r, Req(b"/", {"x-user-id": "abc"}))[2] == b""


def test_no_mint_without_mint_cookie() -> None:
    r = sticky_route(50, 50, cookie="weir_uid")
    version, reason, extra = pick_for(r, Req())
    assert version is not None
    assert (reason, extra) == (REASON_WEIGHT, b"")
