"""TLS: HTTPS on the data listener (with certificates reloaded with the config) and HTTPS to
upstreams. Certificates are made at test time by trustme: a CA, and leaf certificates for
127.0.0.1 and localhost. Everything runs over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from aiohttp import web

from ..conftest import (
    REPO_ROOT,
    Backend,
    RawResponse,
    backend_app,
    exchange,
    free_port,
    one_service,
    port_open,
    read_response,
    read_until_closed,
    wait_for,
)

GET = b"GET /x HTTP/1.1\r\nhost: app\r\n\r\n"


# --- certificates ---------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_leaf(ca: trustme.CA, cert: Path, key: Path, common_name: str) -> None:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name=common_name)
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())


@pytest.fixture
def server_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The `tls` block for the listener, with a certificate whose CN is 'first'."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    write_leaf(ca, cert, key, "first")
    return {"cert_file": str(cert), "key_file": str(key)}


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    # These clients speak HTTP/1.1, and say so: offered h2 too, Weir would choose it
    # (test_http2.py checks that).
    context.set_alpn_protocols(["http/1.1"])
    return context


# --- HTTPS clients --------------------------------------------------------------------------


class HttpsClient:
    """One keep-alive HTTPS connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext) -> HttpsClient:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                          server_hostname="localhost")
        return cls(reader, writer)

    @property
    def common_name(self) -> str:
        """The CN of the certificate the proxy presented to this connection."""
        cert = self.writer.get_extra_info("peercert")
        return dict(item[0] for item in cert["subject"])["commonName"]

    async def get(self, path: str = "/x", headers: str = "") -> RawResponse:
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: app\r\n{headers}\r\n".encode())
        await self.writer.drain()
        async with asyncio.timeout(5):
            return await read_response(self.reader)

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture
async def https() -> AsyncIterator[Callable[[int, ssl.SSLContext], Awaitable[HttpsClient]]]:
    clients: list[HttpsClient] = []

    async def connect(port: int, context: ssl.SSLContext) -> HttpsClient:
        client = await HttpsClient.connect(port, context)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


# --- HTTPS backends -------------------------------------------------------------------------


@pytest.fixture
async def https_backend(ca: trustme.CA) -> AsyncIterator[Callable[[str], Awaitable[Backend]]]:
    """The conftest echo app served over TLS with a certificate from the test CA."""
    runners: list[web.AppRunner] = []

    async def start(name: str = "secure") -> Backend:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        backend = Backend(name, 0)
        runner = web.AppRunner(backend_app(backend), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        runners.append(runner)
        backend.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return backend

    yield start
    for runner in runners:
        await runner.cleanup()


def tls_service(backend: Backend, tls: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "app", "versions": {"stable": {"upstreams": [backend.address],
                                                     "tls": tls}}}]


def loud_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


# === HTTPS on the listener ====================================================================


async def test_https_client_to_plain_upstream_with_keep_alive(
        start_backend, start_proxy, https, server_files, client_context):
    backend = await start_backend("plain")
    proxy = await start_proxy(one_service(backend.address), tls=server_files)
    client = await https(proxy.port, client_context)
    ssl_object = client.writer.get_extra_info("ssl_object")
    assert ssl_object.selected_alpn_protocol() == "http/1.1"
    assert client.common_name == "first"

    for i in range(3):
        response = await client.get(f"/x?i={i}")
        assert response.status == 200, response.body
        assert response.header("x-weir-version") == "stable"
    assert len(proxy.connections) == 1  # all three on one client connection
    assert [r["path"] for r in backend.requests] == ["/x?i=0", "/x?i=1", "/x?i=2"]
    assert {r["headers"]["x-forwarded-proto"] for r in backend.requests} == {"https"}
    assert len(backend.peers) == 1  # and one pooled upstream connection


async def test_trusted_proxy_keeps_its_forwarded_proto(
        start_backend, start_proxy, https, server_files, client_context):
    backend = await start_backend("plain")
    proxy = await start_proxy(one_service(backend.address), tls=server_files,
                              trusted_proxies=["127.0.0.1/32"])
    client = await https(proxy.port, client_context)
    await client.get("/said", "x-forwarded-proto: http\r\n")
    await client.get("/unsaid")
    seen = {r["path"]: r["headers"]["x-forwarded-proto"] for r in backend.requests}
    assert seen == {"/said": "http", "/unsaid": "https"}


async def test_plain_http_and_bad_handshakes_are_closed_quietly(
        start_backend, start_proxy, https, server_files, client_context, caplog):
    caplog.set_level(logging.DEBUG)
    backend = await start_backend("plain")
    proxy = await start_proxy(one_service(backend.address), tls=server_files,
                              limits={"header_timeout": "300ms"})

    # Plain HTTP to the TLS port: not a TLS record, so the connection is closed.
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(GET)
        assert await read_until_closed(reader) == b""
        writer.close()
    # A client that never starts its handshake is closed after header_timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await read_until_closed(reader, timeout=5) == b""
    writer.close()
    # A client that does not trust the certificate gives up on the handshake.
    with pytest.raises(ssl.SSLCertVerificationError):
        await HttpsClient.connect(proxy.port, ssl.create_default_context())
    # A client that sends close_notify right after its request: TLS has no half-close.
    early = await HttpsClient.connect(proxy.port, client_context)
    early.writer.write(b"GET /slow?delay=0.2 HTTP/1.1\r\nhost: app\r\n\r\n")
    await early.close()
    await wait_for(lambda: not proxy.connections)
    # A malformed handshake record.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
    assert await read_until_closed(reader) == b""
    writer.close()

    # None of it reached an exchange, logged a traceback, or stopped the proxy.
    client = await https(proxy.port, client_context)
    assert (await client.get()).status == 200
    assert len(backend.requests) == 1
    assert not loud_records(caplog), [r.getMessage() for r in loud_records(caplog)]
    await wait_for(lambda: len(proxy.connections) == 1)


async def test_min_version_1_3_refuses_tls_1_2(
        start_backend, start_proxy, https, ca, server_files, client_context):
    backend = await start_backend("plain")
    proxy = await start_proxy(one_service(backend.address),
                              tls={**server_files, "min_version": 1.3})  # a YAML number
    tls12 = ssl.create_default_context()
    ca.configure_trust(tls12)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):  # an alert, or a reset after it
        await HttpsClient.connect(proxy.port, tls12)
    client = await https(proxy.port, client_context)
    assert client.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    assert (await client.get()).status == 200


# --- reloads --------------------------------------------------------------------------------


def live_config(backend: Backend, tls: dict[str, Any]) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "watch": False,
            "tls": tls, "services": one_service(backend.address)}


async def test_reload_serves_the_new_certificate_to_new_connections_only(
        start_backend, weir, https, ca, server_files, client_context):
    backend = await start_backend("plain")
    control = (await weir(live_config(backend, server_files))).control
    port = control.proxy.port
    old = await https(port, client_context)
    assert old.common_name == "first"
    assert (await old.get()).status == 200

    write_leaf(ca, Path(server_files["cert_file"]), Path(server_files["key_file"]), "second")
    result = await control.reload("api")
    assert result["outcome"] == "success", result

    new = await https(port, client_context)
    assert new.common_name == "second"
    assert (await new.get()).status == 200
    # The connection opened before the reload is untouched: same session, still serving.
    assert old.common_name == "first"
    for _ in range(2):
        assert (await old.get()).status == 200
    assert control.proxy.listeners[0].sockets[0].getsockname()[1] == port


async def test_bad_certificate_files_fail_the_reload_and_the_old_one_keeps_serving(
        start_backend, weir, https, ca, tmp_path, server_files, client_context):
    backend = await start_backend("plain")
    control = (await weir(live_config(backend, server_files))).control
    port = control.proxy.port
    path = control.config_path
    assert path is not None

    # A missing file.
    missing = {**server_files, "cert_file": str(tmp_path / "nope.crt")}
    path.write_text(yaml.safe_dump(live_config(backend, missing)))
    result = await control.reload("api")
    assert result["outcome"] == "failure"
    [error] = result["errors"]
    assert error.startswith("tls.cert_file: cannot read") and "nope.crt" in error, error

    # A new certificate next to the old key: the files do not fit together.
    other = tmp_path / "other.key"
    write_leaf(ca, Path(server_files["cert_file"]), other, "mismatched")
    path.write_text(yaml.safe_dump(live_config(backend, server_files)))
    result = await control.reload("api")
    assert result["outcome"] == "failure"
    [error] = result["errors"]
    assert error.startswith("tls.key_file:") and "does not match" in error, error
    assert control.generation == 1

    client = await https(port, client_context)
    assert client.common_name == "first"
    assert (await client.get()).status == 200


def weir_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)


async def test_validate_and_start_refuse_missing_and_mismatched_files(
        ca, tmp_path, server_files):
    port = free_port()
    base = {"listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "services": one_service("127.0.0.1:9")}
    cases = {
        "missing_cert": ({**server_files, "cert_file": str(tmp_path / "missing.crt")},
                         "tls.cert_file: cannot read"),
        "missing_key": ({**server_files, "key_file": str(tmp_path / "missing.key")},
                        "tls.key_file: cannot read"),
        "key_as_cert": ({**server_files, "cert_file": server_files["key_file"]},
                        "tls.cert_file:"),
    }
    mismatched = tmp_path / "other.key"
    write_leaf(ca, tmp_path / "other.crt", mismatched, "other")
    cases["mismatch"] = ({**server_files, "key_file": str(mismatched)}, "does not match")
    for name, (tls, expected) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**base, "tls": tls}))
        validated = weir_command("validate", "-c", str(config))
        assert validated.returncode == 2, (name, validated.stdout, validated.stderr)
        assert expected in validated.stderr, (name, validated.stderr)
    run = weir_command("run", "-c", str(tmp_path / "missing_cert.yaml"))
    assert run.returncode == 2 and "tls.cert_file" in run.stderr, run.stderr
    assert not port_open(port)

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**base, "tls": server_files}))
    assert weir_command("validate", "-c", str(good)).returncode == 0


# === HTTPS to upstreams =======================================================================


async def test_https_upstream_with_a_private_ca_pools_connections(
        https_backend, start_proxy, ca_file):
    backend = await https_backend()
    proxy = await start_proxy(tls_service(backend, {"ca_file": ca_file}))
    responses = await exchange(proxy.port, GET * 5, count=5)
    assert [r.status for r in responses] == [200] * 5
    assert len(backend.requests) == 5
    assert len(backend.peers) == 1  # five requests, one pooled TLS connection
    pool = proxy.pools.pools[f"https://{backend.address} (ca_file={ca_file})"]
    assert pool.connect_errors == 0 and len(pool.idle) == 1
    # A second client connection reuses the warm upstream connection too.
    assert (await exchange(proxy.port, GET))[0].status == 200
    assert len(backend.peers) == 1


async def test_untrusted_upstream_certificate_is_a_502_and_a_connect_error(
        https_backend, start_proxy, caplog):
    backend = await https_backend()
    proxy = await start_proxy(tls_service(backend, {}))  # system CAs: the test CA is unknown
    [response] = await exchange(proxy.port, GET)
    assert response.status == 502
    assert b"certificate verification failed" in response.body
    assert backend.requests == []
    assert proxy.pools.pools[f"https://{backend.address}"].connect_errors == 1
    assert any("certificate verification failed for 127.0.0.1" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING), caplog.text


async def test_server_name_overrides_the_name_checked(https_backend, start_proxy, ca_file):
    backend = await https_backend()
    proxy = await start_proxy([{"name": "app", "versions": {
        "good": {"upstreams": [backend.address],
                 "tls": {"ca_file": ca_file, "server_name": "localhost"}},
        "wrong": {"upstreams": [backend.address],
                  "tls": {"ca_file": ca_file, "server_name": "other.example"}}},
        "rules": [{"match": {"headers": {"x-v": "wrong"}}, "version": "wrong"}]}])
    assert (await exchange(proxy.port, GET))[0].status == 200
    [wrong] = await exchange(proxy.port, b"GET / HTTP/1.1\r\nhost: app\r\nx-v: wrong\r\n\r\n")
    assert wrong.status == 502
    assert b"other.example" in wrong.body
    # Same address, different TLS settings: separate pools, no shared connections.
    assert len([p for p in proxy.pools.pools.values() if p.address == backend.address]) == 2


async def test_verify_false_connects_and_warns(https_backend, start_proxy, caplog):
    backend = await https_backend()
    proxy = await start_proxy(tls_service(backend, {"verify": False}))
    assert any("tls.verify is false" in r.getMessage() for r in caplog.records), caplog.text
    responses = await exchange(proxy.port, GET * 2, count=2)
    assert [r.status for r in responses] == [200, 200]
    assert len(backend.peers) == 1


async def test_plain_and_tls_to_one_address_do_not_share_a_pool(
        start_backend, start_proxy, ca_file):
    backend = await start_backend("plain")
    proxy = await start_proxy([{"name": "app", "versions": {
        "plain": {"upstreams": [backend.address]},
        "secure": {"upstreams": [backend.address], "tls": {"ca_file": ca_file}}},
        "weights": {"plain": 1, "secure": 0}}])
    plain = proxy.pools.pools[backend.address]
    secure = proxy.pools.pools[f"https://{backend.address} (ca_file={ca_file})"]
    assert plain is not secure and plain.ssl is None and secure.ssl is not None
    assert (await exchange(proxy.port, GET * 2, count=2))[1].status == 200
    assert len(plain.idle) == 1 and len(secure.idle) == 0


async def test_mirror_copies_go_over_tls_on_pooled_connections(
        start_backend, https_backend, start_proxy, ca_file):
    primary = await start_backend("primary")
    shadow = await https_backend("shadow")
    proxy = await start_proxy([{"name": "app", "versions": {
        "stable": {"upstreams": [primary.address]},
        "shadow": {"upstreams": [shadow.address], "tls": {"ca_file": ca_file}}},
        "weights": {"stable": 100}, "mirror": [{"version": "shadow", "percent": 100}]}])
    stats = proxy.stats.for_mirror("app", "shadow")
    for i in range(4):
        assert (await exchange(proxy.port, GET))[0].status == 200
        await wait_for(lambda i=i: stats.outcomes["success"] == i + 1)
    assert len(shadow.requests) == 4
    assert len(shadow.peers) == 1
    assert stats.outcomes["error"] == 0


async def test_blue_green_smoke_checks_reach_a_tls_preview(
        start_backend, https_backend, weir, ca_file):
    blue = await start_backend("blue")
    green = await https_backend("green")
    control = (await weir({
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "watch": False,
        "services": [{
            "name": "shop",
            "versions": {"blue": {"upstreams": [blue.address]},
                         "green": {"upstreams": [green.address],
                                   "tls": {"ca_file": ca_file, "server_name": "localhost"}}},
            "weights": {"blue": 100},
            "rollout": {"strategy": "blue_green", "active": "blue", "preview": "green",
                        "checks": [{"path": "/healthz", "count": 2}]}}]})).control
    rollout = control.rollouts.rollouts["shop"]
    await rollout.run_smoke_checks()
    [smoke] = rollout.record.analyses
    assert smoke["outcome"] == "success", smoke
    assert [r["path"] for r in green.requests] == ["/healthz", "/healthz"]
