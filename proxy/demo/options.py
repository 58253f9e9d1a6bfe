"""`weir demo`: its options and the config it generates; demo/script.py plays it."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import DemoApp


SERVICE = "shop"


DEFAULT_PORT, DEFAULT_ADMIN_PORT = 8080, 9901  # `weir status` finds 9901 without --admin


FAST_SPEED = 4.0


MAX_SPEED = 10.0  # faster, and the steps go by quicker than the tables show them


RATE = 200.0      # requests a second from the load generator


WORKERS = 16


# Durations at --speed 1, chosen to be watchable: a phase 1 of about half a minute.
PAUSE = 8.0       # each pause step


INTERVAL = 4.0    # each analysis window


MIN_INTERVAL = 1.0  # however fast: a shorter window holds too few canary requests to judge


SETTLE = 3.0      # traffic on screen before and between the phases


WEIGHTS = (10, 30, 60)


MAX_ERROR_RATE, MAX_P99 = 0.05, 0.250


BAD_ERROR_RATE, BAD_LATENCY = 0.20, 0.300  # phase 2's canary: clearly over both limits


EXIT_SIGINT, EXIT_SIGTERM = 130, 143


@dataclass(frozen=True)
class DemoOptions:
    speed: float = 1.0
    port: int | None = None        # None: 8080, or any free port if that one is busy
    admin_port: int | None = None  # None: 9901, likewise
    keep_running: bool = False

    def scaled(self, value: float) -> float:
        return value / self.speed


def choose_port(requested: int | None, default: int) -> tuple[int, bool]:
    """The port to listen on, and whether the default was busy so a free one is used.
    A port asked for explicitly is used as is (0 lets the kernel pick); it failing to bind is
    an error for the user to see."""
    if requested is not None:
        return requested, False
    with socket.socket() as sock:
        # The same option the listeners use, so a port left in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", default))
        except OSError:
            return 0, True
    return default, False


def demo_config(stable: DemoApp, canary: DemoApp, port: int, admin_port: int, token: str,
                options: DemoOptions, rate: float = RATE) -> dict[str, Any]:
    """A canary rollout sized to the demo's load: windows long enough to hold enough canary
    requests at the first step's weight, and limits a healthy app passes with room to spare."""
    interval = max(MIN_INTERVAL, options.scaled(INTERVAL))
    pause = options.scaled(PAUSE)
    # Fewer canary requests than this in a window is "inconclusive", never a failure; ask for
    # about 40% of what the first step's share of the load brings.
    min_requests = max(5, int(rate * WEIGHTS[0] / 100 * interval * 0.4))
    analysis = {
        "interval": interval, "min_requests": min_requests,
        "failure_limit": 1,          # one bad window may be noise; a second one rolls back
        "inconclusive_limit": 1000,  # a slow machine waits for enough requests, not a human
        "checks": {"max_error_rate": MAX_ERROR_RATE, "max_p99": MAX_P99},
    }
    steps: list[dict[str, Any]] = []
    for index, weight in enumerate(WEIGHTS):
        steps += [{"set_weight": weight}, {"pause": {"duration": pause}}]
        if index == 0:
            # Gate the first step on a passing window too: without one the rollout cannot
            # go on, however few requests a busy machine manages to send.
            steps.append({"analysis": analysis})
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": token},
        "watch": False,
        "log_level": "warning",
        "upstream": {"timeouts": {"connect": "1s", "read": "5s"}},
        "services": [{
            "name": SERVICE,
            "versions": {"stable": {"upstreams": [stable.address], "revision": stable.revision},
                         "canary": {"upstreams": [canary.address],
                                    "revision": canary.revision}},
            "weights": {"stable": 100, "canary": 0},
            "sticky": {"header": "x-user-id"},
            "drain": {"timeout": "2s"},
            "rollout": {"strategy": "canary", "stable": "stable", "canary": "canary",
                        "steps": steps, "analysis": analysis},
        }],
    }
