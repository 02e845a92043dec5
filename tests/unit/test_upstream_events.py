"""What the bridge reads from each upstream frame: the fast path, the JSON path, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core.failures import RATE_LIMIT_CODES, UpstreamErrorEvent
from responses_ws_bridge.core.upstream_events import (
    TERMINAL_TYPES,
    EventInfo,
    final_response,
    inspect_event,
    load_event,
    output_item,
    parse_error_event,
    with_output,
)
from responses_ws_bridge.local import response_events
from responses_ws_bridge.local.response_events import error_event

DELTA = '{"type":"response.output_text.delta","item_id":"msg_1","delta":"Hi","sequence_number":4}'


def info_from_dict(event: Any) -> EventInfo:
    """The reference answer, from the parsed event."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return EventInfo(None, None, None, False)
    seq = event.get("sequence_number")
    response = event.get("response")
    rid = response.get("id") if isinstance(response, dict) else None
    return EventInfo(
        event["type"],
        seq if type(seq) is int else None,
        rid if isinstance(rid, str) and rid else None,
        event["type"] in TERMINAL_TYPES,
    )


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (DELTA, EventInfo("response.output_text.delta", 4, None, False)),
        (
            '{"type": "response.output_text.delta", "delta": "Hi", "sequence_number": 5}',
            EventInfo("response.output_text.delta", 5, None, False),
        ),
        (
            '{"sequence_number":6,"type":"response.output_text.delta","delta":"x"}',
            EventInfo("response.output_text.delta", 6, None, False),
        ),
        (
            '{"type":"response.output_text.delta","sequence_number" : 7 ,"delta":"x"}',
            EventInfo("response.output_text.delta", 7, None, False),
        ),
        (
            '{"type":"response.output_item.added","item":{"sequence_number":1},"sequence_number":8}',
            EventInfo("response.output_item.added", 8, None, False),
        ),
        (
            '{"type":"x.delta","delta":"sequence_number","sequence_number":9}',
            EventInfo("x.delta", 9, None, False),
        ),
        (
            '{"type":"x.delta","delta":"\\"sequence_number\\":1","sequence_number":10}',
            EventInfo("x.delta", 10, None, False),
        ),
        ('{"type":"x.delta","delta":"no number"}', EventInfo("x.delta", None, None, False)),
        ('{"type":"x.delta","a":["sequence_number",5,6]}', EventInfo("x.delta", None, None, False)),
        ('{"type":"x.delta","sequence_number":null}', EventInfo("x.delta", None, None, False)),
        ('{"type":"x.delta","sequence_number":1.5}', EventInfo("x.delta", None, None, False)),
        ('{"type":"x.delta","sequence_number":1e3}', EventInfo("x.delta", None, None, False)),
        ('{"type":"x.delta","sequence_number":-1}', EventInfo("x.delta", -1, None, False)),
        ('{"type":"x.delta","sequence_number":true}', EventInfo("x.delta", None, None, False)),
        ('{"type":"x.d\\u0065lta","sequence_number":2}', EventInfo("x.delta", 2, None, False)),
        (
            '{"type":"response.created","sequence_number":0,"response":{"id":"resp_1"}}',
            EventInfo("response.created", 0, "resp_1", False),
        ),
        (
            '{"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_1"}}',
            EventInfo("response.in_progress", 1, "resp_1", False),
        ),
        (
            '{"response":{"id":"resp_2"},"type":"response.completed","sequence_number":11}',
            EventInfo("response.completed", 11, "resp_2", True),
        ),
        (
            '{"type":"response.failed","sequence_number":3,"response":{"id":"resp_3"}}',
            EventInfo("response.failed", 3, "resp_3", True),
        ),
        (
            '{"type":"response.incomplete","sequence_number":3,"response":{"id":""}}',
            EventInfo("response.incomplete", 3, None, True),
        ),
        ('{"type":"error","status":429,"error":{}}', EventInfo("error", None, None, True)),
        ("", EventInfo(None, None, None, False)),
        ("not json", EventInfo(None, None, None, False)),
        ('{"type":"response.output_text.delta","delta":"trunc', EventInfo(None, None, None, False)),
        ('{"type":"a\nb","sequence_number":1}', EventInfo(None, None, None, False)),
        ('{"type":"response.completed"', EventInfo(None, None, None, False)),
        ("[1,2]", EventInfo(None, None, None, False)),
        ('{"type":5,"sequence_number":1}', EventInfo(None, None, None, False)),
        ('{"sequence_number":1}', EventInfo(None, None, None, False)),
        ("[" * 100_000 + "]" * 100_000, EventInfo(None, None, None, False)),
    ],
)
def test_inspect_event(frame: str, expected: EventInfo) -> None:
    assert inspect_event(frame) == expected


def generated_turns() -> list[dict[str, Any]]:
    """Every event of the faithful local upstream's turns, as the upstream sends them."""
    events: list[dict[str, Any]] = []
    request: dict[str, Any] = {"model": "gpt-5-codex", "input": "hi"}
    specs = [
        response_events.TurnSpec(text='He said "sequence_number": 3, then \\ left', deltas=12),
        response_events.TurnSpec(function_call=response_events.FunctionCall("run", '{"a":1}')),
        response_events.TurnSpec(stamp_ns=True, deltas=3),
    ]
    for spec in specs:
        events += response_events.turn_events(
            request, spec, response_id="resp_x", item_id="msg_x", created_at=1
        )
    prewarm = {**request, "generate": False}
    spec = response_events.TurnSpec()
    events += response_events.turn_events(
        prewarm, spec, response_id="resp_p", item_id="msg_p", created_at=1
    )
    events.append(response_events.rate_limit_event(3))
    return events


@pytest.mark.parametrize("event", generated_turns(), ids=lambda e: str(e["type"]))
@pytest.mark.parametrize("indent", [None, 1])
def test_inspect_event_agrees_with_json_on_real_frames(
    event: dict[str, Any], indent: int | None
) -> None:
    frame = response_events.encode(event) if indent is None else json.dumps(event, indent=indent)
    assert inspect_event(frame) == info_from_dict(event)


def test_deltas_are_read_without_parsing_the_whole_frame() -> None:
    # The hot path reads type and sequence number only: a delta frame whose
    # middle a JSON parser would reject is still classified (the trade-off the
    # fast path makes; frames that matter are parsed).
    frame = '{"type":"response.output_text.delta","delta":"x",oops,"sequence_number":12}'
    assert inspect_event(frame) == EventInfo("response.output_text.delta", 12, None, False)
    terminal = '{"type":"response.completed",oops,"sequence_number":12}'
    assert inspect_event(terminal) == EventInfo(None, None, None, False)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            '{"type":"response.completed","response":{"id":"r","status":"completed"}}',
            {"id": "r", "status": "completed"},
        ),
        ('{"type":"response.failed","response":{"id":"r"}}', {"id": "r"}),
        ('{"type":"response.incomplete","response":{"id":"r"}}', {"id": "r"}),
        ('{"type":"response.created","response":{"id":"r"}}', None),
        ('{"type":"response.output_text.delta","delta":"x"}', None),
        ('{"type":"error","response":{"id":"r"}}', None),
        ('{"type":"response.completed","response":"r"}', None),
        ('{"type":"response.completed"}', None),
        ("nope", None),
        ("[]", None),
    ],
)
def test_final_response(frame: str, expected: dict[str, Any] | None) -> None:
    assert final_response(frame) == expected


def test_final_response_of_a_generated_turn_is_the_completed_response() -> None:
    events = list(
        response_events.turn_events(
            {"model": "m"},
            response_events.TurnSpec(),
            response_id="resp_9",
            item_id="msg_9",
            created_at=1,
        )
    )
    completed = events[-1]
    response = final_response(response_events.encode(completed))
    assert response == completed["response"]
    assert response is not None and response["id"] == "resp_9"


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            response_events.encode(response_events.rate_limit_event(7)),
            UpstreamErrorEvent(
                status=429,
                code="rate_limit_exceeded",
                type="requests",
                message="Rate limit reached. Please try again in 7s.",
                param=None,
                headers={"retry-after": "7"},
                error_object={
                    "type": "requests",
                    "code": "rate_limit_exceeded",
                    "message": "Rate limit reached. Please try again in 7s.",
                    "param": None,
                },
            ),
        ),
        (
            '{"type":"error","status":400,"error":{"type":"invalid_request_error",'
            '"code":"bad_model","message":"no such model","param":"model","extra":1}}',
            UpstreamErrorEvent(
                status=400,
                code="bad_model",
                type="invalid_request_error",
                message="no such model",
                param="model",
                headers={},
                error_object={
                    "type": "invalid_request_error",
                    "code": "bad_model",
                    "message": "no such model",
                    "param": "model",
                    "extra": 1,
                },
            ),
        ),
        (
            '{"type":"error","code":"server_error","message":"boom","param":null,"sequence_number":2}',
            UpstreamErrorEvent(
                status=None,
                code="server_error",
                type=None,
                message="boom",
                param=None,
                headers={},
                error_object={
                    "message": "boom",
                    "type": None,
                    "code": "server_error",
                    "param": None,
                },
            ),
        ),
        (
            '{"type":"error","status":"503","error":{"message":"busy"},"headers":{"Retry-After":5}}',
            UpstreamErrorEvent(
                status=503,
                code=None,
                type=None,
                message="busy",
                param=None,
                headers={"Retry-After": "5"},
                error_object={"message": "busy"},
            ),
        ),
        (
            '{"type":"error","status_code":401,"error":{"code":"invalid_api_key"}}',
            UpstreamErrorEvent(
                status=401,
                code="invalid_api_key",
                type=None,
                message="the upstream reported an error",
                param=None,
                headers={},
                error_object={"code": "invalid_api_key"},
            ),
        ),
    ],
)
def test_parse_error_event(frame: str, expected: UpstreamErrorEvent) -> None:
    assert parse_error_event(frame) == expected


@pytest.mark.parametrize(
    "frame",
    [DELTA, '{"type":"response.failed","response":{}}', "garbage", "[]", '{"error":{}}'],
)
def test_parse_error_event_ignores_other_frames(frame: str) -> None:
    assert parse_error_event(frame) is None


@pytest.mark.parametrize(
    ("code", "limited"),
    [(c, True) for c in sorted(RATE_LIMIT_CODES)] + [("server_error", False), (None, False)],
)
def test_rate_limit_codes(code: str | None, limited: bool) -> None:
    frame = json.dumps({"type": "error", "status": 429, "error": {"code": code, "message": "m"}})
    event = parse_error_event(frame)
    assert event is not None and event.is_rate_limit is limited


# -- the Codex terminal shape and the unknown previous response ---------------------------

ITEM_A = {"id": "msg_a", "type": "message", "content": [{"type": "output_text", "text": "A"}]}
ITEM_B = {"id": "fc_b", "type": "function_call", "name": "f"}


def test_output_is_assembled_from_items_when_the_terminal_event_has_none() -> None:
    done = {"id": "resp_1", "output": []}
    assert with_output(done, [(1, ITEM_B), (0, ITEM_A)])["output"] == [ITEM_A, ITEM_B]
    assert with_output(done, [(None, ITEM_B), (None, ITEM_A)])["output"] == [ITEM_B, ITEM_A]
    assert with_output(done, []) == done
    # The upstream's own non-empty output stays.
    own = {"id": "resp_1", "output": [ITEM_B]}
    assert with_output(own, [(0, ITEM_A)]) == own


def test_output_item_frames() -> None:
    frame = json.dumps({"type": "response.output_item.done", "output_index": 2, "item": ITEM_A})
    assert output_item(frame) == (2, ITEM_A)
    assert output_item('{"type":"response.output_item.added","item":{}}') is None


@pytest.mark.parametrize(
    "event",
    [
        error_event(400, "previous_response_not_found", "Previous response 'x' not found."),
        error_event(400, None, "Invalid `previous_response_id`.", param="previous_response_id"),
        error_event(400, "invalid_request_error", "Invalid `previous_response_id`."),
        {"type": "error", "code": None, "message": "Invalid `previous_response_id`."},
    ],
)
def test_both_shapes_of_an_unknown_previous_response_have_one_code(event: dict[str, Any]) -> None:
    parsed = parse_error_event(json.dumps(event))
    assert parsed is not None
    assert parsed.code == "previous_response_not_found"
    assert parsed.error_object["code"] == "previous_response_not_found"


def test_other_invalid_request_errors_keep_their_code() -> None:
    parsed = parse_error_event(json.dumps(error_event(400, "invalid_value", "Invalid model.")))
    assert parsed is not None and parsed.code == "invalid_value"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"a","n":1}', {"type": "a", "n": 1}),
        (' \n{"type":"a"}', {"type": "a"}),  # leading whitespace: the full decoder
        ('{"type":"a"} \r\n', {"type": "a"}),  # trailing whitespace
        ('{"a":{"b":[1,2.5,null,true]}}', {"a": {"b": [1, 2.5, None, True]}}),
        ('{"type":"a"}{"type":"b"}', None),  # two objects in one frame
        ('{"type":"a"}x', None),
        ("[1]", None),
        ('"text"', None),
        ("", None),
        ("   ", None),
        ('{"type":', None),
        ('{"n":NaN}', None),
        ('{"n":-Infinity}', None),
        ('{"n":1e999}', None),
        ("[" * 100_000, None),  # nesting deeper than the recursion limit
    ],
)
def test_a_frame_is_a_json_object_of_finite_numbers_or_nothing(
    text: str, expected: dict[str, Any] | None
) -> None:
    assert load_event(text) == expected
