"""Hostile JSON bodies to the admin API (issue 17): nesting a hundred thousand levels deep
used to end in a RecursionError and a 500. Every endpoint that reads a body answers 400 with
``{"error": ...}`` and changes nothing; ordinary bodies work as before.

Real sockets: the admin API and the data plane in this event loop (conftest's ``weir``), an
aiohttp client, aiohttp backends.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest

from proxy.admin.api import MAX_BODY_DEPTH

from ..control.test_ops_control import shop_config, versions_served

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and inotify")

DEEP = 100_000


def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


# (method, path, body) for every endpoint that reads a JSON body, each with the deep part
# where a real request puts its value.
ENDPOINTS = [
    ("PUT", "/api/services/shop/weights", '{"weights": {"blue": %s}}'),
    ("POST", "/api/services/shop/switch", '{"to": %s}'),
    ("POST", "/api/upstreams/drain", '{"upstream": %s}'),
    ("POST", "/api/upstreams/undrain", '{"upstream": %s}'),
    ("POST", "/api/services/shop/rollout/promote", '{"full": %s}'),
]
IDS = ["weights", "switch", "drain", "undrain", "promote"]


def config(blue: Any, green: Any) -> dict[str, Any]:
    data = shop_config(blue, green)
    data["services"][0]["rollout"] = {"strategy": "blue_green", "active": "blue",
                                      "preview": "green"}
    return data


@pytest.mark.parametrize(("method", "path", "template"), ENDPOINTS, ids=IDS)
async def test_deeply_nested_bodies_are_400_and_change_nothing(start_backend, weir, method,
                                                               path, template):
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir(config(blue, green))
    bodies = {
        "whole body, 100k deep": nested_list(DEEP),
        "value, 100k deep": template % nested_list(DEEP),
        "value, objects 100k deep": template % nested_object(DEEP),
        # Parses (under Python's recursion limit), but deeper than any request of the API.
        "value, 500 deep": template % nested_list(500),
        "value, just past the limit": template % nested_list(MAX_BODY_DEPTH),
    }
    for what, body in bodies.items():
        code, answer = await w.api.call(method, path, raw=body.encode())
        assert code == 400, (what, code, answer)
        assert answer == {"error": f"the body is nested too deeply (more than "
                                   f"{MAX_BODY_DEPTH} levels)"}, what

    status = await w.api.status()
    assert status["generation"] == 1
    [shop] = status["services"]
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 100, "green": 0}, "file")
    assert status["drained"] == []
    assert await versions_served(w.port, 10) == Counter(blue=10)
    code, _ = await w.api.call("GET", "/healthz", auth=False)
    assert code == 200


async def test_reasonable_bodies_still_work(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir(config(blue, green))
    # Nested right up to the limit (an unknown key, ignored) beside a real value: accepted.
    within = ('{"weights": {"blue": 20, "green": 80}, "note": '
              + nested_list(MAX_BODY_DEPTH - 1) + "}")
    code, answer = await w.api.call("PUT", "/api/services/shop/weights", raw=within.encode())
    assert code == 200, answer
    assert answer == {"service": "shop", "weights": {"blue": 20, "green": 80}}
    code, answer = await w.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert code == 200, answer
    assert await versions_served(w.port, 10) == Counter(green=10)
    code, answer = await w.api.call("POST", "/api/upstreams/drain",
                                       {"upstream": blue.address})
    assert code == 200, answer
    code, answer = await w.api.call("POST", "/api/upstreams/undrain",
                                       {"upstream": blue.address})
    assert code == 200, answer
    # The other 400s keep their own messages.
    code, answer = await w.api.call("PUT", "/api/services/shop/weights", raw=b"[1, 2]")
    assert (code, answer) == (400, {"error": "the body must be a JSON object"})
    code, answer = await w.api.call("PUT", "/api/services/shop/weights", raw=b"null")
    assert (code, answer) == (400, {"error": "the body must be a JSON object"})
    code, answer = await w.api.call("PUT", "/api/services/shop/weights",
                                       {"weights": {"blue": [1]}})
    assert code == 400 and "must be an integer" in answer["error"], answer
