"""Which events reach which client, the keepalives, and the answer headers: the tables."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core import answer_headers, sse
from responses_ws_bridge.core.client_events import (
    ClientKind,
    Disposition,
    client_kind,
    disposition,
    keepalive,
)
from responses_ws_bridge.core.prewarm import counts, is_prewarm
from responses_ws_bridge.core.stream_timers import Timer, after, next_timer

PUBLIC, CODEX = ClientKind.PUBLIC, ClientKind.CODEX
RELAY, DROP = Disposition.RELAY, Disposition.DROP


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/responses", PUBLIC),
        ("/v1/responses?x=1", PUBLIC),
        ("/responses", PUBLIC),
        ("/backend-api/codex/responses", CODEX),
        ("/backend-api/codex/responses?stream=1", CODEX),
        ("/api/codex/responses", CODEX),
        ("/openai/v1/responses", PUBLIC),
    ],
)
def test_the_path_says_who_the_client_is(path: str, kind: ClientKind) -> None:
    assert client_kind(path) is kind


# (event type, public, codex): every row of the module table.
EVENTS = [
    ("response.metadata", DROP, RELAY),
    ("codex.response.metadata", DROP, RELAY),
    ("responsesapi.websocket_timing", DROP, DROP),
    ("responsesapi.anything", DROP, DROP),
    ("error", RELAY, RELAY),
    ("response.created", RELAY, RELAY),
    ("response.output_text.delta", RELAY, RELAY),
    ("response.reasoning_summary_text.delta", RELAY, RELAY),
    ("response.completed", RELAY, RELAY),
    ("codex.keepalive", DROP, RELAY),
    ("keepalive", DROP, RELAY),
    ("vendor.something", DROP, RELAY),
]


@pytest.mark.parametrize(("event_type", "public", "codex"), EVENTS)
def test_the_event_table(event_type: str, public: Disposition, codex: Disposition) -> None:
    assert disposition(event_type, PUBLIC) is public
    assert disposition(event_type, CODEX) is codex


def test_the_keepalive_table() -> None:
    event = keepalive(CODEX, started=False)
    assert event is not None
    assert sse.parse_sse(event) == [("codex.keepalive", '{"type":"codex.keepalive"}')]
    assert keepalive(CODEX, started=True) == event
    assert keepalive(PUBLIC, started=False) is None
    assert keepalive(PUBLIC, started=True) == sse.KEEPALIVE


def test_passed_handshake_headers() -> None:
    got = answer_headers.from_handshake(
        [
            ("X-Codex-Turn-State", "ts"),
            ("x-reasoning-included", "true"),
            ("x-models-etag", "e"),
            ("OpenAI-Model", "gpt"),
            ("x-request-id", "r"),
            ("set-cookie", "c"),
        ]
    )
    assert got == {
        "x-codex-turn-state": "ts",
        "x-reasoning-included": "true",
        "x-models-etag": "e",
        "openai-model": "gpt",
    }


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Codex-Turn-State": "ts-2"}, {"x-codex-turn-state": "ts-2"}),
        ({"x-codex-turn-state": "a\r\nx-evil: 1"}, {}),
        ({"x-codex-turn-state": ""}, {}),
        ({"x-codex-turn-state": 7}, {}),
        ({"x-models-etag": 'W/"1"', "other": "x"}, {"x-models-etag": 'W/"1"'}),
        (None, {}),
    ],
)
def test_metadata_headers(headers: object, expected: dict[str, str]) -> None:
    assert answer_headers.from_metadata({"type": "response.metadata", "headers": headers}) == (
        expected
    )


@pytest.mark.parametrize(
    ("body", "output_seen", "prewarm", "counted"),
    [
        ({"generate": False}, False, True, False),
        ({"generate": False}, True, True, True),
        ({"generate": True}, False, False, True),
        ({}, False, False, True),
        ({"generate": 0}, False, False, True),
    ],
)
def test_the_prewarm_table(
    body: dict[str, object], output_seen: bool, prewarm: bool, counted: bool
) -> None:
    assert is_prewarm(body) is prewarm
    assert counts(prewarm=prewarm, output_seen=output_seen) is counted


@pytest.mark.parametrize(
    ("timers", "expected"),
    [
        ([], None),
        ([(None, Timer.SILENT)], None),
        ([(5.0, Timer.SILENT), (3.0, Timer.KEEPALIVE)], (3.0, Timer.KEEPALIVE)),
        ([(5.0, Timer.KEEPALIVE), (5.0, Timer.SILENT)], (5.0, Timer.SILENT)),
        ([(5.0, Timer.RELEASE), (5.0, Timer.FIRST_EVENT)], (5.0, Timer.FIRST_EVENT)),
        (
            [(9.0, Timer.FIRST_EVENT), (2.0, Timer.RELEASE), (None, Timer.KEEPALIVE)],
            (2.0, Timer.RELEASE),
        ),
    ],
)
def test_the_first_timer_to_ring(
    timers: list[tuple[float | None, Timer]], expected: tuple[float, Timer] | None
) -> None:
    assert next_timer(timers) == expected


def test_a_timer_of_zero_is_off() -> None:
    assert after(10.0, 0) is None
    assert after(10.0, None) is None
    assert after(10.0, 2.5) == 12.5
