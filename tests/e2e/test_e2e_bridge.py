"""End to end: a real mitmdump running addon/bridge.py, a real WebSocket upstream, real clients."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from harness.proxy_process import ProxyProcess
from mitmproxy import http as mitm_http
from mitmproxy import io as mitm_io
from responses_ws_bridge.core.handshake_headers import WEBSOCKET_BETA
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.response_events import TurnSpec, encode
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import capture_request, client, header_values

WS_LIBRARY_FIELDS = ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version"]


@pytest.fixture(scope="module")
def reverse(upstream: ThreadedUpstream) -> Iterator[ProxyProcess]:
    """The bridge as a reverse proxy in front of the upstream."""
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        "bridge_max_body=65536",
        "--set",
        "bridge_sse_keepalive=0.05",
    ) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def regular(upstream: ThreadedUpstream) -> Iterator[ProxyProcess]:
    """The bridge as an explicit HTTP proxy (regular mode)."""
    with ProxyProcess() as proxy:
        yield proxy


def sdk(proxy: ProxyProcess, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key="sk-test-client-key",
        max_retries=0,
        timeout=20,
        http_client=openai.DefaultHttpxClient(trust_env=False),
        **kwargs,  # type: ignore[arg-type]
    )


def expected_sse(frames: list[str]) -> bytes:
    out = b""
    for frame in frames:
        out += f"event: {json.loads(frame)['type']}\ndata: {frame}\n\n".encode()
    return out


# -- streaming and not ------------------------------------------------------


def test_sdk_stream(reverse: ProxyProcess, upstream: ThreadedUpstream) -> None:
    upstream.script(Plan(turn=TurnSpec(text="Hello through the bridge")))
    events = list(sdk(reverse).responses.create(model="gpt-5-codex", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello through the bridge"
    (record,) = upstream.records()
    assert record.messages[0].data["type"] == "response.create"
    assert "stream" not in record.messages[0].data


def test_sdk_not_streaming(reverse: ProxyProcess, upstream: ThreadedUpstream) -> None:
    upstream.script(Plan(turn=TurnSpec(text="One JSON body")))
    response = sdk(reverse).responses.create(model="gpt-5-codex", input="hi")
    assert response.output_text == "One JSON body"
    assert response.status == "completed"


def test_codex_capture_exact_handshake_and_sse_bytes(
    regular: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, body = capture_request("http-sse.json")
    headers = [(k, "Bearer sk-test-codex" if k == "authorization" else v) for k, v in headers]
    url = f"http://127.0.0.1:{upstream.port}/v1/responses"
    with client(proxy=regular.url) as http:
        response = http.post(url, headers=headers, content=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    (record,) = upstream.records()
    assert response.content == expected_sse([encode(sent.event) for sent in record.events])

    request_id = response.headers["x-request-id"]
    kept = [
        (k, v)
        for k, v in headers
        if k.lower() not in {"accept", "content-type", "authorization", "host", "content-length"}
    ]
    names = [k for k, _ in record.headers]
    assert names[:5] == WS_LIBRARY_FIELDS
    assert record.headers[5:] == [
        *kept,
        ("Authorization", "Bearer sk-test-codex"),
        ("OpenAI-Beta", WEBSOCKET_BETA),
        ("x-request-id", request_id),
    ]
    message = record.messages[0].data
    sent = json.loads(body)
    assert message == {
        "type": "response.create",
        **{k: v for k, v in sent.items() if k != "stream"},
    }


def test_backend_api_codex_path(regular: ProxyProcess, upstream: ThreadedUpstream) -> None:
    headers, body = capture_request("backend-api-codex-http-sse.json")
    url = f"http://127.0.0.1:{upstream.port}/backend-api/codex/responses"
    with client(proxy=regular.url) as http:
        response = http.post(url, headers=headers, content=body)
    assert response.status_code == 200
    (record,) = upstream.records()
    assert record.path == "/backend-api/codex/responses"
    assert header_values(record.headers, "openai-beta") == [WEBSOCKET_BETA]


def test_seed_bug_headers_never_reach_the_upstream(
    regular: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers = [
        ("Accept", "text/event-stream"),
        ("Accept-Encoding", "gzip, br"),
        ("Authorization", "Bearer sk-test-seed"),
        ("Connection", "keep-alive, X-Whatever"),
        ("X-Whatever", "hop"),
        ("Content-Type", "application/json"),
        ("Cookie", "a=b"),
        ("OpenAI-Beta", "responses=experimental"),
        ("session_id", "s-1"),
    ]
    url = f"http://127.0.0.1:{upstream.port}/v1/responses"
    body = json.dumps({"model": "m", "input": "x", "stream": True}).encode()
    with client(proxy=regular.url) as http:
        assert http.post(url, headers=headers, content=body).status_code == 200
    (record,) = upstream.records()
    lower = [k.lower() for k, _ in record.headers]
    for banned in ("accept", "accept-encoding", "content-type", "cookie", "x-whatever"):
        assert banned not in lower
    assert lower.count("connection") == 1 and lower.count("host") == 1
    assert header_values(record.headers, "connection") == ["Upgrade"]
    assert header_values(record.headers, "openai-beta") == [WEBSOCKET_BETA]
    assert header_values(record.headers, "session_id") == ["s-1"]


def test_turn_state_and_request_id_come_back(
    reverse: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(turn_state="ts-42"))
    body = {"model": "m", "input": "x", "stream": True}
    with client() as http:
        response = http.post(
            f"{reverse.url}/v1/responses", json=body, headers={"x-request-id": "req-client-1"}
        )
    assert response.headers["x-codex-turn-state"] == "ts-42"
    assert response.headers["x-request-id"] == "req-client-1"
    (record,) = upstream.records()
    assert header_values(record.headers, "x-request-id") == ["req-client-1"]


def test_keepalive_comment_during_upstream_silence(
    reverse: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    # 0.5 s between events, keepalive every 0.05 s: silence is unmistakable.
    upstream.script(Plan(turn=TurnSpec(text="a b", deltas=2), pace_s=0.5))
    with client() as http:
        response = http.post(
            f"{reverse.url}/v1/responses", json={"model": "m", "input": "x", "stream": True}
        )
    assert b"\n: keepalive\n\n" in response.content or response.content.count(b": keepalive") > 0
    assert [t for t, _ in parse_sse(response.content)][-1] == "response.completed"


# -- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_request_body"),
        (b'{"model": "m", "input": "x", "background": true}', 400, "unsupported_parameter"),
        (b'{"model": "m", "input": "' + b"x" * 70000 + b'"}', 413, "request_too_large"),
    ],
)
def test_bad_requests_never_reach_the_upstream(
    reverse: ProxyProcess, upstream: ThreadedUpstream, body: bytes, status: int, code: str
) -> None:
    with client() as http:
        response = http.post(
            f"{reverse.url}/v1/responses",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert upstream.records() == []


@pytest.mark.parametrize(
    ("plan", "status", "code"),
    [
        (
            Plan(
                reject_status=401,
                reject_body={
                    "error": {
                        "message": "bad key",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            ),
            401,
            "invalid_api_key",
        ),
        (Plan(reject_status=403), 403, None),
        (Plan(reject_status=503), 502, "upstream_handshake_rejected"),
        (Plan(close_code=1011, close_after_events=0), 502, "upstream_closed"),
        (Plan(drop_after_events=0), 502, "upstream_closed"),
    ],
)
def test_failures_before_any_event_are_http_errors(
    reverse: ProxyProcess, upstream: ThreadedUpstream, plan: Plan, status: int, code: str | None
) -> None:
    # A dropped connection is retried (budget 2), so it must fail three times.
    upstream.script(*([plan] * (3 if plan.drop_after_events is not None else 1)))
    with client() as http:
        response = http.post(
            f"{reverse.url}/v1/responses", json={"model": "m", "input": "x", "stream": True}
        )
    assert response.status_code == status
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code
    assert "sk-test" not in response.text


def test_rate_limited_handshake_keeps_retry_after(
    reverse: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(reject_status=429, reject_headers={"Retry-After": "7"}))
    with client() as http:
        response = http.post(f"{reverse.url}/v1/responses", json={"model": "m", "input": "x"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"


def test_error_event_before_any_event_is_an_http_error(
    reverse: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    error = {
        "type": "error",
        "status": 429,
        "error": {"type": "rate_limit_error", "code": "rate_limit_exceeded", "message": "slow"},
        "headers": {"retry-after": "3"},
    }
    upstream.script(Plan(error=error))
    with pytest.raises(openai.RateLimitError) as raised:
        list(sdk(reverse).responses.create(model="m", input="x", stream=True))
    assert raised.value.status_code == 429
    assert raised.value.response.headers["retry-after"] == "3"


def test_close_after_events_is_stream_incomplete(
    reverse: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(close_code=1011, close_after_events=3))
    with client() as http:
        response = http.post(
            f"{reverse.url}/v1/responses", json={"model": "m", "input": "x", "stream": True}
        )
    events = parse_sse(response.content)
    assert [t for t, _ in events][:3] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    last_type, last_data = events[-1]
    assert last_type == "response.failed"
    failed = json.loads(last_data)
    assert failed["response"]["error"]["code"] == "stream_incomplete"
    assert "1011" in failed["response"]["error"]["message"]
    assert failed["sequence_number"] == 3
    assert len(upstream.records()) == 1


def test_unreachable_upstream_is_502(upstream: ThreadedUpstream) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # bound, not listening: connections are refused
        with (
            # lazy: mitmproxy itself must not try the dead target first.
            ProxyProcess(
                "--mode", f"reverse:http://127.0.0.1:{dead}", "--set", "connection_strategy=lazy"
            ) as proxy,
            client() as http,
        ):
            response = http.post(f"{proxy.url}/v1/responses", json={"model": "m", "input": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_upstream_that_never_answers_times_out(upstream: ThreadedUpstream) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts TCP, never answers the handshake
        port = silent.getsockname()[1]
        with (
            ProxyProcess(
                "--mode",
                f"reverse:http://127.0.0.1:{port}",
                "--set",
                "bridge_connect_timeout=0.5",
                "--set",
                "connection_strategy=lazy",
            ) as proxy,
            client() as http,
        ):
            response = http.post(f"{proxy.url}/v1/responses", json={"model": "m", "input": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_timeout"


# -- the client leaves ------------------------------------------------------------


def test_client_hangup_closes_the_upstream(
    reverse: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(turn=TurnSpec(deltas=400), pace_s=0.05))
    got_first = threading.Event()
    with (
        client() as http,
        http.stream(
            "POST", f"{reverse.url}/v1/responses", json={"model": "m", "input": "x", "stream": True}
        ) as response,
    ):
        for chunk in response.iter_bytes():
            if b"response.created" in chunk:
                got_first.set()
                break
    assert got_first.is_set()
    assert upstream.wait_for(
        lambda records: len(records) == 1 and records[0].closed_by == "client", timeout=10
    )
    (record,) = upstream.records()
    assert record.close_code == 1001
    # The proxy is still fine for everyone else.
    upstream.script(Plan())
    events = list(sdk(reverse).responses.create(model="m", input="again", stream=True))
    assert events[-1].type == "response.completed"
    assert "Traceback" not in reverse.log()


# -- not bridged --------------------------------------------------------------


def test_other_requests_pass_through(reverse: ProxyProcess, upstream: ThreadedUpstream) -> None:
    with client() as http:
        response = http.get(f"{reverse.url}/v1/models")
    assert response.status_code == 200
    assert response.json()["object"] == "list"


# -- what mitmweb shows ---------------------------------------------------------


@pytest.mark.parametrize("store", [True, False])
def test_saved_client_flow_shows_original_url_and_sse_body_as_mitmproxy_stores_streams(
    upstream: ThreadedUpstream, tmp_path: Path, store: bool
) -> None:
    flows_file = tmp_path / "client.mitm"
    target = f"http://127.0.0.1:{upstream.port}"
    stored = ("--set", f"store_streamed_bodies={str(store).lower()}")
    with ProxyProcess("--mode", f"reverse:{target}", "-w", str(flows_file), *stored) as proxy:
        with client() as http:
            response = http.post(
                f"{proxy.url}/v1/responses",
                json={"model": "m", "input": "saved", "stream": True},
                headers={"x-request-id": "req-saved"},
            )
        assert response.status_code == 200
        proxy.stop()  # flushes the -w file
    with flows_file.open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, mitm_http.HTTPFlow)]
    (flow,) = [fl for fl in flows if fl.request.method == "POST"]
    assert flow.request.url == f"{target}/v1/responses"
    assert not any(k.lower() == "x-responses-bridge-token" for k in flow.request.headers)
    assert flow.response is not None and b"response.completed" in response.content
    # The body the client got, kept as mitmproxy keeps any streamed body; the session
    # flow beside it has every event either way.
    assert flow.response.content == (response.content if store else b"")
    assert flow.metadata["responses_bridge"]["role"] == "client"
