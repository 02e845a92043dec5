"""Affinity classification: every signal, precedence, real Codex CLI requests, and owners."""

from __future__ import annotations

from typing import Any

import pytest
from responses_ws_bridge.core.affinity import (
    NO_AFFINITY,
    Affinity,
    AffinityKind,
    classify,
    counted_key,
    owner_for,
    socket_key,
)

from tests.support.data import load_capture

HARD, SOFT, NONE = AffinityKind.HARD, AffinityKind.SOFT, AffinityKind.NONE


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("x-codex-turn-state", "turn-state:v1"),
        ("session_id", "session:v1"),
        ("session-id", "session:v1"),
        ("x-codex-session-id", "session:v1"),
        ("thread-id", "thread:v1"),
        ("conversation_id", "conversation:v1"),
        ("x-codex-conversation-id", "conversation:v1"),
    ],
)
def test_each_hard_header(header: str, key: str) -> None:
    expected = Affinity(HARD, key=key, source=f"header:{header}", keys=(key,))
    assert classify([(header, "v1")], {}) == expected
    # Header names are case-insensitive; the source names the canonical spelling.
    assert classify([(header.upper(), "v1")], {}) == expected


def test_previous_response_id() -> None:
    assert classify([], {"previous_response_id": "resp_1"}) == Affinity(
        HARD,
        key="response:resp_1",
        source="body:previous_response_id",
        owner_hint="resp_1",
        keys=("response:resp_1",),
    )


@pytest.mark.parametrize("conversation", ["conv_1", {"id": "conv_1"}, {"id": " conv_1 "}])
def test_conversation(conversation: Any) -> None:
    assert classify([], {"conversation": conversation}) == Affinity(
        HARD, key="conversation:conv_1", source="body:conversation", keys=("conversation:conv_1",)
    )


def test_prompt_cache_key_is_soft() -> None:
    assert classify([], {"prompt_cache_key": "pck"}) == Affinity(
        SOFT, key="prompt-cache:pck", source="body:prompt_cache_key", keys=("prompt-cache:pck",)
    )


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([], {}),
        ([("x-client-request-id", "r1"), ("originator", "codex_exec")], {"model": "m"}),
        ([("session-id", ""), ("thread-id", "   ")], {}),
        ([], {"previous_response_id": None, "conversation": {"id": ""}, "prompt_cache_key": ""}),
        ([], {"previous_response_id": 5, "conversation": 7, "prompt_cache_key": ["x"]}),
        ([], {"conversation": {"name": "no id"}}),
    ],
)
def test_no_signal_is_none(headers: list[tuple[str, str]], body: dict[str, Any]) -> None:
    assert classify(headers, body) == NO_AFFINITY
    assert NO_AFFINITY.kind is NONE and NO_AFFINITY.key is None


@pytest.mark.parametrize(
    ("headers", "body", "key", "source", "keys"),
    [
        (
            [("thread-id", "t"), ("x-codex-turn-state", "ts"), ("session-id", "s")],
            {},
            "turn-state:ts",
            "header:x-codex-turn-state",
            ("turn-state:ts", "session:s", "thread:t"),
        ),
        (
            [("session-id", "b"), ("session_id", "a")],
            {},
            "session:a",
            "header:session_id",
            ("session:a", "session:b"),
        ),
        (
            [("x-codex-session-id", "s"), ("conversation_id", "c")],
            {},
            "session:s",
            "header:x-codex-session-id",
            ("session:s", "conversation:c"),
        ),
        (
            [("x-codex-conversation-id", "c2"), ("thread-id", "t")],
            {},
            "thread:t",
            "header:thread-id",
            ("thread:t", "conversation:c2"),
        ),
        (
            [("conversation_id", "c1"), ("x-codex-conversation-id", "c2")],
            {},
            "conversation:c1",
            "header:conversation_id",
            ("conversation:c1", "conversation:c2"),
        ),
        # Headers before the body; previous_response_id before conversation.
        (
            [("session-id", "s")],
            {"previous_response_id": "r", "conversation": "c", "prompt_cache_key": "p"},
            "session:s",
            "header:session-id",
            ("session:s", "response:r", "conversation:c"),
        ),
        (
            [],
            {"conversation": "c", "previous_response_id": "r", "prompt_cache_key": "p"},
            "response:r",
            "body:previous_response_id",
            ("response:r", "conversation:c"),
        ),
        (
            [],
            {"conversation": {"id": "c"}, "prompt_cache_key": "p"},
            "conversation:c",
            "body:conversation",
            ("conversation:c",),
        ),
        # The same session through two spellings is one key.
        (
            [("session_id", "s"), ("session-id", "s"), ("conversation_id", "s")],
            {"conversation": "s"},
            "session:s",
            "header:session_id",
            ("session:s", "conversation:s"),
        ),
        # The first non-empty occurrence of a header counts.
        (
            [("session-id", ""), ("Session-Id", " s2 "), ("session-id", "s3")],
            {},
            "session:s2",
            "header:session-id",
            ("session:s2",),
        ),
    ],
)
def test_precedence(
    headers: list[tuple[str, str]],
    body: dict[str, Any],
    key: str,
    source: str,
    keys: tuple[str, ...],
) -> None:
    affinity = classify(headers, body)
    assert affinity.kind is HARD
    assert (affinity.key, affinity.source, affinity.keys) == (key, source, keys)


def test_owner_hint_is_set_whenever_previous_response_id_is_present() -> None:
    affinity = classify([("session-id", "s")], {"previous_response_id": "resp_9"})
    assert affinity.key == "session:s"
    assert affinity.owner_hint == "resp_9"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = load_capture(name)
    return data


def pairs(raw: list[list[str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in raw]


@pytest.mark.parametrize("name", ["http-sse.json", "backend-api-codex-http-sse.json"])
def test_codex_cli_http_request_is_hard_by_session_id(name: str) -> None:
    capture = load(name)
    headers = pairs(capture["headers"])
    session = dict(headers)["session-id"]
    assert capture["body"]["prompt_cache_key"]  # soft signal present too: hard still wins
    affinity = classify(headers, capture["body"])
    assert affinity.kind is HARD
    assert affinity.key == f"session:{session}"
    assert affinity.source == "header:session-id"
    assert affinity.owner_hint is None
    assert affinity.keys == (f"session:{session}", f"thread:{session}")


def test_codex_cli_tool_roundtrip_requests_share_one_key() -> None:
    capture = load("tool-roundtrip-http-sse.json")
    requests = [capture, *capture["additional_requests"]]
    assert len(requests) >= 2
    keys = {classify(pairs(r["headers"]), r["body"]).key for r in requests}
    session = dict(pairs(capture["headers"]))["session-id"]
    assert keys == {f"session:{session}"}


@pytest.mark.parametrize(
    ("affinity", "bindings", "responses", "owner"),
    [
        (NO_AFFINITY, {"x": "A"}, {"x": "A"}, None),
        # First request of a hard key: no owner yet; the shell chooses and binds.
        (classify([("session-id", "s")], {}), {}, {}, None),
        (classify([("session-id", "s")], {}), {"session:s": "A"}, {}, "A"),
        # The response owner is authoritative, even against a disagreeing header binding.
        (
            classify([("session-id", "s")], {"previous_response_id": "r1"}),
            {"session:s": "A"},
            {"r1": "B"},
            "B",
        ),
        (classify([], {"previous_response_id": "r1"}), {}, {"r1": "B"}, "B"),
        # Unknown response (e.g. produced before a restart): fall back to bindings.
        (
            classify([("session-id", "s")], {"previous_response_id": "r0"}),
            {"session:s": "A"},
            {"r1": "B"},
            "A",
        ),
        (classify([], {"previous_response_id": "r0"}), {"response:r0": "C"}, {}, "C"),
        # A fresh turn-state key still finds the session bound through another header.
        (
            classify([("x-codex-turn-state", "new"), ("session-id", "s")], {}),
            {"session:s": "A"},
            {},
            "A",
        ),
        # The first bound key by precedence wins when bindings disagree.
        (
            classify([("x-codex-turn-state", "ts"), ("session-id", "s")], {}),
            {"session:s": "A", "turn-state:ts": "B"},
            {},
            "B",
        ),
        # Soft: the key's last account is a preference.
        (classify([], {"prompt_cache_key": "p"}), {"prompt-cache:p": "A"}, {}, "A"),
        (classify([], {"prompt_cache_key": "p"}), {}, {}, None),
    ],
)
def test_owner_for(
    affinity: Affinity, bindings: dict[str, str], responses: dict[str, str], owner: str | None
) -> None:
    got = owner_for(affinity, bound_account=bindings.get, response_owner=responses.get)
    assert got == owner


@pytest.mark.parametrize(
    ("headers", "body", "socket"),
    [
        ([("session-id", "s1"), ("x-codex-turn-state", "t1")], {}, "session:s1"),
        ([("session-id", "s1"), ("x-codex-turn-state", "t2")], {}, "session:s1"),
        ([("x-codex-turn-state", "t1")], {}, "turn-state:t1"),
        ([("thread-id", "th")], {"previous_response_id": "resp_1"}, "thread:th"),
        ([], {"previous_response_id": "resp_1"}, "response:resp_1"),
        ([], {"prompt_cache_key": "p"}, "prompt-cache:p"),
        ([], {}, None),
    ],
)
def test_socket_key_is_the_steadiest_key(
    headers: list[tuple[str, str]], body: dict[str, object], socket: str | None
) -> None:
    assert socket_key(classify(headers, body)) == socket


@pytest.mark.parametrize(
    ("headers", "body", "counted"),
    [
        # Codex CLI: session-id and thread-id, one session counted by its steadiest key.
        ([("session-id", "s1"), ("thread-id", "th")], {}, "session:s1"),
        ([("session-id", "s1"), ("x-codex-turn-state", "t1")], {}, "session:s1"),
        ([("thread-id", "th")], {"previous_response_id": "resp_1"}, "thread:th"),
        ([], {"prompt_cache_key": "p"}, "prompt-cache:p"),
        # Keys that change every turn name no session.
        ([("x-codex-turn-state", "t1")], {}, None),
        ([], {"previous_response_id": "resp_1"}, None),
        ([], {}, None),
    ],
)
def test_a_session_is_counted_by_its_steadiest_key(
    headers: list[tuple[str, str]], body: dict[str, object], counted: str | None
) -> None:
    assert counted_key(classify(headers, body)) == counted
