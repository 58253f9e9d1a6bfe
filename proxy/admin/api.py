"""The admin listener (aiohttp.web): the JSON admin API, /metrics, /healthz, /readyz and the
dashboard (``/`` and ``/dashboard``, fed by ``/api/status`` and ``/api/history``).

Reads are open; every mutation needs ``Authorization: Bearer <token>``, one of
``admin.tokens`` (or ``admin.token``, an operator named "admin") whose role is enough for it:
a promoter may promote, pause, resume and abort a rollout; an operator may do everything; a
viewer nothing. Errors are JSON ``{"error": "..."}`` with 400 (bad body), 401 (no token, or one
that is not configured), 403 (a token whose role is too small), 404 (unknown service, version
or upstream), 409 (refused: a rollout's state, a conflicting write, a drain that would leave a
weighted version with no upstream).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from ..config.model import ADMIN_TOKEN_NAME as ADMIN_TOKEN_NAME  # the name admin.token acts as
from ..config.model import (
    MAX_WEIGHT,
    AdminToken,
    ConfigError,
    Role,
    role_allows,
    split_address,
)
from ..control.plane import DrainRefused, InvalidRelease, StateConflictError, UnknownUpstream
from ..dataplane.listen import ADMIN_API, ListenError
from ..errors import StateWriteError, UnknownName
from ..rollout.controller import RolloutError
from .dashboard import Dashboard
from .history import HistorySampler

if TYPE_CHECKING:
    from ..control.plane import ControlPlane

log = logging.getLogger("weir.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A handler as written in the class (unbound: self, then the request), for the decorators.
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])

# The role each rollout action needs: a promoter drives a rollout that is under way; starting
# one (or starting an aborted one again) sends a new version traffic, which is an operator's.
ROLLOUT_ACTIONS: dict[str, Role] = {
    "promote": "promoter", "pause": "promoter", "resume": "promoter", "abort": "promoter",
    "start": "operator", "retry": "operator",
}

# Requests that change nothing: open to all, as they have always been (the dashboard and
# `weir status` need no token). Every other method is a mutation and passes the guard.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# A need: for a request, what it is (for the 403's message) and the role it takes.
Need = Callable[[web.Request], tuple[str, Role]]
NEED_ATTRIBUTE = "weir_needs"
# The request's key for the AdminToken that authorized it: a typed key where aiohttp has them
# (3.13 on; it warns about plain string keys), a string before.
CALLER: Any = (web.RequestKey("weir_caller", AdminToken) if hasattr(web, "RequestKey")
               else "weir_caller")


def needs(role: Role, what: str) -> Callable[[H], H]:
    """Declare the role a mutation's handler needs. A handler that declares none needs the
    operator role: a new mutation is never open to a smaller role by being forgotten."""
    return needs_per_request(lambda _request: (what, role))


def needs_per_request(need: Need) -> Callable[[H], H]:
    def mark(handler: H) -> H:
        setattr(handler, NEED_ATTRIBUTE, need)
        return handler
    return mark


def rollout_need(request: web.Request) -> tuple[str, Role]:
    action = request.match_info.get("action", "")
    role = ROLLOUT_ACTIONS.get(action)
    if role is None:
        raise web.HTTPNotFound(reason=f"no rollout action {action!r} "
                                      f"({', '.join(ROLLOUT_ACTIONS)})")
    return f"rollout {action}", role


def identify(tokens: list[AdminToken], header: str) -> AdminToken | None:
    """The configured token an ``Authorization: Bearer ...`` value presents, if any. Every
    token is compared, each in constant time, whichever matches: how long the answer takes
    does not tell which one (or how many) came before the match."""
    scheme, _, value = header.partition(" ")
    presented = value.strip().encode("utf-8", "surrogateescape")
    found: AdminToken | None = None
    for candidate in tokens:
        match = hmac.compare_digest(presented, candidate.token.encode("utf-8", "surrogateescape"))
        if match and found is None:
            found = candidate
    return found if scheme.lower() == "bearer" else None


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# No request of this API nests more than three levels ({"weights": {"v": 1}}). A body that
# parses but nests far deeper is refused before a handler walks or echoes it: repr() and
# json.dumps recurse too, and would fail as a 500 depending on how deep the stack already is.
MAX_BODY_DEPTH = 32
TOO_DEEP = f"the body is nested too deeply (more than {MAX_BODY_DEPTH} levels)"


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests objects and arrays more than ``limit`` deep. A loop,
    not a recursion: the check must not fail the way it guards against."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except UnknownUpstream as exc:
        return web.json_response({"error": str(exc.args[0]), "known": exc.known}, status=404)
    except DrainRefused as exc:
        return web.json_response({"error": str(exc), "versions": exc.versions}, status=409)
    except InvalidRelease as exc:
        return error(400, str(exc))
    except UnknownName as exc:
        return error(404, str(exc.args[0]))
    except RolloutError as exc:
        return error(409, str(exc))
    except StateConflictError as exc:
        return error(409, str(exc))  # another instance won the race: the client tries again
    except StateWriteError as exc:
        log.error("%s", exc)
        return error(500, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except Exception:
        log.exception("admin API error on %s %s", request.method, request.path)
        return error(500, "internal error; see the log")


class AdminServer:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        # The guard inside json_errors: its refusals are JSON errors like any other.
        self.app = web.Application(middlewares=[json_errors, self.guard],
                                   client_max_size=1 << 20)
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/api/status", self.status),
            web.get("/api/history", self.history_json),
            web.put("/api/services/{name}/weights", self.set_weights),
            web.post("/api/services/{name}/switch", self.switch),
            web.post("/api/reload", self.reload),
            web.post("/api/upstreams/drain", self.drain),
            web.post("/api/upstreams/undrain", self.undrain),
            web.get("/api/services/{name}/rollout", self.rollout_status),
            web.post("/api/services/{name}/rollout/{action}", self.rollout_action),
            *Dashboard().routes(),
        ])
        # Sampled for as long as the admin listener is up, so that a dashboard opened at any
        # moment has the last few minutes to draw.
        self.history = HistorySampler(control)
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None

    async def start(self) -> None:
        host, port = split_address(self.control.config.admin.listen)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port)
        try:
            await self.site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = self.site = None
            raise ListenError(ADMIN_API, self.control.config.admin.listen, exc) from exc
        self.history.start()

    @property
    def port(self) -> int:
        assert self.site is not None and self.site._server is not None
        return int(self.site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr,attr-defined]

    async def stop(self) -> None:
        await self.history.stop()
        if self.runner is not None:
            await self.runner.cleanup()

    # --- helpers --------------------------------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every mutation (any method but GET, HEAD, OPTIONS) is authorized here, before its
        handler runs: 401 without a configured token, 403 when its role is too small for
        what the route's handler declares (see ``needs``; operator when it declares none).
        A request no route takes (404, 405) goes on to be answered as such."""
        if request.method in SAFE_METHODS or request.match_info.http_exception is not None:
            return await handler(request)
        caller = self.authorize(request)
        need: Need | None = getattr(request.match_info.handler, NEED_ATTRIBUTE, None)
        what, role = need(request) if need is not None else ("this change", "operator")
        if not role_allows(caller.role, role):
            log.warning("admin API: refused %s to token %s (a %s): it needs the %s role",
                        what, caller.name, caller.role, role)
            return web.json_response(
                {"error": f"{what} needs the {role} role; token {caller.name} is a "
                          f"{caller.role}", "needs": role, "role": caller.role}, status=403)
        request[CALLER] = caller
        return await handler(request)

    def authorize(self, request: web.Request) -> AdminToken:
        """The configured token the request presents (read from the config in force, so a
        reload adds, removes and changes tokens); 401 when there is none."""
        tokens = self.control.config.admin.credentials()
        if not tokens:
            raise web.HTTPUnauthorized(reason="mutations are disabled: set admin.token or "
                                              "admin.tokens in the config to enable them")
        caller = identify(tokens, request.headers.get("Authorization", ""))
        if caller is None:
            raise web.HTTPUnauthorized(reason="missing or wrong bearer token")
        return caller

    def actor(self, request: web.Request) -> str:
        """Who made an authorized change, for the records: the token's name."""
        caller: AdminToken = request[CALLER]
        return caller.name

    async def body(self, request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(reason="the body must be a JSON object") from None
        except RecursionError:
            # json.loads recurses once per level: `[[[[…` some thousand deep (the body is
            # capped at 1 MiB, not in depth) ends here, and is the client's error.
            raise web.HTTPBadRequest(reason=TOO_DEEP) from None
        if nested_deeper_than(data, MAX_BODY_DEPTH):
            raise web.HTTPBadRequest(reason=TOO_DEEP)
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(reason="the body must be a JSON object")
        return data

    # --- handlers -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.control.proxy.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.control.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.control.status())

    async def history_json(self, request: web.Request) -> web.Response:
        """Per-version samples for the charts; ``?since=T`` returns only those after T."""
        try:
            after = float(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(reason="since must be a number (a t from an earlier "
                                            "answer)") from None
        return web.json_response(self.history.export(after))

    async def begin_change(self, request: web.Request) -> None:
        """Every runtime change through the API (authorized by ``guard`` already): a config
        file edited before this call is taken in first (see
        ControlPlane.take_in_file_changes), so that names the edit added are known and the
        two apply in the order they were made."""
        await self.control.take_in_file_changes()

    @needs("operator", "setting weights")
    async def set_weights(self, request: web.Request) -> web.Response:
        await self.begin_change(request)
        name = request.match_info["name"]
        self.control.service(name)  # 404 before 400 for an unknown service
        weights = (await self.body(request)).get("weights")
        if not isinstance(weights, dict) or not weights:
            raise web.HTTPBadRequest(reason='expected {"weights": {"<version>": <int>, ...}}')
        for version, weight in weights.items():
            if (isinstance(weight, bool) or not isinstance(weight, int)
                    or not 0 <= weight <= MAX_WEIGHT):
                raise web.HTTPBadRequest(reason=f"weight of {version!r} must be an integer "
                                                f"from 0 to {MAX_WEIGHT}, got {weight!r}")
        if not any(weights.values()):
            raise web.HTTPBadRequest(reason="at least one version needs a weight above 0")
        applied = await self.control.set_weights(name, weights, by=self.actor(request))
        return web.json_response({"service": name, "weights": applied})

    @needs("operator", "a switch")
    async def switch(self, request: web.Request) -> web.Response:
        await self.begin_change(request)
        name = request.match_info["name"]
        self.control.service(name)
        to = (await self.body(request)).get("to")
        if not isinstance(to, str) or not to:
            raise web.HTTPBadRequest(reason='expected {"to": "<version>"}')
        applied = await self.control.switch(name, to, by=self.actor(request))
        return web.json_response({"service": name, "weights": applied})

    @needs("operator", "a reload")
    async def reload(self, request: web.Request) -> web.Response:
        try:
            result = await self.control.reload("api", by=self.actor(request))
        except ConfigError as exc:
            return error(409, "; ".join(exc.errors))
        if result["outcome"] != "success":
            return web.json_response({"error": "the config file is invalid; nothing changed",
                                      **result}, status=422)
        return web.json_response(result)

    async def upstream_body(self, request: web.Request, *flags: str) -> tuple[str, dict[str, bool]]:
        """``{"upstream": "host:port", <flag>: bool ...}`` → the address and the flags."""
        body = await self.body(request)
        address = body.get("upstream")
        if not isinstance(address, str) or not address.strip():
            raise web.HTTPBadRequest(reason='expected {"upstream": "host:port"}')
        values = {}
        for flag in flags:
            value = body.get(flag, False)
            if not isinstance(value, bool):
                raise web.HTTPBadRequest(reason=f'"{flag}" must be true or false')
            values[flag] = value
        return address.strip(), values

    @needs("operator", "draining an upstream")
    async def drain(self, request: web.Request) -> web.Response:
        """One app instance out of rotation in every service and version (weir drain)."""
        await self.begin_change(request)
        address, flags = await self.upstream_body(request, "force")
        return web.json_response(await self.control.drain(address, force=flags["force"],
                                                          by=self.actor(request)))

    @needs("operator", "undraining an upstream")
    async def undrain(self, request: web.Request) -> web.Response:
        await self.begin_change(request)
        address, _ = await self.upstream_body(request)
        return web.json_response(await self.control.undrain(address, by=self.actor(request)))

    async def rollout_status(self, request: web.Request) -> web.Response:
        """``?events_after=SEQ``: only the events numbered above SEQ (what a client that
        follows the rollout, like ``weir rollout wait``, has not seen yet)."""
        rollout = self.control.rollouts.get(request.match_info["name"])
        after = request.query.get("events_after")
        if after is not None and not (after.isascii() and after.isdigit()):
            raise web.HTTPBadRequest(reason="events_after must be a whole number (an event's "
                                            "seq)")
        return web.json_response(rollout.status(int(after) if after is not None else None))

    async def release_body(self, request: web.Request) -> tuple[str | None, list[str] | None]:
        """A start's optional ``{"revision": "v2.4.0", "upstreams": ["host:port", ...]}``:
        the release it brings in (None: the field is the new version's as it is). The
        addresses are checked by the control plane, through the config's own model."""
        if not request.can_read_body:
            return None, None
        body = await self.body(request)
        unknown = sorted(set(body) - {"revision", "upstreams"})
        if unknown:
            raise web.HTTPBadRequest(reason=f"unknown field {unknown[0]!r} in a rollout start "
                                            f"(revision, upstreams)")
        revision = body.get("revision")
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise web.HTTPBadRequest(reason='"revision" must be a non-empty string')
        upstreams = body.get("upstreams")
        if upstreams is not None and (not isinstance(upstreams, list) or not upstreams
                                      or not all(isinstance(u, str) for u in upstreams)):
            raise web.HTTPBadRequest(reason='"upstreams" must be a non-empty list of '
                                            '"host:port" strings')
        return revision, upstreams

    @needs_per_request(rollout_need)  # the role depends on the action: ROLLOUT_ACTIONS
    async def rollout_action(self, request: web.Request) -> web.Response:
        await self.begin_change(request)
        name, action = request.match_info["name"], request.match_info["action"]
        self.control.rollouts.get(name)  # 404 before 400 for a service with no rollout
        full = False
        revision: str | None = None
        upstreams: list[str] | None = None
        if action == "start":
            revision, upstreams = await self.release_body(request)
        elif action == "promote" and request.can_read_body:
            full = (await self.body(request)).get("full", False)
            if not isinstance(full, bool):
                raise web.HTTPBadRequest(reason='"full" must be true or false')
        rollout = await self.control.rollout_action(name, action, self.actor(request),
                                                    full=full, revision=revision,
                                                    upstreams=upstreams)
        # A move forward was saved before it counted (or refused: 500, nothing changed);
        # an abort or a pause is in force whatever the save does, and the answer says
        # whether it is saved yet.
        answer = rollout.status()
        answer["saved"] = await self.control.save_or_report()
        if not answer["saved"]:
            answer["warning"] = self.control.unsaved_warning()
        return web.json_response(answer)
