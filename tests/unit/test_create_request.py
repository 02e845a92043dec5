"""HTTP request body → the first WebSocket message, and the bodies the bridge refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core.create_request import (
    DECISION_FIELDS,
    BadRequest,
    CreateRequest,
    parse_create_request,
)

from tests.support.data import load_capture

MAX = 1_000_000


def capture_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = load_capture(name)["body"]
    return body


def parse(body: Any, *, max_body: int = MAX) -> CreateRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_create_request(raw, max_body=max_body)


def message(body: Any) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(parse(body).message)
    return decoded


@pytest.mark.parametrize("name", ["http-sse.json", "backend-api-codex-http-sse.json"])
def test_codex_cli_capture_becomes_response_create(name: str) -> None:
    body = capture_body(name)
    request = parse(body)
    assert request.stream is True
    # Of the parsed body a turn keeps what the bridge decides on; `message` is the rest.
    assert request.body == {k: body[k] for k in DECISION_FIELDS if k in body}
    assert "input" in body and "input" not in request.body
    sent = json.loads(request.message)
    assert list(sent) == ["type", *(k for k in body if k != "stream")]
    assert sent == {"type": "response.create", **{k: v for k, v in body.items() if k != "stream"}}
    assert request.model == "gpt-5-codex"
    assert request.prompt_cache_key == body["prompt_cache_key"]
    assert request.previous_response_id is None
    assert request.conversation is None


def test_message_matches_what_codex_sends_over_websocket_but_stream() -> None:
    """The same turn over HTTP and over Codex's own WebSocket carries the same fields."""
    http_body = capture_body("http-sse.json")
    ws_first = load_capture("websocket.json")["messages"][0]
    sent = message(http_body)
    # Codex also sends "stream" over the WebSocket; the bridge leaves it out.
    # "generate": false marks Codex's prewarm turn, which has no HTTP counterpart.
    assert set(sent) == set(ws_first) - {"stream", "generate"}


def test_message_is_compact_utf8_json_with_type_first() -> None:
    body = {"model": "m", "input": "héllo ☃", "stream": False, "store": False}
    raw = parse(body).message
    assert raw == '{"type":"response.create","model":"m","input":"héllo ☃","store":false}'.encode()


@pytest.mark.parametrize(
    ("body", "stream"),
    [
        ({"model": "m"}, False),
        ({"model": "m", "stream": None}, False),
        ({"model": "m", "stream": False}, False),
        ({"model": "m", "stream": True}, True),
    ],
)
def test_stream_flag(body: dict[str, Any], stream: bool) -> None:
    assert parse(body).stream is stream
    assert "stream" not in message(body)


@pytest.mark.parametrize("background", [False, None])
def test_background_false_or_null_is_dropped(background: bool | None) -> None:
    assert message({"model": "m", "background": background}) == {
        "type": "response.create",
        "model": "m",
    }


def test_body_type_field_is_overwritten_and_keeps_no_second_type() -> None:
    raw = parse({"model": "m", "type": "something.else"}).message
    assert raw == b'{"type":"response.create","model":"m"}'


def test_lone_surrogate_escape_survives_as_an_escape() -> None:
    raw = parse(b'{"input":"a\\ud800b"}').message
    raw.decode("utf-8")  # the frame must be valid UTF-8 text
    assert json.loads(raw)["input"] == "a\ud800b"


def test_body_at_the_limit_is_accepted() -> None:
    raw = json.dumps({"model": "m"}).encode()
    assert parse_create_request(raw, max_body=len(raw)).model == "m"


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "fragment"),
    [
        (b'{"model":"m"}', 413, "request_too_large", None, "at most 5 bytes"),
        (b"", 400, "invalid_json", None, "empty"),
        (b"  \r\n ", 400, "invalid_json", None, "empty"),
        (b'{"model":"\xff"}', 400, "invalid_json", None, "not valid UTF-8 (at byte 10)"),
        (b'{"model": "m",}', 400, "invalid_json", None, "line 1, column 15"),
        (b'{"model":\n', 400, "invalid_json", None, "line 2, column 1"),
        (b'{"a":1} x', 400, "invalid_json", None, "Extra data"),
        (b'{"temperature":NaN}', 400, "invalid_json", None, "NaN is not valid JSON"),
        (b'{"a":-Infinity}', 400, "invalid_json", None, "-Infinity is not valid JSON"),
        (b'{"a":' + b"9" * 5000 + b"}", 400, "invalid_json", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None, "not valid JSON"),
        (b"[]", 400, "invalid_request_body", None, "not an array"),
        (b'"text"', 400, "invalid_request_body", None, "not a string"),
        (b"null", 400, "invalid_request_body", None, "not null"),
        (b"3", 400, "invalid_request_body", None, "not a number"),
        (b'{"background":true}', 400, "unsupported_parameter", "background", "WebSocket"),
        (b'{"background":"yes"}', 400, "invalid_type", "background", "boolean"),
        (b'{"stream":"true"}', 400, "invalid_type", "stream", "not a string"),
        (b'{"stream":1}', 400, "invalid_type", "stream", "not a number"),
        (b'{"stream":{}}', 400, "invalid_type", "stream", "not an object"),
    ],
)
def test_refused_bodies(
    body: bytes, status: int, code: str, param: str | None, fragment: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_create_request(body, max_body=5 if status == 413 else 10_000_000)
    err = caught.value
    assert (err.status, err.code, err.param) == (status, code, param)
    assert fragment in err.message
    assert str(err) == err.message


@pytest.mark.parametrize(
    ("body", "previous", "conversation", "cache_key", "model"),
    [
        ({}, None, None, None, None),
        ({"previous_response_id": "resp_1"}, "resp_1", None, None, None),
        ({"previous_response_id": ""}, None, None, None, None),
        ({"previous_response_id": None}, None, None, None, None),
        ({"conversation": "conv_1"}, None, "conv_1", None, None),
        ({"conversation": {"id": "conv_2"}}, None, "conv_2", None, None),
        ({"conversation": {"name": "x"}}, None, None, None, None),
        ({"conversation": 7}, None, None, None, None),
        ({"prompt_cache_key": "k"}, None, None, "k", None),
        ({"prompt_cache_key": 5}, None, None, None, None),
        ({"model": "gpt-5"}, None, None, None, "gpt-5"),
    ],
)
def test_affinity_properties(
    body: dict[str, Any],
    previous: str | None,
    conversation: str | None,
    cache_key: str | None,
    model: str | None,
) -> None:
    request = parse(body)
    assert request.previous_response_id == previous
    assert request.conversation == conversation
    assert request.prompt_cache_key == cache_key
    assert request.model == model


def test_later_turn_keeps_previous_response_id_in_the_message() -> None:
    body = {"model": "m", "previous_response_id": "resp_1", "input": [], "stream": True}
    assert message(body) == {
        "type": "response.create",
        "model": "m",
        "previous_response_id": "resp_1",
        "input": [],
    }


@pytest.mark.parametrize(("size", "refused"), [(1000, False), (5000, True)])
def test_a_message_over_the_upstream_frame_budget_is_a_400_before_any_upstream(
    size: int, refused: bool
) -> None:
    body = json.dumps({"model": "m", "input": "x" * size}).encode()
    if not refused:
        assert len(parse_create_request(body, max_body=1 << 20, max_frame=4096).message) < 4096
        return
    with pytest.raises(BadRequest) as caught:
        parse_create_request(body, max_body=1 << 20, max_frame=4096)
    # A 400, never a 413: Codex CLI retries a 413 five times, then drops WebSocket.
    assert (caught.value.status, caught.value.code, caught.value.param) == (
        400,
        "payload_too_large",
        "input",
    )


def test_no_frame_budget_means_no_limit() -> None:
    body = json.dumps({"model": "m", "input": "x" * 10_000}).encode()
    assert parse_create_request(body, max_body=1 << 20, max_frame=0).stream is False
    assert parse_create_request(body, max_body=1 << 20).stream is False
