"""A small client of the admin API for the ``weir`` command line (stdlib only: urllib).

The base URL comes from ``--admin URL``, else ``$WEIR_ADMIN_URL``, else
``http://127.0.0.1:9901``; the bearer token from ``$WEIR_ADMIN_TOKEN``. Every failure is an
:class:`AdminError` whose message fits on one line and says what to do about it.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN_URL = "http://127.0.0.1:9901"
DEFAULT_TIMEOUT = 10.0
URL_ENV = "WEIR_ADMIN_URL"
TOKEN_ENV = "WEIR_ADMIN_TOKEN"


class AdminError(Exception):
    """The admin API could not be reached or answered with an error.

    ``status`` is the HTTP status (None when the API was not reached) and ``body`` the
    decoded JSON body of the error response, when it had one. ``unreachable``: no answer at
    all (refused, unknown host, timed out), as opposed to an answer that was an error.
    """

    def __init__(self, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None, unreachable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body or {}
        self.unreachable = unreachable


def normalize_url(url: str) -> str:
    """'127.0.0.1:9901' → 'http://127.0.0.1:9901'; raises ValueError for what can't be one."""
    text = url.strip()
    if not text:
        raise ValueError("the admin URL is empty")
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the admin URL must be http:// or https://, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in the admin URL {url!r}") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"expected an admin URL like {DEFAULT_ADMIN_URL}, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the admin URL takes no query or fragment, got {url!r}")
    return text.rstrip("/")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminClient:
    def __init__(self, url: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = normalize_url(url or os.environ.get(URL_ENV) or DEFAULT_ADMIN_URL)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = []
        if _is_loopback(urllib.parse.urlsplit(self.url).hostname):
            # Like Go's net/http: an http_proxy in the environment is not for localhost.
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    # --- the endpoints --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/api/status")

    def set_weights(self, service: str, weights: dict[str, int]) -> dict[str, Any]:
        return self.request("PUT", f"/api/services/{_seg(service)}/weights",
                            {"weights": weights})

    def switch(self, service: str, version: str) -> dict[str, Any]:
        return self.request("POST", f"/api/services/{_seg(service)}/switch", {"to": version})

    def reload(self) -> dict[str, Any]:
        return self.request("POST", "/api/reload", {})

    def rollout(self, service: str, action: str, body: dict[str, Any] | None = None,
                ) -> dict[str, Any]:
        return self.request("POST", f"/api/services/{_seg(service)}/rollout/{_seg(action)}",
                            body if body is not None else {})

    def rollout_status(self, service: str, events_after: int | None = None) -> dict[str, Any]:
        query = "" if events_after is None else f"?events_after={int(events_after)}"
        return self.request("GET", f"/api/services/{_seg(service)}/rollout{query}")

    def drain(self, upstream: str, force: bool = False) -> dict[str, Any]:
        return self.request("POST", "/api/upstreams/drain",
                            {"upstream": upstream, "force": force})

    def undrain(self, upstream: str) -> dict[str, Any]:
        return self.request("POST", "/api/upstreams/undrain", {"upstream": upstream})

    # --- transport ------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", "User-Agent": "weir-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = _read_quietly(exc)
            raise self._http_error(method, path, exc.code, exc.reason, raw) from None
        except TimeoutError:
            raise self._unreachable(f"no answer within {self.timeout:g}s") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise self._unreachable(f"no answer within {self.timeout:g}s") from None
            raise self._unreachable(_describe(reason)) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # reset mid-response, not HTTP at all, ...
            raise self._unreachable(_describe(exc)) from None
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AdminError(f"{method} {self.url}{path} answered with something that is not "
                             f"a JSON object ({_snippet(raw)}); is {self.url} Weir's admin "
                             f"address?")
        return data

    def _unreachable(self, why: str) -> AdminError:
        return AdminError(f"cannot reach the admin API at {self.url}: {why} (is Weir running? "
                          f"--admin or ${URL_ENV} must be its admin.listen address)",
                          unreachable=True)

    def _http_error(self, method: str, path: str, status: int, reason: str,
                    raw: bytes) -> AdminError:
        body: dict[str, Any] = {}
        try:
            decoded = json.loads(raw)
            if isinstance(decoded, dict):
                body = decoded
        except ValueError:
            pass
        message = body.get("error")
        if not isinstance(message, str) or not message:
            # Not the admin API's error shape: say what came back and where from.
            shown = f": {_snippet(raw)}" if raw.strip() else ""
            return AdminError(f"{method} {self.url}{path} failed with HTTP {status} {reason}"
                              f"{shown}; is {self.url} Weir's admin address?", status=status,
                              body=body)
        if status in (404, 405) and message.strip().lower() in (
                "not found", "method not allowed", str(reason).lower()):
            # The route itself is missing: the server predates this command.
            message = (f"the admin API at {self.url} has no {method} {path}; is the running "
                       f"Weir older than this command line?")
        message = f"{message} (HTTP {status})"
        if status == 401 and not self.token:
            message += f"; set {TOKEN_ENV} to the admin token"
        elif status == 403:
            message += f"; {TOKEN_ENV} must be a token with that role"
        return AdminError(message, status=status, body=body)


def _seg(value: str) -> str:
    """One path segment, percent-encoded (a name can't add path segments)."""
    return urllib.parse.quote(value, safe="")


def _read_quietly(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read()
    except (OSError, ValueError, AttributeError, http.client.HTTPException):
        return b""
    finally:
        exc.close()


def _describe(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror or reason})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


def _snippet(raw: bytes, limit: int = 120) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
