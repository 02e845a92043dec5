"""Which handshakes a warm spare can stand in for."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.handshake_headers import (
    UpstreamCredential,
    upstream_handshake_headers,
)
from responses_ws_bridge.core.spare_headers import spare_headers

CODEX = (
    ("x-codex-beta-features", "remote_compaction_v2"),
    ("x-codex-window-id", "s1:0"),
    ("x-codex-turn-metadata", '{"session_id":"s1"}'),
    ("x-client-request-id", "s1"),
    ("session-id", "s1"),
    ("thread-id", "s1"),
    ("accept", "text/event-stream"),
    ("authorization", "Bearer client-key"),
    ("originator", "codex_exec"),
    ("user-agent", "codex_exec/0.169.0"),
)
TEAM_A = UpstreamCredential("tok-a", "acct-a")


def handshake(
    headers: tuple[tuple[str, str], ...], request_id: str = "req-1"
) -> list[tuple[str, str]]:
    return upstream_handshake_headers(headers, TEAM_A, request_id=request_id)


def test_a_spare_keeps_the_account_level_headers_only() -> None:
    assert spare_headers(handshake(CODEX)) == (
        ("x-codex-beta-features", "remote_compaction_v2"),
        ("originator", "codex_exec"),
        ("user-agent", "codex_exec/0.169.0"),
        ("Authorization", "Bearer tok-a"),
        ("chatgpt-account-id", "acct-a"),
        ("OpenAI-Beta", "responses_websockets=2026-02-06"),
    )


def test_requests_of_other_sessions_share_a_spare() -> None:
    other = tuple((k, v.replace("s1", "s2")) for k, v in CODEX)
    assert spare_headers(handshake(CODEX)) == spare_headers(handshake(other, "req-2"))


@pytest.mark.parametrize(
    "changed",
    [
        ("user-agent", "codex_exec/0.170.0"),
        ("originator", "codex_cli_rs"),
        ("x-codex-beta-features", ""),
        ("openai-beta", "responses_websockets=2026-02-04"),
    ],
)
def test_another_client_identity_needs_another_spare(changed: tuple[str, str]) -> None:
    name = changed[0]
    other = (*(h for h in CODEX if h[0] != name), changed)
    assert spare_headers(handshake(CODEX)) != spare_headers(handshake(other))


def test_another_account_needs_another_spare() -> None:
    other = upstream_handshake_headers(CODEX, UpstreamCredential("tok-b"), request_id="r")
    assert spare_headers(handshake(CODEX)) != spare_headers(other)


@pytest.mark.parametrize("name", ["x-codex-turn-state", "X-Codex-Turn-State"])
def test_a_turn_state_needs_its_own_handshake(name: str) -> None:
    assert spare_headers(handshake((*CODEX, (name, "ts-1")))) is None
