"""The "Responses events" contentview over real event shapes, and its registration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from responses_ws_bridge.addons.contentview import (
    PRIORITY,
    TIMES,
    VIEW_NAME,
    describe_event,
    register,
    responses_view,
    summarize_create,
    summarize_events,
    unregister,
)
from responses_ws_bridge.core.sse import encode_event, stream_incomplete_event
from responses_ws_bridge.local.response_events import (
    FunctionCall,
    TurnSpec,
    encode,
    error_event,
    rate_limit_event,
    turn_events,
)
from wsproto.frame_protocol import Opcode

from tests.support.data import load_capture

REQUEST = {"model": "gpt-5-codex", "input": "Say hello"}


def text_turn(text: str = "Hello big world") -> list[dict[str, Any]]:
    return list(
        turn_events(
            REQUEST, TurnSpec(text=text), response_id="resp_1", item_id="msg_1", created_at=1
        )
    )


def sse_body(events: list[dict[str, Any]]) -> bytes:
    return b"".join(encode_event(encode(e), e["type"]) for e in events)


def ws_metadata(event: object, from_client: bool = False) -> tuple[bytes, Metadata]:
    data = json.dumps(event).encode()
    return data, Metadata(websocket_message=WebSocketMessage(Opcode.TEXT, from_client, data))


SSE = Metadata(content_type="text/event-stream")


def test_text_turn_one_line_per_event_deltas_joined() -> None:
    assert TIMES == "\N{MULTIPLICATION SIGN}"
    assert summarize_events(text_turn()) == [
        "#0 response.created resp_1 status=in_progress model=gpt-5-codex",
        "#1 response.in_progress resp_1 status=in_progress",
        "#2 response.output_item.added message msg_1 in_progress",
        "#3 response.content_part.added output_text",
        f'#4-#6 response.output_text.delta {TIMES}3: "Hello big world"',
        '#7 response.output_text.done: "Hello big world"',
        '#8 response.content_part.done output_text: "Hello big world"',
        '#9 response.output_item.done message msg_1 completed: "Hello big world"',
        "#10 response.completed resp_1 status=completed usage in=2 out=3 total=5",
    ]


def test_function_call_turn() -> None:
    spec = TurnSpec(function_call=FunctionCall("exec_command", '{"cmd":"ls"}'))
    events = turn_events(REQUEST, spec, response_id="resp_2", item_id="fc_abc", created_at=1)
    lines = summarize_events(list(events))
    assert (
        lines[2] == "#2 response.output_item.added function_call exec_command call_abc in_progress"
    )
    assert lines[3] == '#3 response.function_call_arguments.delta: "{\\"cmd\\":\\"ls\\"}"'
    assert lines[5] == (
        "#5 response.output_item.done function_call exec_command call_abc completed "
        'arguments="{\\"cmd\\":\\"ls\\"}"'
    )


def test_deltas_join_only_within_one_part() -> None:
    def delta(n: int, text: str, content_index: int) -> dict[str, Any]:
        return {
            "type": "response.output_text.delta",
            "sequence_number": n,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": content_index,
            "delta": text,
        }

    events = [delta(1, "a", 0), delta(2, "b", 0), delta(3, "c", 1), delta(4, "d", 1)]
    events.insert(2, {"type": "response.output_text.done", "sequence_number": 9, "text": "ab"})
    assert summarize_events(events) == [
        f'#1-#2 response.output_text.delta {TIMES}2: "ab"',
        '#9 response.output_text.done: "ab"',
        f'#3-#4 response.output_text.delta [0/1] {TIMES}2: "cd"',
    ]


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            {**rate_limit_event(3), "sequence_number": 2},
            "!! #2 error 429 rate_limit_exceeded: Rate limit reached. Please try again in 3s.",
        ),
        (
            error_event(400, "previous_response_not_found", "Previous response not found."),
            "!! error 400 previous_response_not_found: Previous response not found.",
        ),
        (
            # The flat shape an SSE error event has.
            {"type": "error", "sequence_number": 5, "code": "server_error", "message": "boom"},
            "!! #5 error server_error: boom",
        ),
        (
            stream_incomplete_event(
                close_code=1011, reason="", response_id="resp_9", sequence_number=7
            ),
            "!! #7 response.failed resp_9 status=failed: stream_incomplete: upstream WebSocket "
            "closed before the response finished (close code 1011)",
        ),
        (
            {
                "type": "response.incomplete",
                "sequence_number": 3,
                "response": {
                    "id": "resp_3",
                    "status": "incomplete",
                    "incomplete_details": {"reason": "max_output_tokens"},
                },
            },
            "#3 response.incomplete resp_3 status=incomplete reason=max_output_tokens",
        ),
        (
            {
                "type": "response.completed",
                "sequence_number": 1,
                "response": {
                    "id": "resp_4",
                    "status": "completed",
                    "usage": {
                        "input_tokens": 100,
                        "input_tokens_details": {"cached_tokens": 64},
                        "output_tokens": 20,
                        "output_tokens_details": {"reasoning_tokens": 12},
                        "total_tokens": 120,
                    },
                },
            },
            "#1 response.completed resp_4 status=completed "
            "usage in=100 (cached 64) out=20 (reasoning 12) total=120",
        ),
        ({"type": "response.something_new", "sequence_number": 4}, "#4 response.something_new"),
    ],
)
def test_describe_event(event: dict[str, Any], line: str) -> None:
    assert describe_event(event) == line


def capture_creates() -> Iterator[dict[str, Any]]:
    capture = load_capture("websocket.json")
    yield from capture["messages"]


def test_response_create_from_the_codex_capture() -> None:
    first, second = capture_creates()
    tools = len(first["tools"])
    key = first["prompt_cache_key"]
    assert summarize_create(first) == (
        f"response.create model=gpt-5-codex input=1 item prompt_cache_key={key} tools={tools} "
        "generate=false (prewarm)"
    )
    assert summarize_create(second).startswith(
        "response.create model=gpt-5-codex input=3 items "
        "previous_response_id=resp_237874d690254335ba9003f0e86719ed"
    )
    prewarm = {"type": "response.create", "model": "m", "input": [], "generate": False}
    assert (
        summarize_create(prewarm)
        == "response.create model=m input=0 items generate=false (prewarm)"
    )
    keyed = {"type": "response.create", "model": "m", "input": "hi", "prompt_cache_key": "k"}
    assert summarize_create(keyed) == 'response.create model=m input="hi" prompt_cache_key=k'


def test_prettify_sse_body() -> None:
    events = [*text_turn("Hi there"), {"type": "error", "code": "x", "message": "late"}]
    text = responses_view.prettify(sse_body(events[:-1]) + b"data: [DONE]\n\n", SSE)
    lines = text.splitlines()
    assert lines[4] == f'#4-#5 response.output_text.delta {TIMES}2: "Hi there"'
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 10


def test_prettify_one_websocket_message() -> None:
    data, metadata = ws_metadata(rate_limit_event(1))
    assert responses_view.prettify(data, metadata) == (
        "!! error 429 rate_limit_exceeded: Rate limit reached. Please try again in 1s.\n"
    )
    create, metadata = ws_metadata(next(capture_creates()), from_client=True)
    assert responses_view.prettify(create, metadata).startswith("response.create model=gpt-5-codex")


def test_prettify_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError):
        responses_view.prettify(b"not json", Metadata(websocket_message=None))
    with pytest.raises(ValueError):
        responses_view.prettify(b"event: x\n", SSE)


def test_render_priority() -> None:
    assert responses_view.render_priority(sse_body(text_turn()), SSE) == PRIORITY
    assert responses_view.render_priority(b'data: {"foo": 1}\n\n', SSE) == 0
    # A body bigger than the sniffed head still counts from its first events.
    big = sse_body(text_turn("word " * 40_000))
    assert responses_view.render_priority(big, SSE) == PRIORITY
    for event in (rate_limit_event(), next(capture_creates()), text_turn()[4]):
        assert responses_view.render_priority(*ws_metadata(event)) == PRIORITY
    assert responses_view.render_priority(*ws_metadata({"type": "ping"})) == 0
    assert responses_view.render_priority(*ws_metadata([1, 2])) == 0
    json_body = Metadata(content_type="application/json")
    assert responses_view.render_priority(json.dumps(text_turn()[0]).encode(), json_body) == 0
    assert responses_view.render_priority(b"", SSE) == 0


@pytest.fixture
def registered() -> Iterator[None]:
    register()
    try:
        yield
    finally:
        unregister()


def test_mitmproxy_picks_the_view_for_responses_traffic(registered: None) -> None:
    ws_flow = tflow.twebsocketflow()
    assert ws_flow.websocket is not None
    message = WebSocketMessage(Opcode.TEXT, False, encode(text_turn()[0]).encode())
    ws_flow.websocket.messages.append(message)
    sse_flow = tflow.tflow(resp=True)
    assert sse_flow.response is not None
    sse_flow.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    sse_flow.response.content = sse_body(text_turn())
    with taddons.context():
        ws_result = contentviews.prettify_message(message, ws_flow)
        sse_result = contentviews.prettify_message(sse_flow.response, sse_flow)
        other = tflow.tflow(resp=True)
        assert isinstance(other.response, http.Response)
        plain = contentviews.prettify_message(other.response, other)
    assert ws_result.view_name == VIEW_NAME
    assert ws_result.text.startswith("#0 response.created resp_1")
    assert sse_result.view_name == VIEW_NAME
    assert f"{TIMES}3" in sse_result.text
    assert plain.view_name != VIEW_NAME


def test_unregister_removes_only_our_view() -> None:
    register()
    assert VIEW_NAME.lower() in contentviews.registry
    unregister()
    assert VIEW_NAME.lower() not in contentviews.registry
    unregister()  # idempotent
    assert "json" in contentviews.registry
