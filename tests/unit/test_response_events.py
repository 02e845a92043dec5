"""The event sequences of one Responses turn, checked against the openai SDK types and captures."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import TypeAdapter
from responses_ws_bridge.local.response_events import (
    DEFAULT_MODEL,
    DEFAULT_TEXT,
    FunctionCall,
    TurnSpec,
    encode,
    error_event,
    function_call_for,
    http_error_body,
    rate_limit_event,
    split_text,
    turn_events,
)

from tests.support.data import CAPTURE_NAMES, load_capture

SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)

TEXT_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
CALL_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
]
TOOLS = [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}}]


def events(request: dict[str, Any], spec: TurnSpec | None = None) -> list[dict[str, Any]]:
    return list(
        turn_events(
            request,
            spec or TurnSpec(),
            response_id="resp_0123456789abcdef0123456789abcdef",
            item_id="msg_fedcba9876543210fedcba9876543210",
            created_at=1_700_000_000,
        )
    )


def loadable(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Capture tools with their elided JSON schemas replaced by a real one."""
    fixed = []
    for tool in tools:
        tool = dict(tool)
        if isinstance(tool.get("parameters"), str):
            tool["parameters"] = {"type": "object", "properties": {}}
        if "tools" in tool:
            tool["tools"] = loadable(tool["tools"])
        fixed.append(tool)
    return fixed


def test_text_turn_types_sequence_numbers_and_sdk_parsing() -> None:
    turn = events({"model": "gpt-5-codex", "input": "hi"})
    assert [e["type"] for e in turn] == TEXT_TYPES
    assert [e["sequence_number"] for e in turn] == list(range(len(turn)))
    for event in turn:
        SERVER_EVENT.validate_python(event)
    response = Response.model_validate(turn[-1]["response"])
    assert response.output_text == DEFAULT_TEXT
    assert response.status == "completed"
    assert response.id == "resp_0123456789abcdef0123456789abcdef"
    deltas = "".join(e["delta"] for e in turn if e["type"] == "response.output_text.delta")
    assert deltas == DEFAULT_TEXT


def test_lifecycle_fields() -> None:
    turn = events({"model": "gpt-5-codex", "input": "hi"})
    created, completed = turn[0]["response"], turn[-1]["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    assert created["object"] == completed["object"] == "response"
    assert completed["created_at"] == 1_700_000_000
    added, done = turn[2]["item"], turn[-2]["item"]
    assert (added["status"], added["content"], added["role"]) == ("in_progress", [], "assistant")
    assert done["status"] == "completed"
    assert completed["output"] == [done]
    assert {e["item_id"] for e in turn[3:-2]} == {"msg_fedcba9876543210fedcba9876543210"}
    usage = completed["usage"]
    assert usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize(
    ("request_fields", "spec", "model"),
    [
        ({"model": "gpt-5.1-codex"}, TurnSpec(), "gpt-5.1-codex"),
        ({}, TurnSpec(), DEFAULT_MODEL),
        ({"model": "gpt-5.1-codex"}, TurnSpec(model="o3"), "o3"),
    ],
)
def test_model(request_fields: dict[str, Any], spec: TurnSpec, model: str) -> None:
    turn = events(request_fields, spec)
    assert turn[0]["response"]["model"] == turn[-1]["response"]["model"] == model


def test_request_fields_are_echoed() -> None:
    request = {
        "model": "gpt-5-codex",
        "previous_response_id": "resp_prev",
        "store": False,
        "prompt_cache_key": "key-1",
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"summary": "auto"},
        "instructions": "be brief",
    }
    response = events(request)[-1]["response"]
    for name, value in request.items():
        if name != "model":
            assert response[name] == value, name
    parsed = Response.model_validate(response)
    assert parsed.previous_response_id == "resp_prev"


def test_defaults_when_the_request_leaves_fields_out() -> None:
    response = events({"model": "m"})[-1]["response"]
    assert response["previous_response_id"] is None
    assert response["store"] is True
    assert response["tools"] == []
    assert response["tool_choice"] == "auto"


@pytest.mark.parametrize(
    ("text", "deltas", "pieces"),
    [
        ("Hello from here.", None, ["Hello ", "from ", "here."]),
        ("  lead", None, ["  ", "lead"]),
        ("", None, []),
        ("a b c d e", 2, ["a b c ", "d e"]),
        ("a b c", 3, ["a ", "b ", "c"]),
        ("a b", 5, ["a ", "b ", "a ", "b ", "a "]),
        ("", 2, ["lorem ", "lorem "]),
        ("a b", 0, []),
        ("one", 1, ["one"]),
    ],
)
def test_split_text(text: str, deltas: int | None, pieces: list[str]) -> None:
    assert split_text(text, deltas) == pieces


@pytest.mark.parametrize("deltas", [0, 1, 3, 250])
def test_exact_delta_count(deltas: int) -> None:
    turn = events({"model": "m"}, TurnSpec(deltas=deltas))
    pieces = [e["delta"] for e in turn if e["type"] == "response.output_text.delta"]
    assert len(pieces) == deltas
    assert Response.model_validate(turn[-1]["response"]).output_text == "".join(pieces)
    assert [e["sequence_number"] for e in turn] == list(range(len(turn)))


def test_negative_delta_count_is_refused() -> None:
    with pytest.raises(ValueError):
        TurnSpec(deltas=-1)


def test_prewarm_is_answered_with_an_empty_completed_response() -> None:
    turn = events({"model": "m", "generate": False})
    assert [e["type"] for e in turn] == ["response.created", "response.completed"]
    assert Response.model_validate(turn[-1]["response"]).output == []
    full = events({"model": "m", "generate": False}, TurnSpec(ignore_generate=True))
    assert [e["type"] for e in full] == TEXT_TYPES


@pytest.mark.parametrize(
    ("request_fields", "spec", "expected"),
    [
        ({"tools": TOOLS, "tool_choice": "required"}, TurnSpec(), "exec_command"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "name": "exec_command"}},
            TurnSpec(),
            "exec_command",
        ),
        ({"tools": TOOLS}, TurnSpec(function_call=FunctionCall("shell")), "shell"),
        ({"tools": TOOLS, "tool_choice": "auto"}, TurnSpec(), None),
        ({"tool_choice": "required"}, TurnSpec(), None),
        ({"tools": TOOLS, "tool_choice": "none"}, TurnSpec(), None),
    ],
)
def test_function_call_for(
    request_fields: dict[str, Any], spec: TurnSpec, expected: str | None
) -> None:
    call = function_call_for(request_fields, spec)
    assert (call.name if call else None) == expected


def test_function_call_turn() -> None:
    spec = TurnSpec(function_call=FunctionCall("exec_command", '{"cmd":"ls"}'))
    turn = list(
        turn_events(
            {"model": "m", "tools": TOOLS},
            spec,
            response_id="resp_1",
            item_id="fc_0123456789abcdef0123456789abcdef",
            created_at=1,
        )
    )
    assert [e["type"] for e in turn] == CALL_TYPES
    for event in turn:
        SERVER_EVENT.validate_python(event)
    (call,) = Response.model_validate(turn[-1]["response"]).output
    assert call.type == "function_call"
    assert (call.name, call.arguments, call.id) == (
        "exec_command",
        '{"cmd":"ls"}',
        "fc_0123456789abcdef0123456789abcdef",
    )
    assert call.call_id == "call_0123456789abcdef01234567"


def capture_cases() -> list[tuple[str, int, TurnSpec]]:
    """(capture, message index, spec) for every WebSocket message Codex sent."""
    cases = []
    for name in CAPTURE_NAMES:
        capture = load_capture(name)
        if capture["transport"] != "websocket":
            continue
        for index, answered in enumerate(capture["server_answer_event_types"]):
            # The capture server answered its TOOLTEST prompt with a call.
            call = "response.function_call_arguments.delta" in answered
            spec = TurnSpec(
                deltas=3,
                function_call=FunctionCall("exec_command") if call else None,
                # One capture server answered Codex's prewarm with text.
                ignore_generate="prewarm-answered-with-text" in name,
            )
            cases.append((name, index, spec))
    assert cases, "no WebSocket capture in tests/data"
    return cases


@pytest.mark.parametrize(("capture", "index", "spec"), capture_cases())
def test_same_event_types_as_the_real_server_gave_codex(
    capture: str, index: int, spec: TurnSpec
) -> None:
    recorded = load_capture(capture)
    request = dict(recorded["messages"][index])
    request["tools"] = loadable(request["tools"])
    turn = events(request, spec)
    assert [e["type"] for e in turn] == recorded["server_answer_event_types"][index]
    for event in turn:
        SERVER_EVENT.validate_python(event)
    Response.model_validate(turn[-1]["response"])


def test_deterministic() -> None:
    request = {"model": "m", "input": [{"role": "user", "content": "hi"}]}
    assert events(request) == events(request)


def test_error_event_shape() -> None:
    event = error_event(
        429,
        "rate_limit_exceeded",
        "slow down",
        type_="requests",
        headers={"retry-after": "7"},
    )
    assert event == {
        "type": "error",
        "status": 429,
        "error": {
            "type": "requests",
            "code": "rate_limit_exceeded",
            "message": "slow down",
            "param": None,
        },
        "headers": {"retry-after": "7"},
    }
    assert "headers" not in error_event(400, "x", "y")
    parsed = SERVER_EVENT.validate_python(rate_limit_event(3))
    assert (parsed.type, parsed.status, parsed.error.code) == ("error", 429, "rate_limit_exceeded")


@pytest.mark.parametrize(
    ("status", "type_", "code"),
    [
        (401, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", "forbidden"),
        (404, "invalid_request_error", "not_found"),
        (426, "invalid_request_error", "upgrade_required"),
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", "server_error"),
        (503, "server_error", "server_error"),
        (418, "invalid_request_error", "error"),
    ],
)
def test_http_error_body(status: int, type_: str, code: str) -> None:
    error = http_error_body(status)["error"]
    assert (error["type"], error["code"]) == (type_, code)
    assert error["message"]
    assert http_error_body(status, "why", code="mine")["error"]["message"] == "why"
    assert http_error_body(status, "why", code="mine")["error"]["code"] == "mine"


def test_encode_is_compact_json() -> None:
    event = {"type": "response.output_text.delta", "delta": 'héllo "x"', "n": [1, 2]}
    wire = encode(event)
    assert wire == '{"type":"response.output_text.delta","delta":"héllo \\"x\\"","n":[1,2]}'
    assert json.loads(wire) == event
