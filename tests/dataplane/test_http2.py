"""HTTP/2 to clients: the same answers as HTTP/1.1 to curl (cleartext with prior knowledge, and
over TLS through ALPN), each stream routed on its own on a long-lived connection, many
streams at once, and big bodies both ways under flow control. Upstreams speak HTTP/1.1.
Hostile clients are in test_http2_hostile.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from ..conftest import make_config, one_service, wait_for

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


# --- clients --------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def curl(url: str, *args: str) -> tuple[str, Answer]:
    """(the protocol curl spoke, the answer), from `curl -i`."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-i", "--max-time", "10", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, (args, err.decode())
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    protocol, status = lines[0].split(" ")[:2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return protocol, Answer(int(status), headers, body)


def canary_service(stable: str, canary: str, stable_weight: int) -> list[dict[str, Any]]:
    return [{"name": "app",
             "versions": {"stable": {"upstreams": [stable]}, "canary": {"upstreams": [canary]}},
             "weights": {"stable": stable_weight, "canary": 100 - stable_weight}}]


# --- the same answers as HTTP/1.1 -----------------------------------------------------------


REQUESTS: list[tuple[str, tuple[str, ...]]] = [
    ("/plain?x=1", ()),
    ("/echo", ("-d", "x" * 100_000, "-H", "content-type: text/plain")),
    ("/echo", ("-X", "PUT", "-H", "cookie: a=1", "-H", "cookie: b=2", "-d", "")),
    ("/head", ("-I",)),
    ("/gone?status=503", ()),
    ("/nothing?status=204", ()),
    ("/trace", ("-X", "TRACE")),
]


async def test_curl_gets_the_same_answers_over_h2c_as_over_http11(start_backend, start_proxy):
    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address), limits={"max_body_bytes": 300_000})
    url = f"http://127.0.0.1:{proxy.port}"
    for path, args in REQUESTS:
        h1_protocol, h1 = await curl(url + path, "--http1.1", *args)
        h2_protocol, h2 = await curl(url + path, "--http2-prior-knowledge", *args)
        assert (h1_protocol, h2_protocol) == ("HTTP/1.1", "HTTP/2"), path
        assert h2.status == h1.status, path
        assert h2.headers.get("x-weir-version") == h1.headers.get("x-weir-version"), path
        if h1.body and h1.headers.get("content-type", "").startswith("application/json"):
            seen1, seen2 = json.loads(h1.body), json.loads(h2.body)
            for key in ("method", "path", "body_size", "body_sha256"):
                assert seen2[key] == seen1[key], (path, key)
            if "cookie: a=1" in args:  # one header for HTTP/1.1 (RFC 9113 8.2.3)
                assert seen2["headers"]["cookie"] == "a=1; b=2"
            assert seen2["headers"]["host"] == f"127.0.0.1:{proxy.port}"
            assert seen2["headers"]["x-forwarded-for"] == "127.0.0.1"
        else:
            assert h2.body == h1.body, path
    methods = [r["method"] for r in backend.requests]
    assert "TRACE" not in methods  # refused for both, as for HTTP/1.1


async def test_tls_clients_get_http2_through_alpn_and_http11_when_they_ask(
        start_backend, start_proxy, tmp_path: Path):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address),
                              tls={"cert_file": str(cert), "key_file": str(key)})
    url = f"https://127.0.0.1:{proxy.port}/tls"
    protocol, answer = await curl(url, "--http2", "--cacert", str(ca_file))
    assert protocol == "HTTP/2" and answer.status == 200
    assert json.loads(answer.body)["headers"]["x-forwarded-proto"] == "https"
    protocol, answer = await curl(url, "--http1.1", "--cacert", str(ca_file))
    assert protocol == "HTTP/1.1" and answer.status == 200

    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=context)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    writer.close()


# --- streams ----------------------------------------------------------------------------------


async def test_each_stream_is_routed_on_its_own_so_a_weight_change_applies_to_the_next(
        start_backend, start_proxy, h2_client):
    """The complaint about Envoy and Istio (envoy#7004): a long-lived HTTP/2 connection keeps
    the version it got. Here the next stream on the same connection follows the new weights."""
    stable, canary = await start_backend("stable"), await start_backend("canary")
    proxy = await start_proxy(canary_service(stable.address, canary.address, 100))
    client = await h2_client(proxy.port)
    before = [await client.request(f"/a{i}") for i in range(20)]
    assert {s.headers[b"x-weir-version"] for s in before} == {b"stable"}
    proxy.apply_config(make_config(canary_service(stable.address, canary.address, 0)))
    after = [await client.request(f"/b{i}") for i in range(20)]
    assert {s.headers[b"x-weir-version"] for s in after} == {b"canary"}
    proxy.apply_config(make_config(canary_service(stable.address, canary.address, 50)))
    mixed = await asyncio.gather(*(client.request(f"/c{i}") for i in range(200)))
    canary_share = sum(s.headers[b"x-weir-version"] == b"canary" for s in mixed) / 200
    assert 0.35 <= canary_share <= 0.65
    assert len(client.streams) == 240 and client.terminated is None  # one connection


async def test_many_streams_at_once_each_get_their_own_answer(start_backend, start_proxy,
                                                              h2_client):
    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address))
    client = await h2_client(proxy.port)
    streams = await asyncio.gather(*(
        client.request(f"/n{i}", method="POST", body=b"%d" % i * 1000) for i in range(80)))
    for i, stream in enumerate(streams):
        seen = json.loads(stream.body)
        assert stream.status == 200 and seen["path"] == f"/n{i}"
        assert seen["body_size"] == len(b"%d" % i * 1000)


async def test_big_bodies_pass_intact_both_ways_under_flow_control(start_backend, start_proxy,
                                                                    h2_client):
    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address))
    client = await h2_client(proxy.port)
    upload = bytes(range(256)) * 40_000  # 10 MB, many times the windows
    stream = await client.request("/up", method="POST", body=upload)
    assert json.loads(stream.body)["body_sha256"] == hashlib.sha256(upload).hexdigest()
    size = 20_000_000
    download = await client.request(f"/stream?size={size}")
    assert download.status == 200 and len(download.body) == size
    pattern = bytes(range(256)) * 256
    assert bytes(download.body[:len(pattern)]) == pattern
    assert hashlib.sha256(download.body).hexdigest() == hashlib.sha256(
        (pattern * (size // len(pattern) + 1))[:size]).hexdigest()


async def test_an_early_answer_ends_the_request_with_no_error_and_the_connection_goes_on(
        start_backend, start_proxy, h2_client):
    """A body over max_body_bytes gets its 413 at once; the rest of the request is stopped
    with RST_STREAM(NO_ERROR) after the complete answer (RFC 9113 8.1, as nginx does), and
    the next stream on the connection is served."""
    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address), limits={"max_body_bytes": 100_000})
    client = await h2_client(proxy.port)
    refused = await client.request("/up", method="POST", body=b"z" * 1_000_000)
    assert refused.status == 413 and b"larger than 100000 bytes" in refused.body
    assert refused.reset in (None, 0)  # NO_ERROR, if the reset came before the end
    after = await client.request("/next")
    assert after.status == 200 and json.loads(after.body)["path"] == "/next"
    assert [r["path"] for r in backend.requests] == ["/next"]


async def test_the_access_log_says_which_protocol_each_request_came_in(
        start_backend, start_proxy, h2_client, tmp_path: Path):
    backend = await start_backend("stable")
    log_path = tmp_path / "access.jsonl"
    proxy = await start_proxy(one_service(backend.address), access_log=str(log_path))
    client = await h2_client(proxy.port)
    assert (await client.request("/over-h2")).status == 200
    await curl(f"http://127.0.0.1:{proxy.port}/over-h1", "--http1.1")

    def entries() -> list[dict[str, Any]]:
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    await wait_for(lambda: len(entries()) >= 2, timeout=5)
    assert {e["path"]: e["protocol"] for e in entries()} == {
        "/over-h2": "HTTP/2", "/over-h1": "HTTP/1.1"}


async def test_an_upstream_connection_held_for_a_slow_reader_is_pooled_reading_again(
        start_backend, start_proxy, h2_client):
    """A client with a small window makes a big answer pile up: its upstream connection stops
    being read, and the answer may still end in that read. The connection goes back to the
    pool reading again, or the next request on it would wait for the read timeout."""
    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address),
                              upstream={"timeouts": {"read": "3s"}})
    client = await h2_client(proxy.port)
    pool = next(iter(proxy.pools.pools.values()))
    client.ack_data = False  # read, but give nothing back until told
    # Each answer is over the 256 KiB held per stream by its last read, which also ends it.
    big = [asyncio.ensure_future(client.request("/stream?size=290000&length=1"))
           for _ in range(3)]
    # Weir has read the three answers whole (their upstream connections are released) while
    # most of them waits for the client's window.
    await wait_for(lambda: len(client.streams) == 3 and not pool.active, timeout=5)
    client.ack_data = True
    client.conn.increment_flow_control_window(2**30)  # room for all of it, at once
    for stream_id in list(client.streams):
        client.conn.increment_flow_control_window(2**30, stream_id)
    client.flush()
    for stream in await asyncio.gather(*big):
        assert stream.status == 200 and len(stream.body) == 290_000
    assert len(pool.idle) >= 1
    started = asyncio.get_running_loop().time()
    quick = await asyncio.gather(*(client.request(f"/after{i}") for i in range(6)))
    assert [s.status for s in quick] == [200] * 6
    assert asyncio.get_running_loop().time() - started < 2  # not the 3 s read timeout


async def test_a_closed_connections_h2_state_is_freed_without_a_collection(
        start_backend, start_proxy, h2_client):
    """h2's connection object is a reference cycle (a table of its own bound methods), and
    `weir run` makes full collections rare: dropped when the connection closes, it is freed
    by reference counting at once."""
    import gc
    import weakref

    backend = await start_backend("stable")
    proxy = await start_proxy(one_service(backend.address))
    client = await h2_client(proxy.port)
    assert (await client.request("/x")).status == 200
    (conn,) = [c for c in proxy.plane.connections if hasattr(c, "h2")]
    freed = weakref.ref(conn.h2)
    del conn
    gc.disable()
    try:
        await client.close()
        await wait_for(lambda: not proxy.plane.connections)
        await wait_for(lambda: freed() is None, timeout=2)
    finally:
        gc.enable()
