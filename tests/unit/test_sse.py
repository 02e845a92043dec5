"""SSE framing, the SSE parser, and the mid-stream failure event."""

from __future__ import annotations

import json

import pytest
from responses_ws_bridge.core import sse as _sse
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.sse import KEEPALIVE, encode_event, parse_sse, stream_incomplete_event

DELTA = '{"type":"response.output_text.delta","sequence_number":4,"delta":"Hi"}'


@pytest.mark.parametrize(
    ("text", "event_type", "wire"),
    [
        (
            DELTA,
            "response.output_text.delta",
            f"event: response.output_text.delta\ndata: {DELTA}\n\n",
        ),
        (DELTA, None, f"data: {DELTA}\n\n"),
        ("", "x", "event: x\ndata: \n\n"),
        ("a\nb", "x", "event: x\ndata: a\ndata: b\n\n"),
        ("a\r\nb\rc", None, "data: a\ndata: b\ndata: c\n\n"),
        ("a\n", None, "data: a\ndata: \n\n"),
        (" lead", None, "data:  lead\n\n"),
        ('{"d":"é ☃ \\n"}', "t", 'event: t\ndata: {"d":"é ☃ \\n"}\n\n'),
    ],
)
def test_encode_event(text: str, event_type: str | None, wire: str) -> None:
    assert encode_event(text, event_type) == wire.encode()


@pytest.mark.parametrize("event_type", ["a\nb", "a\rdata: x"])
def test_encode_event_refuses_an_event_type_that_would_forge_fields(event_type: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        encode_event("{}", event_type)


ROUND_TRIP_TEXTS = [
    DELTA,
    "",
    " ",
    "  two leading spaces",
    ":not a comment",
    "a\nb\nc",
    "a\r\nb",
    "a\rb",
    "\n",
    "\n\n",
    "x\n",
    "\r\nx",
    "data: nested",
    "é ☃ 😀",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
@pytest.mark.parametrize("event_type", [None, "response.completed"])
def test_parse_sse_round_trips_encode_event(text: str, event_type: str | None) -> None:
    expected = "\n".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    assert parse_sse(encode_event(text, event_type)) == [(event_type, expected)]


def test_parse_sse_reads_a_stream_of_events_with_keepalives() -> None:
    wire = (
        encode_event('{"type":"response.created"}', "response.created")
        + KEEPALIVE
        + encode_event(DELTA, "response.output_text.delta")
        + KEEPALIVE
        + encode_event('{"type":"response.completed"}', "response.completed")
    )
    assert parse_sse(wire) == [
        ("response.created", '{"type":"response.created"}'),
        ("response.output_text.delta", DELTA),
        ("response.completed", '{"type":"response.completed"}'),
    ]


@pytest.mark.parametrize(
    ("wire", "events"),
    [
        (b"", []),
        (b": comment only\n\n", []),
        (b"data:x\n\n", [(None, "x")]),
        (b"data:  x\n\n", [(None, " x")]),
        (b"data\n\n", [(None, "")]),
        (b"data:\ndata:\n\n", [(None, "\n")]),
        (b"data: a\r\ndata: b\r\n\r\n", [(None, "a\nb")]),
        (b"data: a\rdata: b\r\r", [(None, "a\nb")]),
        (b"event: t\n\n", []),
        (b"event: t\n\ndata: x\n\n", [(None, "x")]),
        (b"event:\ndata: x\n\n", [(None, "x")]),
        (b"event: a\nevent: b\ndata: x\n\n", [("b", "x")]),
        (b"id: 1\nretry: 5\nfoo: bar\ndata: x\n\n", [(None, "x")]),
        (b"Data: x\n\n", []),
        (b"data: x\n", []),
        (b"data: x", []),
        (b"data: x\n\ndata: y", [(None, "x")]),
        (b"\xef\xbb\xbfdata: x\n\n", [(None, "x")]),
        (b"event: t \ndata: x\n\n", [("t ", "x")]),
    ],
)
def test_parse_sse_follows_the_event_stream_rules(
    wire: bytes, events: list[tuple[str | None, str]]
) -> None:
    assert parse_sse(wire) == events


def test_keepalive_is_a_comment() -> None:
    assert KEEPALIVE == b": keepalive\n\n"
    assert parse_sse(KEEPALIVE) == []


@pytest.mark.parametrize(
    ("close_code", "reason", "message"),
    [
        (
            1011,
            "internal error",
            "upstream WebSocket closed before the response finished "
            "(close code 1011: internal error)",
        ),
        (1006, "", "upstream WebSocket closed before the response finished (close code 1006)"),
        (None, "", "upstream WebSocket closed before the response finished (connection lost)"),
        (
            None,
            "reset by peer",
            "upstream WebSocket closed before the response finished "
            "(connection lost: reset by peer)",
        ),
    ],
)
def test_stream_incomplete_event(close_code: int | None, reason: str, message: str) -> None:
    event = stream_incomplete_event(
        close_code=close_code, reason=reason, response_id="resp_1", sequence_number=7
    )
    assert event["type"] == "response.failed"
    assert event["sequence_number"] == 7
    response = event["response"]
    assert (response["id"], response["object"], response["status"]) == (
        "resp_1",
        "response",
        "failed",
    )
    assert response["error"] == {"code": "stream_incomplete", "message": message}
    # It goes to the client as one SSE event like any other.
    wire = encode_event(json.dumps(event), event["type"])
    assert [(t, json.loads(d)) for t, d in parse_sse(wire)] == [("response.failed", event)]


def test_stream_incomplete_event_without_a_response_id() -> None:
    event = stream_incomplete_event(close_code=1011, reason="", response_id=None, sequence_number=0)
    assert event["response"]["id"] == ""


# --- hostile upstream frames ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "event_type", "reason"),
    [
        (b'{"type":"response.created"}', "response.created", "binary"),
        ('{"type":"a\\nevent: forged"}', "a\nevent: forged", "line break"),
        ('{"type":"a\\u2028b"}', None, "line break"),
        ('{"type":"x","n":1e999}', "x", "finite"),
        ('{"type":"x","n":NaN}', "x", "finite"),
        ('{"type":"x","n":-Infinity}', "x", "finite"),
        ('{"type":"x",', "x", "JSON"),
        ("[1,2]", None, "JSON"),
        ('{"sequence_number":1}', None, "without a type"),
        ('{"type":5}', None, "without a type"),
        ('{"type":"a","type":"response.completed"}', "a", "ambiguous"),
    ],
)
def test_unencodable_frames_are_refused_not_cut(
    frame: str | bytes, event_type: str | None, reason: str
) -> None:
    with pytest.raises(_sse.UnencodableEvent, match=reason):
        _sse.encode_upstream_event(frame, event_type)


def test_well_formed_frames_encode_as_before() -> None:
    frame = '{"type":"response.output_text.delta","delta":"x\\ny","n":1.5e300}'
    assert _sse.encode_upstream_event(frame, "response.output_text.delta") == _sse.encode_event(
        frame, "response.output_text.delta"
    )


def test_failed_events_scrub_what_the_upstream_chose() -> None:
    token = "account-token-123456789"
    event = _sse.stream_incomplete_event(
        close_code=1011,
        reason=f"bad auth {token}",
        response_id="resp_1",
        sequence_number=3,
        scrub=SecretScrubber([token]),
    )
    assert token not in json.dumps(event)
    assert event["response"]["error"]["code"] == "stream_incomplete"
    failed = _sse.invalid_event_failed(reason="a binary frame", response_id=None, sequence_number=0)
    assert failed["response"]["error"]["code"] == "invalid_upstream_event"
    idle = _sse.stream_idle_event(idle_s=300, response_id="r", sequence_number=9)
    assert "300 s" in idle["response"]["error"]["message"]
