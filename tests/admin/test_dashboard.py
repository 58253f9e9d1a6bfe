"""The dashboard: the history behind its charts (/api/history), the files the admin listener
serves, and the page itself in a real headless Chromium.

Chromium is driven over the Chrome DevTools Protocol with aiohttp's websocket client (no
Selenium, no chromedriver, no new dependency): the test starts the browser with
``--remote-debugging-port=0``, reads the port from the profile's DevToolsActivePort file,
opens a tab, and then navigates, evaluates JavaScript, clicks and types with real input events,
and takes a screenshot. Everything waits on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tomllib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ..conftest import REPO_ROOT, TOKEN, Backend, Weir, poll, wait_for, write_config
from ..rollout_harness import Load, base_config

CHROMIUM = (os.environ.get("WEIR_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or sys.platform != "linux",
    reason="chromium is not installed (Debian: apt-get install chromium chromium-driver; "
           ".ci/run installs it)")

STATIC = REPO_ROOT / "proxy" / "admin" / "static"


def shop(stable: Backend, canary: Backend, **extra: Any) -> dict[str, Any]:
    return {"name": "shop",
            "versions": {"stable": {"upstreams": [stable.address]},
                         "canary": {"upstreams": [canary.address]}},
            "weights": {"stable": 100, "canary": 0}, **extra}


async def get(session: aiohttp.ClientSession, port: int, path: str, count: int = 1) -> None:
    for _ in range(count):
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            await response.read()


# === /api/history ===============================================================================



async def pause_refused(tab: Any, token: str, what: str) -> str:
    """Use ``token`` and press shop's pause button: the refusal the page shows."""
    await tab.type_into("#token", token)
    await tab.click("#token-use")
    await tab.click('section[data-service="shop"] button[data-action="pause"]')
    return str(await tab.wait(
        "(() => { const m = document.getElementById('message');"
        " return !m.hidden && m.classList.contains('bad') && m.textContent; })()", what))

async def test_history_records_rate_errors_p99_weight_and_follows_reloads(start_backend, weir):
    stable, canary, green = (await start_backend("stable"), await start_backend("canary"),
                             await start_backend("green"))
    live: Weir = await weir(base_config(shop(stable, canary)))
    sampler = live.admin.history
    await sampler.stop()  # samples taken by hand below, so each holds exactly what was sent
    sampler.sample()

    async with aiohttp.ClientSession() as client:
        await get(client, live.port, "/item", 18)
        await get(client, live.port, "/item?status=503", 2)
    sampler.sample()

    code, data = await live.api.call("GET", "/api/history", auth=False)
    assert code == 200, data
    assert data["interval"] == 1.0 and data["keep_seconds"] == 300.0
    versions = data["services"]["shop"]["versions"]
    s, c = versions["stable"], versions["canary"]
    assert len(s["t"]) == len(c["t"]) >= 1
    assert s["rps"][-1] > 0
    assert s["error_rate"][-1] == pytest.approx(0.1)
    assert s["p99"][-1] is not None and 0 < s["p99"][-1] < 5000  # milliseconds
    assert (s["weight"][-1], c["weight"][-1]) == (100, 0)
    assert s["inflight"][-1] == 0
    # No requests: a rate of 0, but no error rate or p99 rather than a made-up 0.
    assert (c["rps"][-1], c["error_rate"][-1], c["p99"][-1]) == (0, None, None)

    # ?since= returns only what is newer than a t the page already has.
    newest = s["t"][-1]
    code, data = await live.api.call("GET", f"/api/history?since={newest}", auth=False)
    assert code == 200
    assert data["services"]["shop"]["versions"]["stable"]["t"] == []
    code, data = await live.api.call("GET", "/api/history?since=yesterday", auth=False)
    assert code == 400 and "since" in data["error"]

    # A reload that swaps canary for green: green gets a series, canary's goes.
    config = base_config({"name": "shop",
                          "versions": {"stable": {"upstreams": [stable.address]},
                                       "green": {"upstreams": [green.address]}},
                          "weights": {"stable": 100}})
    write_config(live.path, config)
    assert (await live.api.reload())["outcome"] == "success"
    sampler.sample()
    sampler.sample()
    code, data = await live.api.call("GET", "/api/history", auth=False)
    versions = data["services"]["shop"]["versions"]
    assert set(versions) == {"stable", "green"}
    assert versions["green"]["t"] and versions["green"]["rps"][-1] == 0


async def test_history_sampler_runs_with_the_admin_listener_and_stays_bounded(
        start_backend, weir):
    backend = await start_backend("stable")
    live: Weir = await weir(base_config(
        {"name": "one", "versions": {"stable": {"upstreams": [backend.address]}}}))
    sampler = live.admin.history
    series = sampler.series["one"]["stable"]
    await wait_for(lambda: len(series.columns["t"]) >= 1, timeout=5)  # the 1 s clock runs

    for _ in range(sampler.keep + 50):
        sampler.sample()
    assert len(series.columns["t"]) == sampler.keep
    await live.close()
    assert sampler._task is None


# === the files ==================================================================================


async def test_dashboard_files_are_served_self_contained_and_packaged(start_backend, weir):
    backend = await start_backend("stable")
    live: Weir = await weir(base_config(
        {"name": "one", "versions": {"stable": {"upstreams": [backend.address]}}}))
    base = live.api.base
    session = live.api.session
    async with session.get(base + "/", allow_redirects=False) as response:
        assert response.status == 302 and response.headers["Location"] == "/dashboard"
    async with session.get(base + "/dashboard") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    assert '<script src="/dashboard/dashboard.js"' in page
    async with session.get(base + "/dashboard/dashboard.js") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/javascript")
    async with session.get(base + "/dashboard/nope.js") as response:
        assert response.status == 404 and "error" in await response.json()

    # Offline: nothing is loaded from anywhere but the admin listener.
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, path
        assert "innerHTML" not in text, path  # config text reaches the DOM as text only

    # A non-editable install ships every file (package data globs in pyproject.toml).
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["proxy.admin"]
    for path in STATIC.iterdir():
        relative = path.relative_to(REPO_ROOT / "proxy" / "admin").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative


# === the page in Chromium =======================================================================


class DevTools:
    """A minimal Chrome DevTools Protocol client: commands matched to answers by id, events
    kept per session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self.pending.pop(data.get("id", -1), None)
            if future is None:
                self.events.append(data)
            elif not future.done():
                future.set_result(data)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the browser closed the connection"))

    async def send(self, method: str, session: str | None = None, timeout: float = 30,
                   **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_json(message)
        async with asyncio.timeout(timeout):
            answer = await future
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


@dataclass
class Tab:
    devtools: DevTools
    session: str
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.devtools.send(method, self.session, **params)

    async def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait(self, expression: str, what: str, timeout: float = 20) -> Any:
        """Evaluate until truthy (deadline: timeout); the last value is in the failure."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"last: {value!r}; page errors: {self.errors()}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) in the middle of the element."""
        box = await self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2, disabled: !!el.disabled}};
        }})()""")
        assert box is not None, f"nothing matches {selector}"
        assert not box["disabled"], f"{selector} is disabled"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"],
                            button="left" if kind != "mouseMoved" else "none", clickCount=1)

    async def type_into(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        await self.call("Input.insertText", text=text)

    def errors(self) -> list[str]:
        """Uncaught exceptions and console.error calls on this page."""
        found = []
        for event in self.devtools.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(str(details.get("exception", {}).get("description")
                                 or details.get("text")))
            elif (event.get("method") == "Runtime.consoleAPICalled"
                  and params.get("type") == "error"):
                found.append(" ".join(str(a.get("value", a.get("description")))
                                      for a in params.get("args", [])))
        return found


@dataclass
class Browser:
    devtools: DevTools

    async def new_tab(self, width: int = 1400, height: int = 1000) -> Tab:
        target = await self.devtools.send("Target.createTarget", url="about:blank")
        attached = await self.devtools.send("Target.attachToTarget",
                                            targetId=target["targetId"], flatten=True)
        tab = Tab(self.devtools, attached["sessionId"])
        await tab.call("Page.enable")
        await tab.call("Runtime.enable")
        await tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                       deviceScaleFactor=1, mobile=False)
        # Headless Chromium reports a light system theme; the dashboard's own default is dark.
        await tab.call("Emulation.setEmulatedMedia",
                       features=[{"name": "prefers-color-scheme", "value": "dark"}])
        return tab


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    """Headless Chromium on a fresh profile, killed (its whole process group) afterwards."""
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: renderers and all go at the end
    session: aiohttp.ClientSession | None = None
    devtools: DevTools | None = None
    try:
        active_port = profile / "DevToolsActivePort"

        def listening() -> bool:
            if process.poll() is not None:
                return True
            with contextlib.suppress(OSError):
                return len(active_port.read_text().split()) == 2
            return False

        await wait_for(listening, timeout=30, interval=0.05)
        assert process.poll() is None, log_path.read_text(errors="replace")
        port, path = active_port.read_text().split()
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        devtools = DevTools(ws)
        yield Browser(devtools)
    finally:
        if devtools is not None:
            await devtools.close()
        if session is not None:
            await session.close()
        await stop_process_group(process)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the browser's process group, then SIGKILL to whatever is left after a
    deadline; returns once every process of the group is gone."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reaps the main process; its children are reaped by init
            if process.returncode is not None and not group_alive(process.pid):
                return
            await asyncio.sleep(0.05)
    process.wait(timeout=5)


def check_png(data: bytes) -> tuple[int, int]:
    """A well-formed PNG: signature, chunk CRCs, and image data that inflates to exactly the
    size its header promises. Returns (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat, header = 8, bytearray(), None
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
        if kind == b"IEND":
            break
    assert header is not None, "no IHDR"
    width, height, depth, colour = header
    channels = {2: 3, 6: 4}[colour]
    assert depth == 8
    assert len(zlib.decompress(bytes(idat))) == height * (1 + width * channels)
    return width, height


# Counts, in each chart canvas of a service, the pixels close to each version's colour (as its
# swatch shows it), and the pixels that are not background at all.
COUNT_CHART_PIXELS = """(() => {
  const card = document.querySelector('section[data-service="shop"]');
  if (!card) return null;
  const colours = {};
  for (const row of card.querySelectorAll('tr[data-version]')) {
    const rgb = getComputedStyle(row.querySelector('.swatch')).backgroundColor;
    colours[row.dataset.version] = rgb.match(/\\d+/g).slice(0, 3).map(Number);
  }
  const result = {};
  for (const canvas of card.querySelectorAll('canvas[data-metric]')) {
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const counts = {inked: 0};
    for (const name of Object.keys(colours)) counts[name] = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i + 3] === 0) continue;
      counts.inked += 1;
      for (const [name, [r, g, b]] of Object.entries(colours)) {
        if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 60
            && data[i + 3] > 200) counts[name] += 1;
      }
    }
    result[canvas.dataset.metric] = {pixels: counts,
                                     points: JSON.parse(canvas.dataset.points || '{}')};
  }
  return result;
})()"""

# Decodes a PNG with the browser's own decoder and reports its colours.
PNG_COLOURS = """(async () => {
  const bytes = Uint8Array.from(atob(%s), (c) => c.charCodeAt(0));
  const image = await createImageBitmap(new Blob([bytes], {type: 'image/png'}));
  const canvas = new OffscreenCanvas(image.width, image.height);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(image, 0, 0);
  const data = ctx.getImageData(0, 0, image.width, image.height).data;
  const counts = new Map();
  for (let i = 0; i < data.length; i += 4) {
    const key = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  return {width: image.width, height: image.height, colours: counts.size,
          commonest: Math.max(...counts.values()) / (image.width * image.height)};
})()"""


@needs_chromium
@pytest.mark.timeout(150)
async def test_dashboard_in_headless_chromium_draws_charts_and_drives_the_rollout(
        start_backend, weir, browser, tmp_path):
    stable, canary, api_v1 = (await start_backend("stable"), await start_backend("canary"),
                              await start_backend("api-v1"))
    rollout = {
        "strategy": "canary",
        "steps": [{"set_weight": 30}, {"pause": {"duration": "10m"}}, {"set_weight": 60},
                  {"pause": {}}],
        "analysis": {"interval": "1s", "min_requests": 5, "failure_limit": 100,
                     "checks": {"max_error_rate": 0.5, "max_p99": "2s"}},
    }
    live: Weir = await weir(base_config(
        shop(stable, canary, match={"path_prefix": "/"}, rollout=rollout),
        {"name": "api", "match": {"path_prefix": "/api/"},
         "versions": {"v1": {"upstreams": [api_v1.address]}}}))
    api = live.api
    await api.act("start", name="shop")
    await poll(lambda: api.rollout("shop"),
               lambda r: r["phase"] == "progressing" and r["step"] == 1,
               10, "the rollout waiting at its 10m pause")

    async with Load(live.port, workers=2, gap=0.01) as load, aiohttp.ClientSession() as client:
        await load.wait_hits(20, version="canary", timeout=10)
        await get(client, live.port, "/item?status=500", 5)  # something on the error chart
        await get(client, live.port, "/api/things", 5)

        tab = await browser.new_tab()
        base = api.base
        await tab.call("Page.navigate", url=base + "/")  # the redirect to /dashboard
        await tab.wait("document.body && document.body.dataset.ready === 'true'",
                       "the first status and history to render")
        assert await tab.evaluate("location.pathname") == "/dashboard"

        # Both services, each version with its weight.
        assert await tab.evaluate(
            "[...document.querySelectorAll('section[data-service]')]"
            ".map((s) => s.dataset.service)") == ["shop", "api"]
        assert await tab.evaluate(
            "document.querySelector('section[data-service=\"shop\"] tr[data-version=\"canary\"]"
            " .weight .num').textContent") == "30%"

        # Charts: every version of shop has a line on each chart; on the request rate chart
        # (70/30, so the lines are apart) each shows in its own colour. (Error rates are both
        # 0 most of the time: one line covers the other there.)
        def drawn(charts: dict[str, Any] | None) -> bool:
            if not charts:
                return False
            return (all(charts[metric]["points"].get(version, 0) >= 5
                        and charts[metric]["pixels"]["inked"] >= 500
                        for metric in ("rps", "error_rate", "p99")
                        for version in ("stable", "canary"))
                    and all(charts["rps"]["pixels"][version] >= 20
                            for version in ("stable", "canary")))

        deadline = time.monotonic() + 20
        while not drawn(charts := await tab.evaluate(COUNT_CHART_PIXELS)):
            assert time.monotonic() < deadline, f"charts not drawn: {charts}; {tab.errors()}"
            await asyncio.sleep(0.2)

        # The steps with the current one marked, and decisions with their numbers.
        current = await tab.wait(
            "(() => { const li = document.querySelector("
            "'section[data-service=\"shop\"] .steps li.current');"
            " return li && [li.dataset.step, li.textContent]; })()", "the current step")
        assert current[0] == "1" and "pause 10m" in current[1]
        decision = await tab.wait(
            "(() => { const row = document.querySelector("
            "'section[data-service=\"shop\"] .decisions tbody tr');"
            " return row && row.textContent; })()", "an analysis decision", timeout=15)
        assert "error rate" in decision and "p99" in decision and "(min 5)" in decision

        # A wrong token: the button's 401 is shown, and nothing changes.
        message = await pause_refused(tab, "not-the-token", "the 401 message")
        assert "401" in message
        assert await tab.evaluate(
            "document.getElementById('token-state').dataset.state") == "rejected"
        assert (await api.rollout("shop"))["phase"] == "progressing"

        # The right token: pause, seen by the admin API and then on the page.
        await tab.type_into("#token", TOKEN)
        await tab.click("#token-use")
        await tab.click('section[data-service="shop"] button[data-action="pause"]')
        paused = await poll(lambda: api.rollout("shop"),
                            lambda r: r["phase"] == "paused", 10,
                            "the pause from the dashboard")
        assert paused["paused_by"] == "user" and paused["step"] == 1
        await tab.wait("document.querySelector('section[data-service=\"shop\"] "
                       "[data-role=\"phase\"]').dataset.phase === 'paused'",
                       "the page to show the pause")
        assert await tab.evaluate(
            "document.getElementById('token-state').dataset.state") == "accepted"

        screenshot = base64.b64decode((await tab.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True))["data"])
    path = tmp_path / "dashboard.png"
    path.write_bytes(screenshot)

    width, height = check_png(screenshot)
    assert width == 1400 and height >= 600 and len(screenshot) > 30_000
    checker = await browser.new_tab()
    seen = await checker.evaluate(PNG_COLOURS % json.dumps(base64.b64encode(screenshot)
                                                          .decode()), await_promise=True)
    assert (seen["width"], seen["height"]) == (width, height)
    assert seen["colours"] > 100 and seen["commonest"] < 0.95, seen
    assert tab.errors() == []


@needs_chromium
@pytest.mark.timeout(90)
async def test_dashboard_shows_each_shadows_delivery_and_diff(start_backend, weir, browser):
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    live: Weir = await weir(base_config({
        "name": "shop",
        "versions": {"stable": {"upstreams": [stable.address]},
                     "shadow": {"upstreams": [shadow.address]}},
        "weights": {"stable": 100, "shadow": 0},
        "mirror": [{"version": "shadow", "percent": 100, "compare": True}]}))
    for i in range(20):
        assert (await live.request(f"/item/{i}", host="shop.test")).status == 200
    stats = live.control.proxy.stats.for_mirror("shop", "shadow")
    await wait_for(lambda: stats.diff.compared >= 20, timeout=5)

    tab = await browser.new_tab()
    await tab.call("Page.navigate", url=live.api.base + "/dashboard")
    line = await tab.wait(
        "(() => { const li = document.querySelector("
        "'section[data-service=\"shop\"] .shadows li[data-shadow=\"shadow\"]');"
        " return li && li.textContent; })()", "the shadow's line")
    # Each backend says its name in its JSON answer: every answer differs there, and nothing
    # is noise without a baseline.
    assert line.startswith("shadow shadow · delivered 100%"), line
    assert "differs in 100% (body.backend 100%" in line, line
    assert "noise" not in line
    assert tab.errors() == []


@needs_chromium
@pytest.mark.timeout(90)
async def test_dashboard_shows_a_drained_upstream_with_a_badge(start_backend, weir, browser,
                                                               tmp_path):
    one, two, canary = (await start_backend("one"), await start_backend("two"),
                        await start_backend("canary"))
    live: Weir = await weir(base_config({
        "name": "shop",
        "versions": {"stable": {"upstreams": [one.address, two.address]},
                     "canary": {"upstreams": [canary.address]}},
        "weights": {"stable": 100, "canary": 0}}))
    code, reply = await live.api.call("POST", "/api/upstreams/drain", {"upstream": two.address})
    assert code == 200, reply

    tab = await browser.new_tab()
    await tab.call("Page.navigate", url=live.api.base + "/dashboard")
    await tab.wait("document.body && document.body.dataset.ready === 'true'",
                   "the first status and history to render")
    chip = ("document.querySelector('section[data-service=\"shop\"] tr[data-version=\"stable\"]"
            " .chip[data-upstream=\"%s\"]')")
    drained = await tab.wait(
        f"(() => {{ const c = {chip % two.address}; const b = c && c.querySelector("
        "'.badge.drained'); return c && b && c.dataset.drained === 'true' && "
        "[c.textContent, b.textContent, getComputedStyle(b).display]; })()",
        "the drained badge next to the upstream")
    assert drained[0].startswith(two.address) and drained[1] == "drained", drained
    assert drained[2] != "none"
    assert await tab.evaluate(
        f"(() => {{ const c = {chip % one.address}; return c.dataset.drained === 'false' && "
        "!c.querySelector('.badge') && c.textContent; })()") == f"{one.address} healthy"
    assert "1 upstream(s) drained" in await tab.evaluate(
        "document.getElementById('summary').textContent")
    screenshot = base64.b64decode((await tab.call("Page.captureScreenshot", format="png"))
                                  ["data"])
    (tmp_path / "drained.png").write_bytes(screenshot)
    check_png(screenshot)

    code, reply = await live.api.call("POST", "/api/upstreams/undrain",
                                      {"upstream": two.address})
    assert code == 200, reply
    await tab.wait(f"(() => {{ const c = {chip % two.address}; return c && "
                   "c.dataset.drained === 'false' && !c.querySelector('.badge'); })()",
                   "the badge to go")
    assert "drained" not in await tab.evaluate("document.getElementById('summary').textContent")
    assert tab.errors() == []


@needs_chromium
@pytest.mark.timeout(90)
async def test_dashboard_shows_a_403_with_the_role_the_button_needs(start_backend, weir,
                                                                    browser):
    """A token whose role is too small (admin.tokens): the API's message is shown, the token
    is marked as lacking the role, and nothing changes; a promoter's token then pauses."""
    stable, canary = await start_backend("stable"), await start_backend("canary")
    data = base_config(shop(stable, canary, rollout={
        "strategy": "canary", "steps": [{"set_weight": 30}, {"pause": {"duration": "10m"}}]}))
    data["admin"]["tokens"] = [{"name": "wallboard", "token": "viewer-token", "role": "viewer"},
                               {"name": "ci", "token": "promoter-token", "role": "promoter"}]
    live: Weir = await weir(data)
    api = live.api
    await api.act("start", name="shop")
    await poll(lambda: api.rollout("shop"),
               lambda r: r["phase"] == "progressing" and r["step"] == 1, 10, "the timed pause")

    tab = await browser.new_tab()
    await tab.call("Page.navigate", url=api.base + "/dashboard")
    await tab.wait("document.body && document.body.dataset.ready === 'true'",
                   "the first status and history to render")
    message = await pause_refused(tab, "viewer-token", "the 403 message")
    assert "403" in message
    assert "rollout pause needs the promoter role; token wallboard is a viewer" in message
    assert await tab.evaluate(
        "document.getElementById('token-state').dataset.state") == "limited"
    assert (await api.rollout("shop"))["phase"] == "progressing"

    await tab.type_into("#token", "promoter-token")
    await tab.click("#token-use")
    await tab.click('section[data-service="shop"] button[data-action="pause"]')
    paused = await poll(lambda: api.rollout("shop"), lambda r: r["phase"] == "paused", 10,
                        "the pause from the dashboard")
    assert [e["by"] for e in paused["events"] if e["event"] == "paused"] == ["ci"]
    await tab.wait("document.getElementById('token-state').dataset.state === 'accepted'",
                   "the token accepted")
    assert tab.errors() == []
