"""Smoke tests for the bench scripts: they start, measure something and clean up.

Each runs a script as a subprocess, the way a person would, with the smallest settings that
still go through every step. They are not benchmarks: no number is checked against a target.
Locust is an optional dependency (the `bench` extra); without it its tests are skipped, and
say so in pytest's summary. So is the scaling benchmark's run without nginx, wrk or a writable
cgroup cpu controller (it needs root).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"

# find_spec does not import locust, which would monkey-patch this process (gevent).
needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                  reason="locust not installed (pip install -e '.[bench]')")


def run_script(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def processes_with(*markers: str) -> list[str]:
    """Command lines of live processes whose argv contains any of ``markers``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            found.append(cmdline)
    return found


def test_idle_memory_measures_weir_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    done = run_script(str(BENCH / "idle_memory.py"), "--connections", "200", "--steps", "2",
                      "--no-nginx", "--settle", "0.1", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "per idle connection" in done.stdout
    (weir,) = json.loads(out.read_text())["results"]
    assert weir["name"] == "weir"
    assert weir["held"] == 200 and weir["failures"] == 0
    assert weir["per_conn_rss"] is not None
    # Weir's fd count rose by one per held connection: it really kept them open.
    assert weir["points"][-1]["fds"] - weir["before"]["fds"] >= 200
    left = processes_with("/weir-idle-", "idle_memory.py --serve-backend")
    assert not left, f"still running: {left}"


@needs_locust
def test_locust_run_counts_agree(tmp_path: Path) -> None:
    out = tmp_path / "locust.json"
    done = run_script(str(BENCH / "locust_run.py"), "--duration", "1", "--users", "8",
                      "--spawn-rate", "8", "--csv", str(tmp_path / "csv" / "weir"),
                      "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "(agree)" in done.stdout, done.stdout
    doc = json.loads(out.read_text())
    total = next(r for r in doc["locust"] if r["name"] == "Aggregated")
    assert total["requests"] > 0 and total["failures"] == 0, doc["failures"]
    # The header rule sent every beta tester's request to `beta`, and nothing else went there.
    split = doc["split"]["requests"]
    assert split["beta"]["stable"] == split["beta"]["canary"] == 0
    assert all(split[kind]["beta"] == 0 for kind in ("sticky", "anon", "upload"))
    assert doc["split"]["users_on_stable_and_canary"] == 0
    assert (tmp_path / "csv" / "weir_stats.csv").exists()
    left = processes_with("/weir-locust-", "locust_run.py --serve-backends", str(tmp_path))
    assert not left, f"still running: {left}"


# --- bench/scaling.py --------------------------------------------------------------------------


def load_scaling() -> ModuleType:
    """bench/scaling.py as a module (it imports bench/run.py as ``run``)."""
    spec = importlib.util.spec_from_file_location("bench_scaling", BENCH / "scaling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def scaling_unavailable() -> str | None:
    """Why the scaling benchmark cannot run here, or None."""
    scaling = load_scaling()
    missing = [t for t in ("nginx", "wrk", "taskset") if scaling.bench.find_tool(t) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    if not {0, 1} <= os.sched_getaffinity(0):
        return "needs CPUs 0 and 1"
    try:
        scaling.find_cpu_controller()
    except scaling.bench.BenchError as exc:
        return str(exc)
    return None


def test_scaling_says_what_is_missing_without_a_cgroup_cpu_controller(tmp_path: Path) -> None:
    done = run_script(str(BENCH / "scaling.py"), "--cgroup-root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: {tmp_path} is not a cgroup cpu controller" in done.stderr
    # A cgroup v2 hierarchy whose cpu controller is not enabled for child cgroups.
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    done = run_script(str(BENCH / "scaling.py"), "--cgroup-root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"echo +cpu > {tmp_path}/cgroup.subtree_control" in done.stderr
    assert not list(tmp_path.glob("weir-scaling-*"))  # it made no cgroup


def test_scaling_rejects_quotas_that_do_not_fit_the_proxy_cpus(tmp_path: Path) -> None:
    done = run_script(str(BENCH / "scaling.py"), "--cpu-per-worker", "0.5", cwd=tmp_path)
    assert done.returncode == 2
    assert "would compete for a core" in done.stderr
    done = run_script(str(BENCH / "scaling.py"), "--workers", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert "at least two worker counts" in done.stderr


@pytest.mark.timeout(60)
def test_scaling_holds_each_worker_to_its_quota_and_cleans_up(tmp_path: Path) -> None:
    why = scaling_unavailable()
    if why is not None:
        pytest.skip(why)
    root = load_scaling().find_cpu_controller().root
    before = set(root.glob("weir-scaling-*"))
    out = tmp_path / "scaling.json"
    done = run_script(str(BENCH / "scaling.py"), "--rounds", "1", "--duration", "1",
                      "--warmup", "0", "--workers", "1,2", "--json", str(out), cwd=tmp_path,
                      timeout=50)
    assert done.returncode == 0, done.stderr
    assert "weir 2 workers / 1 worker:" in done.stdout, done.stdout
    assert "nginx 2 workers / 1 worker:" in done.stdout, done.stdout
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert sorted(results) == ["nginx x1", "nginx x2", "weir x1", "weir x2"]
    assert results["weir x1"]["supervisor_cpu_s"] is None  # one process, it is the worker
    for name, result in results.items():
        (run,) = result["runs"]
        assert len(run["workers"]) == result["n"], name
        assert len({w["pid"] for w in run["workers"]}) == result["n"], name
        assert run["wrk"]["requests"] > 0 and run["wrk"]["errors"] == 0, name
        for worker in run["workers"]:
            # The quota was in force: CFS counted its periods, and the worker used no more
            # than the quota allows (tick-rounded /proc times, hence the slack).
            assert worker["nr_periods"] > 0, (name, worker)
            assert worker["cpu_s"] <= 0.3 * run["wall_s"] * 1.2 + 0.02, (name, worker)
    assert set(root.glob("weir-scaling-*")) <= before, "cgroups left behind"
    left = processes_with("/weir-bench-scaling-")
    assert not left, f"still running: {left}"


# --- bench/run.py --load h2load ----------------------------------------------------------------


def load_run() -> ModuleType:
    """bench/run.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# h2load 1.52's output for `-c10 -m10 -D2` against an nginx that ended each connection after
# 1000 requests (GOAWAY): the streams in flight on it count as failed and errored.
H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 2s of \
main duration for measurements.
Warm-up started for thread #0.
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Process Request Failure:2
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.01s, 5000.00 req/s, 386.06KB/s
requests: 10057 total, 10090 started, 10057 done, 10000 succeeded, 57 failed, 57 errored, \
0 timeout
status codes: 10000 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 772.13KB (790660) total, 478.52KB (490000) headers (space savings 50.51%), 117.19KB \
(120000) data
                     min         max         mean         sd        +/- sd
time for request:       39us      6.38ms      1.63ms       825us    78.71%
time for connect:       53us       168us       113us        37us    60.00%
time to 1st byte:      618us      2.40ms      1.98ms       655us    80.00%
req/s           :    5327.42     6062.81     5570.60      231.73    70.00%
"""


def test_h2load_output_and_log_are_parsed() -> None:
    run = load_run()
    # --log-file rows: start (us since the epoch), status, us to the end of the response.
    log = "".join(f"1796381649946379\t200\t{us}\n" for us in range(1, 201))  # 1..200 us
    result = run.parse_h2load(H2LOAD_OUTPUT, log)
    assert result.rps == 5000.0
    assert result.requests == 10057 and result.succeeded == 10000
    assert (result.failed, result.errored, result.timeout) == (57, 57, 0)
    assert result.errors == 57 and result.non_2xx == 0
    assert result.status == {"2xx": 10000, "3xx": 0, "4xx": 0, "5xx": 0}
    assert (result.mean_ms, result.sd_ms, result.max_ms) == (1.63, 0.825, 6.38)
    assert (result.p50_ms, result.p99_ms) == (0.1, 0.198)  # nearest rank: 100th, 198th of 200

    # Answers that are not 2xx/3xx are failed too (not errored); they are the errors, once.
    bad = (H2LOAD_OUTPUT
           .replace("10000 succeeded, 57 failed, 57 errored", "0 succeeded, 10057 failed, "
                    "0 errored")
           .replace("10000 2xx, 0 3xx, 0 4xx, 0 5xx", "0 2xx, 0 3xx, 57 4xx, 10000 5xx"))
    result = run.parse_h2load(bad, log)
    assert result.errors == 10057 and result.non_2xx == 10057

    # Percentile lines in the output itself (wrk's format) win over the log.
    with_pcts = H2LOAD_OUTPUT + "    50%    1.50ms\n    99%    4.00ms\n"
    result = run.parse_h2load(with_pcts, None)
    assert (result.p50_ms, result.p99_ms) == (1.5, 4.0)

    with pytest.raises(run.BenchError, match="no request times"):
        run.parse_h2load(H2LOAD_OUTPUT, "")
    with pytest.raises(run.BenchError, match="could not parse h2load output"):
        run.parse_h2load("starting benchmark...\n", log)


def test_h2load_mode_settings_leave_the_wrk_mode_alone(tmp_path: Path) -> None:
    run = load_run()
    wrk = run.parse_args([])
    assert (wrk.load, wrk.connections) == ("wrk", 50)
    h2 = run.parse_args(["--load", "h2load"])
    assert (h2.load, h2.connections, h2.streams) == ("h2load", 10, 10)
    # HTTP/2 only where asked for; the upstream side is HTTP/1.1 either way.
    assert " http2 " not in run.nginx_proxy_conf(tmp_path, 1, 2)
    assert "listen 127.0.0.1:1 http2 backlog=4096;" in run.nginx_proxy_conf(tmp_path, 1, 2,
                                                                             http2=True)
    assert "proxy_http_version 1.1;" in run.nginx_proxy_conf(tmp_path, 1, 2, http2=True)
    assert "keepalive 64;" in run.nginx_proxy_conf(tmp_path, 1, 2)
    assert "keepalive 100;" in run.nginx_proxy_conf(tmp_path, 1, 2, http2=True, keepalive=100)
    assert "http2" not in run.nginx_backend_conf(tmp_path, 1)
    assert "listen 127.0.0.1:3 http2" in run.nginx_backend_conf(tmp_path, 1, 3)
    assert "proto h2" not in run.haproxy_conf(1, 2)
    assert "bind 127.0.0.1:1 proto h2\n" in run.haproxy_conf(1, 2, http2=True)

    for argv, said in ((["--grpc", "--load", "wrk"], "--grpc runs h2load"),
                       (["--load", "h2load", "--delay-ms", "5"], "--delay-ms needs --load wrk")):
        done = run_script(str(BENCH / "run.py"), *argv, cwd=tmp_path)
        assert done.returncode == 2 and said in done.stderr, done.stderr


# --- bench/rapid_reset.py ----------------------------------------------------------------------


def load_rapid_reset() -> ModuleType:
    """bench/rapid_reset.py as a module (it imports bench/run.py as ``run``)."""
    spec = importlib.util.spec_from_file_location("bench_rapid_reset", BENCH / "rapid_reset.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rapid_reset_frames_are_what_a_server_reads() -> None:
    """The attacker's hand-made frames: a GET that HPACK decodes the same on every stream (no
    dynamic table entries), ended by END_STREAM, then RST_STREAM(CANCEL) on the same stream."""
    from hpack import Decoder
    from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

    rr = load_rapid_reset()
    assert rr.hpack_int(10, 5) == b"\x0a"
    assert rr.hpack_int(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    assert rr.hpack_int(127, 7) == b"\x7f\x00"
    block = rr.request_block("127.0.0.1:8080", "/rapid-reset")
    decoder = Decoder()
    expected = [(":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1:8080"),
                (":path", "/rapid-reset")]
    for _ in range(3):
        assert [(n, v) for n, v in decoder.decode(block)] == expected
    assert decoder.header_table_size == 4096 and len(decoder.header_table.dynamic_entries) == 0

    pair = rr.attack_pair(7, block)
    headers, length = Frame.parse_frame_header(memoryview(pair[:9]))
    headers.parse_body(memoryview(pair[9:9 + length]))
    assert isinstance(headers, HeadersFrame) and headers.stream_id == 7
    assert headers.flags == {"END_HEADERS", "END_STREAM"} and headers.data == block
    rst, rst_length = Frame.parse_frame_header(memoryview(pair[9 + length:18 + length]))
    rst.parse_body(memoryview(pair[18 + length:]))
    assert isinstance(rst, RstStreamFrame) and rst_length == 4
    assert (rst.stream_id, rst.error_code) == (7, 0x8)


def test_rapid_reset_reads_frames_goaway_and_weirs_numbers() -> None:
    rr = load_rapid_reset()
    goaway = rr.frame(rr.GOAWAY, 0, 0, (599).to_bytes(4, "big") + (0xB).to_bytes(4, "big"))
    buf = bytearray(rr.frame(rr.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64") + goaway[:12])
    frames = rr.parse_frames(buf)
    assert frames == [(rr.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")]
    assert bytes(buf) == goaway[:12]  # the partial frame waits for the rest
    buf += goaway[12:]
    ((kind, flags, stream_id, payload),) = rr.parse_frames(buf)
    assert (kind, flags, stream_id, bytes(buf)) == (rr.GOAWAY, 0, 0, b"")
    assert rr.parse_goaway(payload) == (599, 0xB)
    assert rr.error_name(0xB) == "ENHANCE_YOUR_CALM (0xb)"
    assert [rr.streams_up_to(n) for n in (0, 1, 3, 599)] == [0, 1, 2, 300]

    metrics = """# HELP http_requests_total Requests answered
# TYPE http_requests_total counter
http_requests_total{service="bench",version="stable",method="GET",status="200"} 1500.0
http_requests_total{service="bench",version="stable",method="GET",status="499"} 20000.0
http_requests_total{service="bench",version="canary",method="GET",status="200"} 5.0
http_requests_created{service="bench",version="stable",method="GET",status="200"} 1.7e9
"""
    assert rr.requests_by_status(metrics) == {"200": 1505.0, "499": 20000.0}

    line = ("2026-12-04 13:13:11,359 WARNING weir.http2: HTTP/2 client 127.0.0.1 reset {0} of {0} "
            "streams right after opening them (rapid reset): connection closed\n")
    # Two connections one after the other, the first going on past its cut to 103 streams.
    log = "".join(line.format(n) for n in (100, 101, 102, 103, 100, 101)) + "INFO stopped\n"
    cuts = rr.cuts_in_log(log)
    assert (cuts.warnings, cuts.opened_at_cut, cuts.opened_in_all) == (6, [100, 100], [103, 101])


def test_rapid_reset_percentiles_and_attack_summary() -> None:
    rr = load_rapid_reset()
    values = [i / 1000 for i in range(1, 201)]  # 1..200 ms
    assert rr.nearest_rank(values, 50) == 0.1 and rr.nearest_rank(values, 99) == 0.198
    assert rr.nearest_rank([0.5], 99) == 0.5
    summary = rr.latency_summary(list(reversed(values)))
    assert (summary.count, summary.p50_ms, summary.p99_ms, summary.max_ms) == (200, 100, 198,
                                                                              200)
    empty = rr.latency_summary([])
    assert empty.count == 0 and empty.p99_ms != empty.p99_ms  # NaN

    due = [rr.Sample(due=t, sent=t + 0.001, done=t + 0.003, status=200) for t in (0.0, 1.0)]
    failed = rr.Sample(due=1.5, sent=1.6, done=1.7, status=503, error="status 503")
    lost = rr.Sample(due=1.8, sent=1.8)  # never answered
    held = rr.Sample(due=1.9)  # never sent
    phase = rr.phase_samples([*due, failed, lost, held], 0.5, 2.0)
    pl = rr.phase_latency(phase)
    assert pl.from_sent.count == 1 and round(pl.from_sent.p50_ms, 6) == 2.0
    assert round(pl.from_due.p50_ms, 6) == 3.0  # sent 1 ms late
    assert pl.errors == {"status 503": 1} and pl.unanswered == 1 and pl.unsent == 1
    assert round(pl.lag_p99_ms, 6) == 100.0  # the 503 was sent 100 ms after it was due

    records = [
        rr.ConnRecord(sent=10_000, goaway_last_stream=4057, goaway_code=0xB, end="goaway"),
        rr.ConnRecord(sent=1_000, goaway_last_stream=4057, goaway_code=0xB, end="goaway"),
        rr.ConnRecord(sent=300, heard=True, end="eof"),  # closed without GOAWAY: none taken
        rr.ConnRecord(sent=20, end="reset"),  # refused before a frame: the address penalized
        rr.ConnRecord(sent=40, end="stopped"),  # the deadline, not Weir
        rr.ConnRecord(end="connect-failed"),
    ]
    assert [r.taken for r in records] == [2029, 1000, 0, 0, 0, 0]
    attack = rr.summarize_attack(records)
    assert (attack.connections, attack.sent, attack.taken) == (5, 11_360, 3029)
    assert attack.goaways == {"ENHANCE_YOUR_CALM (0xb)": 2}
    assert attack.without_goaway == 1 and attack.sent_without_goaway == 360
    assert attack.refused == 1
    assert attack.ends == {"goaway": 2, "eof": 1, "reset": 1, "stopped": 1,
                           "connect-failed": 1}
    assert attack.taken_per_cut == {"min": 1000, "median": 1514.5, "max": 2029}


# nghttp -v -n --no-dep -d REQUEST ... against nghttpd as --grpc starts it (the send side cut).
NGHTTP_GRPC = """\
[  0.000] Connected
[  0.000] recv SETTINGS frame <length=6, flags=0x00, stream_id=0>
          (niv=1)
          [SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100]
[  0.000] send HEADERS frame <length=80, flags=0x04, stream_id=1>
          ; END_HEADERS
          (padlen=0)
          ; Open new stream
          :method: POST
          :path: /bench.Echo/Call.grpc
          content-type: application/grpc
          te: trailers
[  0.000] send DATA frame <length=12, flags=0x01, stream_id=1>
          ; END_STREAM
[  0.000] recv SETTINGS frame <length=0, flags=0x01, stream_id=0>
          ; ACK
          (niv=0)
[  0.000] recv (stream_id=1) :status: 200
[  0.000] recv (stream_id=1) server: nghttpd nghttp2/1.52.0
[  0.000] recv (stream_id=1) content-length: 18
[  0.000] recv (stream_id=1) content-type: application/grpc
[  0.000] recv (stream_id=1) trailer: grpc-status
[  0.000] recv HEADERS frame <length=112, flags=0x04, stream_id=1>
          ; END_HEADERS
          (padlen=0)
          ; First response header
[  0.001] recv DATA frame <length=18, flags=0x00, stream_id=1>
[  0.001] recv (stream_id=1) grpc-status: 0
[  0.001] recv HEADERS frame <length=12, flags=0x05, stream_id=1>
          ; END_STREAM | END_HEADERS
          (padlen=0)
[  0.001] send GOAWAY frame <length=8, flags=0x00, stream_id=0>
          (last_stream_id=0, error_code=NO_ERROR(0x00), opaque_data(0)=[])
"""


def test_grpc_message_and_answer_checks() -> None:
    run = load_run()
    assert run.grpc_frame(b"hi") == b"\x00\x00\x00\x00\x02hi"
    assert run.GRPC_REQUEST[5:] == b"\x0a\x05hello" and len(run.GRPC_REQUEST) == 12
    assert len(run.GRPC_RESPONSE) == 18
    assert run.GRPC_HEADERS["content-type"] == "application/grpc"
    assert run.GRPC_HEADERS["te"] == "trailers"

    answer = run.parse_nghttp_verbose(NGHTTP_GRPC)
    assert answer.header_blocks[0][":status"] == "200"
    assert answer.header_blocks[-1] == {"grpc-status": "0"}
    assert answer.block_end_stream == [False, True]
    assert answer.data_bytes == 18 and answer.reset is None
    assert run.grpc_answer_problems(answer) == []
    # The request's own headers (send side, indented) are not taken for the answer's.
    assert ":path" not in answer.header_blocks[0]

    # A proxy that drops the trailers: the answer ends with its DATA frame.
    cut = NGHTTP_GRPC.split("[  0.001] recv (stream_id=1) grpc-status: 0")[0].replace(
        "recv DATA frame <length=18, flags=0x00", "recv DATA frame <length=18, flags=0x01")
    (problem,) = run.grpc_answer_problems(run.parse_nghttp_verbose(cut))
    assert problem == "no trailers: no grpc-status at all"

    # A trailers-only error (what a proxy answers when it has no upstream): no message either.
    only = """\
[  0.000] recv (stream_id=13) :status: 200
[  0.000] recv (stream_id=13) content-type: application/grpc
[  0.000] recv (stream_id=13) grpc-status: 14
[  0.000] recv HEADERS frame <length=20, flags=0x05, stream_id=13>
"""
    problems = run.grpc_answer_problems(run.parse_nghttp_verbose(only))
    assert problems == ["0 body bytes, not the 18-byte message",
                        "no trailers: grpc-status 14 came with the answer's headers "
                        "(a trailers-only answer)"]

    bad = (NGHTTP_GRPC.replace(":status: 200", ":status: 502")
           .replace("content-type: application/grpc\n[", "content-type: text/html\n[", 1)
           .replace("grpc-status: 0", "grpc-status: 13")
           + "[  0.002] recv RST_STREAM frame <length=4, flags=0x00, stream_id=1>\n"
           "          (error_code=INTERNAL_ERROR(0x02))\n")
    assert run.grpc_answer_problems(run.parse_nghttp_verbose(bad)) == [
        "HTTP status 502, not 200", "content-type text/html, not application/grpc",
        "trailer grpc-status 13, not 0", "stream reset (INTERNAL_ERROR)"]
    assert run.parse_nghttp_verbose("[  0.000] Connected\n") is None
    assert run.grpc_answer_problems(None) == ["no answer (no HEADERS frame received)"]


def test_grpc_answers_without_their_message_are_errors() -> None:
    run = load_run()
    result = run.parse_h2load(H2LOAD_OUTPUT, "1796381649946379\t200\t100\n")
    assert result.data_bytes == 120000  # "117.19KB (120000) data"
    assert result.errors == 57
    # 10,000 answers of 12 bytes each: all there; 11 bytes short: one answer had none.
    assert run.missing_messages(10000, 120000, 12) == 0
    assert run.missing_messages(10000, 120000 - 11, 12) == 1
    assert run.missing_messages(10000, 0, 12) == 10000
    assert run.missing_messages(10, 500, 12) == 0  # error pages' bodies count for nothing
    result.missing_messages = 3
    assert result.errors == 60
    no_traffic = "\n".join(line for line in H2LOAD_OUTPUT.splitlines()
                           if not line.startswith("traffic"))
    assert run.parse_h2load(no_traffic, "1\t200\t100\n").data_bytes is None
    with pytest.raises(run.BenchError, match="no traffic line"):
        run.missing_messages(10, None, 12)


def test_grpc_mode_configs(tmp_path: Path) -> None:
    run = load_run()
    args = run.parse_args(["--grpc"])
    assert (args.grpc, args.load, args.connections, args.streams) == (True, "h2load", 10, 10)
    assert run.parse_args(["--grpc", "--load", "h2load"]).load == "h2load"
    assert run.parse_args([]).grpc is False

    nginx = run.nginx_proxy_conf(tmp_path, 1, 2, keepalive=100, grpc=True)
    assert "listen 127.0.0.1:1 http2 backlog=4096;" in nginx
    assert "grpc_pass grpc://backend;" in nginx and "proxy_pass" not in nginx
    assert "keepalive 100;" in nginx
    assert "grpc_pass" not in run.nginx_proxy_conf(tmp_path, 1, 2, http2=True)

    haproxy = run.haproxy_conf(1, 2, http2=True, backend_h2=True)
    assert "bind 127.0.0.1:1 proto h2\n" in haproxy
    assert "server s1 127.0.0.1:2 proto h2\n" in haproxy
    assert "server s1 127.0.0.1:2\n" in run.haproxy_conf(1, 2, http2=True)

    assert "protocol" not in run.weir_conf(1, 2, 3)
    weir = run.weir_conf(1, 2, 3, protocol="h2c")
    assert weir.count('{upstreams: ["127.0.0.1:3"], protocol: h2c}') == 2  # both versions
    # Weir takes it as it is: both versions' upstreams speak h2c.
    from proxy.config.loader import load_yaml, parse_config

    config = parse_config(load_yaml(weir))
    versions = config.services[0].versions
    assert {name: v.protocol for name, v in versions.items()} == {"stable": "h2c",
                                                                  "canary": "h2c"}

    docroot = run.grpc_backend_files(tmp_path / "backend")
    assert (docroot / "bench.Echo" / "Call.grpc").read_bytes() == run.GRPC_RESPONSE
    assert run.GRPC_PATH == "/bench.Echo/Call.grpc"
    assert (tmp_path / "backend" / "mime.types").read_text() == "application/grpc grpc\n"
    argv = run.nghttpd_argv("/usr/sbin/nghttpd", 4, docroot)
    assert argv[0] == "/usr/sbin/nghttpd" and argv[-1] == "4"
    assert {"--no-tls", "--trailer=grpc-status: 0", f"--mime-types-file={tmp_path}/backend/"
            "mime.types"} <= set(argv)
    assert argv[argv.index("-a") + 1] == "127.0.0.1" and argv[argv.index("-d") + 1] == \
        str(docroot)


def load_idle_memory() -> ModuleType:
    """bench/idle_memory.py as a module (it imports bench/run.py as ``run``)."""
    spec = importlib.util.spec_from_file_location("bench_idle_memory", BENCH / "idle_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_idle_memory_http2_settings(tmp_path: Path) -> None:
    idle = load_idle_memory()
    assert (idle.target_bytes(False), idle.target_bytes(True)) == (10 * 1024, 32 * 1024)
    assert idle.parse_args(["--http2"]).http2 and not idle.parse_args([]).http2
    assert "listen 127.0.0.1:1 backlog=4096;" in idle.nginx_conf(tmp_path, 1, 2, 100)
    assert "listen 127.0.0.1:1 http2 backlog=4096;" in idle.nginx_conf(tmp_path, 1, 2, 100,
                                                                       http2=True)
    headers = dict(idle.h2_request_headers(1234, "127.0.0.1:9"))
    assert headers == {b":method": b"GET", b":scheme": b"http", b":authority": b"127.0.0.1:9",
                       b":path": b"/idle/1234", b"x-user-id": b"user-234",
                       b"user-agent": b"weir-idle-memory"}
    # The same request as over HTTP/1.1.
    assert b"GET /idle/1234 HTTP/1.1" in idle.request_bytes(1234)
    assert b"x-user-id: user-234" in idle.request_bytes(1234)


def test_idle_memory_measures_weir_over_http2(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    done = run_script(str(BENCH / "idle_memory.py"), "--http2", "--connections", "200",
                      "--steps", "2", "--no-nginx", "--settle", "0.1", "--json", str(out),
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "per idle HTTP/2 connection" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["settings"]["http2"] is True and doc["settings"]["target_bytes"] == 32 * 1024
    (weir,) = doc["results"]
    assert weir["held"] == 200 and weir["failures"] == 0
    assert weir["points"][-1]["fds"] - weir["before"]["fds"] >= 200
    left = processes_with("/weir-idle-", "idle_memory.py --serve-backend")
    assert not left, f"still running: {left}"
