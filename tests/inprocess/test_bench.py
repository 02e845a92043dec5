"""The benchmark: workload selection, the SSE upstream, the load generator, the report, a run.

Nothing here depends on timing: the figures are checked for shape, never for size.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.bench_client import (
    CODEX_BODY_BYTES,
    CODEX_HTTP_HEADERS,
    CODEX_WS_HEADERS,
    FRAMING_EVENTS,
    PATHS,
    STANDARD_PATHS,
    Fleet,
    HttpTurnClient,
    ProcSample,
    ProtocolError,
    ResponseReader,
    SseSplitter,
    Target,
    TurnChecker,
    TurnResult,
    WorkloadSpec,
    add_added_latency,
    check_document,
    codex_body,
    cpu_seconds,
    evaluate_targets,
    expected_text,
    fill,
    format_report,
    parse_schedstat_s,
    parse_stat_cpu_s,
    parse_status_kib,
    percentile,
    process_figures,
    ratios,
    saturation_notes,
    steady_latencies,
    turn_figures,
    ws_message,
)
from harness.local_sse_upstream import (
    LocalSseUpstream,
    ThreadedSseUpstream,
    plan_reply,
)
from responses_ws_bridge.core.sse import encode_event, parse_sse
from responses_ws_bridge.local.response_events import (
    BadWorkload,
    TurnSpec,
    Workload,
    apply_workload,
    encode,
    requested_workload,
    turn_events,
    workload_metadata,
)
from responses_ws_bridge.local.upstream import LocalUpstream, Plan, ThreadedUpstream
from websockets.asyncio.client import connect

from tests.support.data import ROOT, load_capture

TIMEOUT = 15.0


def run_async(body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await body()

    return asyncio.run(main())


def sse_turn(deltas: int, *, stamp: bool = False) -> list[tuple[str, str]]:
    """A local upstream's turn as (type, data) pairs, as an SSE client reads it."""
    spec = TurnSpec(deltas=deltas)
    events = turn_events(
        {"model": "gpt-5-codex"}, spec, response_id="resp_1", item_id="msg_1", created_at=0
    )
    out = []
    for n, event in enumerate(events):
        if stamp:
            event["x_sent_ns"] = 1_000 + n
        out.append((event["type"], encode(event)))
    return out


# -- workloads picked by the request ---------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "workload"),
    [
        (None, Workload()),
        ({}, Workload()),
        ({"other": "x"}, Workload()),
        ({"local_deltas": "5000"}, Workload(deltas=5000)),
        ({"local_pace_ms": "5"}, Workload(pace_s=0.005)),
        ({"local_pace_ms": "0.5"}, Workload(pace_s=0.0005)),
        ({"local_stamp": "1"}, Workload(stamp=True)),
        ({"local_stamp": "0"}, Workload(stamp=False)),
        (
            {"local_deltas": "0", "local_pace_ms": "0", "local_stamp": "1"},
            Workload(0, 0.0, True),
        ),
    ],
)
def test_requested_workload(metadata: dict[str, str] | None, workload: Workload) -> None:
    request: dict[str, Any] = {"model": "m"}
    if metadata is not None:
        request["metadata"] = metadata
    assert requested_workload(request) == workload


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({"local_deltas": "many"}, "local_deltas"),
        ({"local_deltas": "-1"}, "local_deltas"),
        ({"local_deltas": "10000001"}, "local_deltas"),
        ({"local_pace_ms": "fast"}, "local_pace_ms"),
        ({"local_pace_ms": "-5"}, "local_pace_ms"),
        ({"local_pace_ms": "nan"}, "local_pace_ms"),
        ({"local_pace_ms": "60001"}, "local_pace_ms"),
        ({"local_stamp": "yes"}, "local_stamp"),
    ],
)
def test_bad_workload_names_its_key(metadata: dict[str, str], key: str) -> None:
    with pytest.raises(BadWorkload) as caught:
        requested_workload({"metadata": metadata})
    assert caught.value.key == key


def test_workload_metadata_round_trips() -> None:
    metadata = workload_metadata(deltas=20, pace_ms=2.5, stamp=True)
    assert metadata == {"local_deltas": "20", "local_pace_ms": "2.5", "local_stamp": "1"}
    assert requested_workload({"metadata": metadata}) == Workload(20, 0.0025, True)
    assert workload_metadata() == {}


def test_apply_workload_overrides_only_what_the_request_says() -> None:
    spec = TurnSpec(text="abc", deltas=3)
    assert apply_workload(spec, 0.1, Workload()) == (spec, 0.1)
    assert apply_workload(spec, 0.1, Workload(7, 0.0, True)) == (
        TurnSpec(text="abc", deltas=7, stamp_ns=True),
        0.0,
    )


# -- the WebSocket upstream honours the workload -----------------------------------------


def ws_events(message: str, **options: Any) -> tuple[list[dict[str, Any]], LocalUpstream]:
    upstream = LocalUpstream(**options)

    async def body() -> list[dict[str, Any]]:
        async with (
            upstream,
            connect(f"{upstream.url}/v1/responses", compression=None) as ws,
        ):
            await ws.send(message)
            events: list[dict[str, Any]] = []
            while not events or events[-1]["type"] not in ("response.completed", "error"):
                events.append(json.loads(await ws.recv()))
            return events

    return run_async(body), upstream


def test_ws_upstream_serves_the_requested_workload() -> None:
    body = codex_body("k", workload_metadata(deltas=5, pace_ms=0, stamp=True))
    events, upstream = ws_events(ws_message(body), default_plan=Plan(turn=TurnSpec(deltas=2)))
    assert len(events) == 5 + FRAMING_EVENTS
    assert all(isinstance(event["x_sent_ns"], int) for event in events)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == expected_text(5)
    assert len(upstream.records()[0].events) == len(events)


def test_ws_upstream_refuses_a_bad_workload_with_an_error_event() -> None:
    body = codex_body("k", {"local_deltas": "lots"})
    events, _ = ws_events(ws_message(body))
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["param"] == "metadata.local_deltas"


def test_ws_upstream_without_event_records_still_serves() -> None:
    body = codex_body("k", workload_metadata(deltas=3))
    events, upstream = ws_events(ws_message(body), record_events=False)
    assert len(events) == 3 + FRAMING_EVENTS
    record = upstream.records()[0]
    assert record.events == [] and record.closed_by == "client"


# -- the HTTP SSE upstream -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/models", b"", 200),
        ("GET", "/v1/other", b"", 404),
        ("GET", "/v1/responses", b"", 405),
        ("POST", "/v1/responses", b"{not json", 400),
        ("POST", "/v1/responses", b"[1]", 400),
        ("POST", "/v1/responses", b'{"input": "hi"}', 400),
        ("POST", "/v1/responses", b'{"model": "m", "metadata": {"local_stamp": "2"}}', 400),
        ("POST", "/backend-api/codex/responses?x=1", b'{"model": "m"}', 200),
    ],
)
def test_plan_reply(method: str, path: str, body: bytes, status: int) -> None:
    reply = plan_reply(method, path, body, TurnSpec(), 0.0)
    assert reply.status == status
    assert (reply.turn is not None) == (status == 200 and method == "POST")
    if status >= 400:
        assert reply.body is not None and set(reply.body["error"]) >= {"message", "type", "code"}


def test_plan_reply_applies_the_workload_over_the_server_default() -> None:
    body = json.dumps({"model": "m", "metadata": workload_metadata(deltas=9, pace_ms=4)})
    reply = plan_reply("POST", "/v1/responses", body.encode(), TurnSpec(deltas=2), 0.5)
    assert reply.turn is not None
    _, spec, pace_s = reply.turn
    assert (spec.deltas, pace_s) == (9, 0.004)


@pytest.fixture(scope="module")
def sse_upstream() -> Iterator[ThreadedSseUpstream]:
    with ThreadedSseUpstream() as server:
        yield server


def test_sse_upstream_streams_the_same_events_as_the_websocket_one(
    sse_upstream: ThreadedSseUpstream,
) -> None:
    body = codex_body("k", workload_metadata(deltas=7))
    headers = dict(fill(CODEX_HTTP_HEADERS, "k"))
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        response = client.post(f"{sse_upstream.url}/v1/responses", json=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = parse_sse(response.content)
    expected = [t for t, _ in sse_turn(7)]
    assert [t for t, _ in events] == expected
    assert [json.loads(d)["type"] for _, d in events] == expected
    assert "x_sent_ns" not in events[0][1]


def test_sse_upstream_answers_json_when_not_streaming(sse_upstream: ThreadedSseUpstream) -> None:
    body = {**codex_body("k", workload_metadata(deltas=4)), "stream": False}
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        response = client.post(f"{sse_upstream.url}/v1/responses", json=body)
        models = client.get(f"{sse_upstream.url}/v1/models")
    assert response.status_code == 200
    final = response.json()
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == expected_text(4)
    assert models.json()["data"][0]["id"] == "gpt-5-codex"


def test_sse_upstream_keeps_the_connection_for_the_next_turn_and_stamps(
    sse_upstream: ThreadedSseUpstream,
) -> None:
    async def body() -> list[TurnResult]:
        client = HttpTurnClient("127.0.0.1", sse_upstream.port, "/v1/responses", TIMEOUT)
        data = json.dumps(codex_body("k", workload_metadata(deltas=30, pace_ms=1, stamp=True)))
        headers = fill(CODEX_HTTP_HEADERS, "k")
        first = await client.turn(headers, data.encode(), 30)
        writer = client._writer
        second = await client.turn(headers, data.encode(), 30)
        assert client._writer is writer is not None  # one connection for both turns
        await client.close()
        return [first, second]

    for result in run_async(body):
        assert result.ok, result.error
        assert result.events == 30 + FRAMING_EVENTS
        assert len(result.latencies_ns) == result.events
        assert result.ttfe_ns is not None and result.ttfe_ns > 0


def test_http_client_reports_an_http_error(sse_upstream: ThreadedSseUpstream) -> None:
    async def body() -> TurnResult:
        client = HttpTurnClient("127.0.0.1", sse_upstream.port, "/v1/responses", TIMEOUT)
        try:
            return await client.turn([], b'{"model": "m", "metadata": {"local_deltas": "x"}}', 1)
        finally:
            await client.close()

    result = run_async(body)
    assert result.error is not None and result.error.startswith("HTTP 400")


# -- the HTTP response reader -----------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1\r\n \r\nb\r\nworld again\r\n0\r\nx-trailer: t\r\n\r\n"
)


def feed_all(reader: ResponseReader, data: bytes, step: int) -> bytes:
    out = b""
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_reader_decodes_chunked_bodies_split_anywhere(step: int) -> None:
    reader = ResponseReader()
    assert feed_all(reader, CHUNKED, step) == b"hello world again"
    assert reader.done and reader.status == 200 and reader.keep_alive
    assert reader.header("Content-Type") == "text/event-stream"


@pytest.mark.parametrize(
    ("data", "body", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", b"abc", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx", b"x", True),
    ],
)
def test_reader_bodies_with_a_known_end(data: bytes, body: bytes, keep_alive: bool) -> None:
    reader = ResponseReader()
    assert feed_all(reader, data, 4) == body
    assert reader.done and reader.keep_alive is keep_alive


def test_reader_close_delimited_body_ends_with_the_connection() -> None:
    reader = ResponseReader()
    assert reader.feed(b"HTTP/1.1 200 OK\r\n\r\nsome ") == b"some "
    assert reader.feed(b"more") == b"more"
    assert not reader.done
    reader.feed_eof()
    assert reader.done and not reader.keep_alive


@pytest.mark.parametrize(
    "data",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nab",
    ],
)
def test_reader_refuses_what_is_not_http(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ResponseReader().feed(data)


def test_reader_refuses_a_truncated_body() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab")
    with pytest.raises(ProtocolError):
        reader.feed_eof()


# -- the SSE splitter ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 5, 64, 10_000])
def test_splitter_gives_the_events_of_a_stream_split_anywhere(step: int) -> None:
    stream = b"".join(encode_event(data, kind) for kind, data in sse_turn(3))
    stream = b": keepalive\n\n" + stream
    splitter = SseSplitter()
    events = []
    for i in range(0, len(stream), step):
        events += splitter.feed(stream[i : i + step])
    assert events == sse_turn(3)
    assert splitter.pending == b""


@pytest.mark.parametrize(
    ("data", "events"),
    [
        (b"event: a\r\ndata: 1\r\n\r\n", [("a", "1")]),
        (b"data: x\ndata: y\n\n", [(None, "x\ny")]),
        (b"data:nospace\n\n", [(None, "nospace")]),
        (b"event: only\n\n", []),
        (b": comment\n\n", []),
        (b"data: unterminated\n", []),
    ],
)
def test_splitter_fields(data: bytes, events: list[tuple[str | None, str]]) -> None:
    assert SseSplitter().feed(data) == events


# -- checking a turn --------------------------------------------------------------------------


def check(
    events: Sequence[tuple[str | None, str]], deltas: int, *, ended: bool = True
) -> TurnResult:
    checker = TurnChecker(deltas, start_ns=100)
    for n, (kind, data) in enumerate(events):
        checker.event(kind, data, recv_ns=2_000 + n)
    if ended:
        checker.end_of_stream()
    return checker.result()


def test_checker_accepts_an_exact_turn_and_times_it() -> None:
    result = check(sse_turn(5, stamp=True), 5)
    assert result.ok, result.error
    assert result.events == 5 + FRAMING_EVENTS
    assert result.ttfe_ns == 1_900
    assert set(result.latencies_ns) == {1_000}


def _replace_delta(events: list[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    out = list(events)
    index = next(i for i, (kind, _) in enumerate(out) if kind == "response.output_text.delta")
    body = json.loads(out[index][1])
    body["delta"] = text
    out[index] = (out[index][0], encode(body))
    return out


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda e: e[:-1], "before a terminal event"),
        (lambda e: e[:5] + e[6:], "sequence_number"),
        (lambda e: [*e, e[-1]], "after the terminal"),
        (lambda e: [(None, "not json"), *e], "not JSON"),
        (lambda e: [("response.created", "[1]"), *e], "not a JSON object"),
        (lambda e: [("other", e[0][1]), *e[1:]], "SSE type"),
        (lambda e: _replace_delta(e, "tampered "), "text differs"),
    ],
)
def test_checker_catches_what_is_not_exact(
    mangle: Callable[[list[tuple[str, str]]], list[tuple[str | None, str]]], error: str
) -> None:
    result = check(mangle(sse_turn(5)), 5)
    assert result.error is not None and error in result.error


def test_checker_wants_the_delta_count_it_asked_for() -> None:
    result = check(sse_turn(5), 6)
    assert result.error is not None and "expected 14" in result.error


def test_checker_counts_a_failed_turn_as_an_error() -> None:
    failed = json.dumps({"type": "response.failed", "sequence_number": 0})
    result = check([("response.failed", failed)], 3)
    assert result.error == "turn ended with response.failed"


# -- the Codex-shaped requests match the capture ---------------------------------------------


def test_http_request_shape_follows_codex_cli() -> None:
    capture = load_capture("http-sse.json")
    names = [k for k, _ in capture["headers"] if k not in ("host", "content-length")]
    assert [k for k, _ in CODEX_HTTP_HEADERS] == names
    body = codex_body("k", {})
    assert set(capture["body"]) <= set(body)
    assert body["stream"] is True


def test_ws_request_shape_follows_codex_cli() -> None:
    capture = load_capture("websocket.json")
    library = {"host", "connection", "upgrade", "sec-websocket-version", "sec-websocket-key"}
    names = [
        k for k, _ in capture["headers"] if k.lower() not in library | {"sec-websocket-extensions"}
    ]
    assert [k for k, _ in CODEX_WS_HEADERS] == names
    message = json.loads(ws_message(codex_body("k", {"local_deltas": "1"})))
    assert message["type"] == "response.create"
    assert "stream" not in message and message["metadata"] == {"local_deltas": "1"}


@pytest.mark.parametrize("size", [2_000, CODEX_BODY_BYTES])
def test_body_is_padded_to_the_size_asked(size: int) -> None:
    body = codex_body("k", workload_metadata(deltas=5), size)
    assert len(json.dumps(body, separators=(",", ":"))) == size
    assert body["input"][0]["content"][0]["text"].startswith("You are a coding agent.")
    # Smaller than the bare body: no padding.
    assert codex_body("k", {}, 10) == codex_body("k", {})


def test_every_stream_has_its_own_key() -> None:
    headers = dict(fill(CODEX_HTTP_HEADERS, "bench-7"))
    assert headers["session-id"] == headers["thread-id"] == "bench-7"
    assert json.loads(headers["x-codex-turn-metadata"])["session_id"] == "bench-7"
    assert codex_body("bench-7", {})["prompt_cache_key"] == "bench-7"


# -- fleets against the real upstreams ---------------------------------------------------------


def test_fleets_run_exact_turns_on_both_transports(sse_upstream: ThreadedSseUpstream) -> None:
    with ThreadedUpstream(record_events=False) as ws_upstream:

        async def body() -> tuple[list[TurnResult], list[TurnResult]]:
            direct = Fleet(Target("direct", "ws", "127.0.0.1", ws_upstream.port), 3, "f")
            http = Fleet(Target("sse", "http", "127.0.0.1", sse_upstream.port), 3, "f")
            try:
                return (
                    await direct.run(deltas=40, pace_ms=0.5, turns=2),
                    await http.run(deltas=40, turns=2),
                )
            finally:
                await direct.close()
                await http.close()

        ws_results, http_results = run_async(body)
    for result in [*ws_results, *http_results]:
        assert result.ok, result.error
        assert result.events == 40 + FRAMING_EVENTS
        assert len(result.latencies_ns) == result.events
    assert len(ws_results) == len(http_results) == 6


def test_a_broken_upstream_shows_as_errors() -> None:
    with ThreadedUpstream() as ws_upstream:
        ws_upstream.script(Plan(close_code=1011, close_after_events=3))

        async def body() -> list[TurnResult]:
            fleet = Fleet(Target("direct", "ws", "127.0.0.1", ws_upstream.port), 1, "b")
            try:
                return await fleet.run(deltas=10, turns=2)
            finally:
                await fleet.close()

        broken, recovered = run_async(body)
    assert broken.error is not None and "1011" in broken.error
    assert broken.events == 3
    assert recovered.ok, recovered.error  # the next turn reconnects


# -- figures and the report ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([3.0], 99, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([float(n) for n in range(101)], 99, 99.0),
    ],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_proc_parsers() -> None:
    # The command name may hold spaces and parentheses.
    stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3"
    assert parse_stat_cpu_s(stat, 100) == 3.0
    status = "Name:\tmitmdump\nVmHWM:\t  81000 kB\nVmRSS:\t   72000 kB\n"
    assert parse_status_kib(status, "VmRSS") == 72000
    assert parse_status_kib(status, "VmHWM") == 81000
    with pytest.raises(ValueError):
        parse_status_kib(status, "VmSwap")
    assert parse_schedstat_s("1500000000 2000 7\n") == 1.5


def test_cpu_seconds_of_this_process_grow_with_work() -> None:
    before = cpu_seconds(os.getpid())
    sum(n * n for n in range(200_000))
    assert cpu_seconds(os.getpid()) > before


def test_turn_and_process_figures() -> None:
    results = [
        TurnResult(None, 10, 2_000_000, 9_000_000, [1_000_000] * 10),
        TurnResult("boom", 4, 4_000_000, 5_000_000, [3_000_000] * 4),
    ]
    figures = turn_figures(results, wall_s=0.5)
    assert figures["turns"] == 2 and figures["complete"] == 1 and figures["errors"] == 1
    assert figures["events"] == 14 and figures["events_per_s"] == 28.0
    assert figures["ttfe_ms_p50"] == 3.0 and figures["latency_ms_p50"] == 1.0
    assert figures["first_errors"] == ["boom"]
    cost = process_figures(ProcSample(1.0, 100, 100), ProcSample(1.5, 120, 130), 2000)
    assert cost == {
        "cpu_s": 0.5,
        "cpu_ms_per_1k_events": 250.0,
        "rss_kib": 120,
        "peak_rss_kib": 130,
    }


WORKLOADS = (
    WorkloadSpec("first-40ms", "first", 1, 3, 12, rtt_ms=40, gap_ms=210, paths=PATHS),
    WorkloadSpec("short", "short", 1, 2, 12),
    WorkloadSpec("long", "long", 1, 1, 50),
    WorkloadSpec("paced-4", "paced", 4, 1, 10, 5.0),
    WorkloadSpec("flood", "flood", 2, 1, 50),
)


def fake_results(errors: int = 0) -> dict[str, dict[str, Any]]:
    """Figures shaped like a run's, with bridge CPU and latency twice passthrough's."""
    scale = {
        "direct": 0.5,
        "passthrough": 1.0,
        "bridge_fresh": 2.0,
        "bridge_reused": 0.35,
        "bridge_preconnect": 0.8,
    }
    results: dict[str, dict[str, Any]] = {}
    for path, k in scale.items():
        results[path] = {}
        for w in WORKLOADS:
            if path not in w.paths:
                continue
            turns = w.streams * w.turns
            client = {
                "turns": turns,
                "complete": turns - (errors if path == "bridge_fresh" else 0),
                "errors": errors if path == "bridge_fresh" else 0,
                "first_errors": ["boom"] if errors and path == "bridge_fresh" else [],
                "events": turns * (w.deltas + FRAMING_EVENTS),
                "wall_s": 1.0,
                "events_per_s": 100.0 / k,
                "ttfe_ms_p50": 4.0 * k,
                "ttfe_ms_p99": 8.0 * k,
                "latency_ms_p50": 1.0 * k,
                "latency_ms_p99": 2.0 * k,
            }
            if w.kind == "paced":
                # Steady state: the bridges beat passthrough here.
                client["steady_latency_ms_p50"] = 0.5 if path.startswith("bridge") else k
                client["steady_latency_ms_p99"] = 1.0 if path.startswith("bridge") else 2 * k
            proxy = None
            if path != "direct":
                proxy = {
                    "cpu_s": 1.0,
                    "cpu_ms_per_1k_events": 10.0 * k,
                    "rss_kib": 1,
                    "peak_rss_kib": 2,
                }
            results[path][w.name] = {"client": client, "proxy": proxy}
    add_added_latency(results)
    return results


def document(results: dict[str, dict[str, Any]], idle: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "date": "2026-01-01T00:00:00+00:00",
        "mode": "smoke",
        "machine": {"cores": 2},
        "paths": list(PATHS),
        "workloads": [w.as_dict() for w in WORKLOADS],
        "results": results,
        "idle_sessions": idle,
        "ratios": ratios(results),
        "targets": evaluate_targets(results, WORKLOADS, idle),
    }


IDLE = {
    "path": "bridge_reused",
    "sessions": 8,
    "turns": 10,
    "errors": 0,
    "kib_per_session_1": 40.0,
    "kib_per_session": 60.0,
}


def test_added_latency_is_over_the_direct_path() -> None:
    client = fake_results()["bridge_fresh"]["paced-4"]["client"]
    assert client["added_latency_ms_p50"] == 1.5
    assert client["added_latency_ms_p99"] == 3.0
    assert client["added_steady_latency_ms_p99"] == 0.0
    assert "added_steady_latency_ms_p99" not in fake_results()["bridge_fresh"]["long"]["client"]


def test_steady_latency_leaves_out_the_start_up_burst() -> None:
    # Stream a's events arrive at 10, 20, 30; stream b starts late, at 25.
    a = TurnResult(None, 3, 5, 30, latencies_ns=[9, 8, 7], received_ns=[10, 20, 30])
    b = TurnResult(None, 2, 20, 35, latencies_ns=[50, 6], received_ns=[25, 35])
    assert steady_latencies([a, b]) == [7.0, 50.0, 6.0]
    figures = turn_figures([a, b], 1.0, steady=True)
    assert figures["steady_events"] == 3
    assert figures["latency_ms_p99"] is not None
    assert "steady_events" not in turn_figures([a, b], 1.0)
    # A stream that never got a stamped event leaves nothing to call steady.
    assert steady_latencies([a, TurnResult("boom", 0, None, 0)]) == []


def test_ratios() -> None:
    short = ratios(fake_results())["short"]
    assert short["ttfe_ms_p50"] == {
        "bridge_fresh/passthrough": 2.0,
        "bridge_fresh/direct": 4.0,
        "bridge_reused/passthrough": 0.35,
        "bridge_reused/direct": 0.7,
    }
    # No proxy on the direct path: only the passthrough ratio.
    assert set(short["cpu_ms_per_1k_events"]) == {
        "bridge_fresh/passthrough",
        "bridge_reused/passthrough",
    }


TTFE = "time to first event p50 at 40 ms RTT, TLS,"
EXACT = "4 concurrent streams complete and byte-exact"
IDLE_RSS = "RSS per idle reused session"
FLAT = "RSS per idle session flat in turns"
IDLE_W = "idle_sessions"


def test_targets() -> None:
    targets = evaluate_targets(fake_results(), WORKLOADS, IDLE)
    verdicts = {(t["target"].split(" (")[0], t["path"], t["workload"]): t["met"] for t in targets}
    assert verdicts == {
        ("cpu per event ≤ 1.0x passthrough", "bridge_fresh", "long"): False,
        ("cpu per event ≤ 1.0x passthrough", "bridge_fresh", "flood"): False,
        ("cpu per event ≤ 1.0x passthrough", "bridge_reused", "long"): True,
        ("cpu per event ≤ 1.0x passthrough", "bridge_reused", "flood"): True,
        ("added latency p99, all events, ≤ passthrough's", "bridge_fresh", "paced-4"): False,
        ("added latency p99, all events, ≤ passthrough's", "bridge_reused", "paced-4"): True,
        ("added latency p99, steady state, ≤ passthrough's", "bridge_fresh", "paced-4"): True,
        ("added latency p99, steady state, ≤ passthrough's", "bridge_reused", "paced-4"): True,
        (f"{TTFE} ≤ 1.1x passthrough's", "bridge_fresh", "first-40ms"): False,
        (f"{TTFE} ≤ 0.4x passthrough's", "bridge_reused", "first-40ms"): True,
        (f"{TTFE} ≤ 0.75x passthrough's", "bridge_preconnect", "first-40ms"): False,
        (f"{EXACT} at 0 ms RTT", "bridge_fresh", "paced-4"): True,
        (f"{EXACT} at 0 ms RTT", "bridge_reused", "paced-4"): True,
        (f"{IDLE_RSS} after 10 turns, recording on, ≤ 64 KiB", "bridge_reused", IDLE_W): True,
        (f"{FLAT}: growth from 1 to 10 turns ≤ 6.4 KiB", "bridge_reused", IDLE_W): False,
    }
    # Preconnect is measured on the first event only: no other target for it.
    assert {t["workload"] for t in targets if t["path"] == "bridge_preconnect"} == {"first-40ms"}
    cpu = next(t for t in targets if t["path"] == "bridge_fresh" and t["workload"] == "long")
    assert cpu["value_over_limit"] == 2.0


def test_a_paced_workload_the_machine_cannot_pace_is_noted() -> None:
    results = fake_results()
    workloads = [w.as_dict() for w in WORKLOADS]
    # paced-4 offers 800 events/s; the fake direct client gets 200.
    (note,) = saturation_notes(workloads, results)
    assert note.startswith("paced-4: the direct client got 200 of the 800 events/s offered (25%)")
    results["direct"]["paced-4"]["client"]["events_per_s"] = 0.8 * 800
    assert saturation_notes(workloads, results) == []
    report = format_report({**document(results, IDLE), "notes": [note]})
    assert f"note: {note}" in report


def test_errors_miss_the_concurrency_target() -> None:
    targets = evaluate_targets(fake_results(errors=1), WORKLOADS, None)
    scale = next(t for t in targets if "concurrent" in t["target"] and t["path"] == "bridge_fresh")
    assert scale["met"] is False and scale["value"] == 1.0


def test_check_document_accepts_a_complete_run_and_the_report_shows_it() -> None:
    doc = document(fake_results(), IDLE)
    assert check_document(doc) == []
    report = format_report(doc)
    for path in PATHS:
        assert path in report
    assert "MISSED (2.00x the limit)" in report
    assert (
        "idle reused sessions: 8 held, RSS each 40.0 KiB after 1 turn, 60.0 KiB after 10" in report
    )
    assert "indicative only" in report
    assert "indicative" not in format_report({**doc, "mode": "full"})
    markdown = format_report(doc, markdown=True)
    assert "| short | bridge_reused | 2/2 |" in markdown
    assert "\n| --- | --- | ---: |" in markdown


def test_check_document_finds_what_is_wrong() -> None:
    results = fake_results(errors=1)
    del results["passthrough"]["flood"]
    results["direct"]["long"]["client"]["ttfe_ms_p50"] = None
    results["bridge_reused"]["short"]["proxy"] = None
    problems = check_document(document(results, None))
    assert "passthrough x flood: missing" in problems
    assert "direct x long: client ttfe_ms_p50 is None" in problems
    assert "bridge_reused x short: no proxy figures" in problems
    assert "idle_sessions: missing kib_per_session" in problems
    assert any(p.startswith("bridge_fresh x short: 1 errors") for p in problems)
    assert check_document({"mode": "smoke"})[0] == "missing date"


# -- the benchmark itself -------------------------------------------------------------------


def test_smoke_run_writes_complete_well_formed_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert check_document(doc) == []
    assert doc["mode"] == "smoke" and set(STANDARD_PATHS) <= set(doc["paths"])
    if "bridge_preconnect" not in doc["paths"]:
        assert any("bridge_preconnect" in note for note in doc["notes"])
    assert doc["settings"]["rtt_ms"] == 40 and doc["settings"]["tls"] is True
    assert doc["machine"]["cores"] >= 1
    names = {w["name"] for w in doc["workloads"]}
    assert {"short", "long", "flood"} <= names and any(n.startswith("paced-") for n in names)
    for path in STANDARD_PATHS:
        assert set(doc["results"][path]) == names
    assert "first-40ms" in names
    idle = doc["idle_sessions"]
    assert idle["sessions"] > 0 and idle["turns"] > 1 and "kib_per_session_1" in idle
    assert doc["ratios"]["long"]["cpu_ms_per_1k_events"]
    assert {"bridge_fresh", "bridge_reused"} <= {t["path"] for t in doc["targets"]}
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
    assert "bridge_reused/passthrough" in proc.stdout
    assert "verdicts are indicative only" in proc.stdout


def test_bench_refuses_an_unknown_path(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--paths", "direct,warp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown paths: warp" in proc.stderr


def test_local_sse_upstream_stops_cleanly_with_open_connections() -> None:
    upstream = LocalSseUpstream()

    async def body() -> None:
        await upstream.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        await upstream.stop()
        assert await reader.read() == b""  # the server ended the idle connection
        writer.close()

    run_async(body)
