"""The upstream handshake header policy and the handshake audit."""

from __future__ import annotations

import random
from typing import Any

import pytest
from responses_ws_bridge.core.handshake_headers import (
    HTTP_ONLY_BETA,
    WEBSOCKET_BETA,
    UpstreamCredential,
    client_request_id,
    contains_secret,
    handshake_violations,
    normalize_beta,
    redact_secrets,
    removed_header_names,
    upstream_handshake_headers,
)
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.uri import parse_uri

from tests.support.data import load_capture

Headers = list[tuple[str, str]]

REMOVED_NAMES = [
    "accept",
    "accept-encoding",
    "accept-language",
    "authorization",
    "connection",
    "content-type",
    "content-length",
    "content-encoding",
    "cookie",
    "host",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "cf-connecting-ip",
    "cf-ray",
    "chatgpt-account-id",
    "x-request-id",
]
KEPT_NAMES = [
    "session_id",
    "session-id",
    "thread-id",
    "x-codex-turn-state",
    "x-codex-window-id",
    "x-codex-turn-metadata",
    "x-codex-beta-features",
    "x-client-request-id",
    "originator",
    "version",
    "user-agent",
    "conversation_id",
    "x-some-extension",
]


def variants(name: str) -> list[str]:
    return [name, name.title(), name.upper()]


def capture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = load_capture(name)
    return data


def beta_lines(headers: Headers) -> list[str]:
    return [v for k, v in headers if k.lower() == "openai-beta"]


def tail(credential: UpstreamCredential | None = None, beta: str = WEBSOCKET_BETA) -> Headers:
    """What the bridge appends after the kept client fields."""
    out: Headers = []
    if credential is not None:
        out.append(("Authorization", f"Bearer {credential.bearer}"))
        if credential.chatgpt_account_id:
            out.append(("chatgpt-account-id", credential.chatgpt_account_id))
    return [*out, ("OpenAI-Beta", beta), ("x-request-id", "req-1")]


# --- removal -------------------------------------------------------------------------


@pytest.mark.parametrize("removed", REMOVED_NAMES)
def test_removed_field_never_reaches_the_upstream(removed: str) -> None:
    for name in variants(removed):
        client = [
            ("session_id", "s-1"),
            (name, "client-value-1"),
            ("originator", "codex_exec"),
            (name, "client-value-2"),
        ]
        out = upstream_handshake_headers(client, None, request_id="req-1")
        assert out == [("session_id", "s-1"), ("originator", "codex_exec"), *tail()], name


@pytest.mark.parametrize("pool_mode", [True, False])
@pytest.mark.parametrize("name", KEPT_NAMES)
def test_kept_field_passes_in_order_and_case_with_its_repeats(name: str, pool_mode: bool) -> None:
    client = [(name.upper(), "a"), ("accept", "*/*"), (name, "b"), ("user-agent-x", "c")]
    out = upstream_handshake_headers(client, None, request_id="req-1", pool_mode=pool_mode)
    assert out == [(name.upper(), "a"), (name, "b"), ("user-agent-x", "c"), *tail()]


POOL_ONLY_REMOVED_NAMES = ["openai-organization", "openai-project", "x-api-key", "api-key"]


@pytest.mark.parametrize("name", [v for n in POOL_ONLY_REMOVED_NAMES for v in variants(n)])
def test_client_billing_and_keys_never_go_next_to_an_account_credential(name: str) -> None:
    client = [("session_id", "s-1"), (name, "client-org-or-key")]
    cred = UpstreamCredential("account-token")
    pooled = upstream_handshake_headers(client, cred, request_id="req-1")
    assert pooled == [("session_id", "s-1"), *tail(cred)]
    assert name.lower() in removed_header_names(client)
    # Pass-through: the credential is the client's own, and so is the billing scope.
    own = UpstreamCredential("client-token")
    passed = upstream_handshake_headers(client, own, request_id="req-1", pool_mode=False)
    assert passed == [*client, *tail(own)]
    assert name.lower() not in removed_header_names(client, pool_mode=False)


@pytest.mark.parametrize(
    ("connection_lines", "removed"),
    [
        (["keep-alive, X-Codex-Window-Id"], {"x-codex-window-id"}),
        (["keep-alive", "X-CODEX-WINDOW-ID"], {"x-codex-window-id"}),
        (["x-codex-window-id,session-id"], {"x-codex-window-id", "session-id"}),
        (["Upgrade", " , thread-id , "], {"thread-id"}),
        (["keep-alive"], set()),
    ],
)
def test_fields_named_by_connection_are_removed(
    connection_lines: list[str], removed: set[str]
) -> None:
    kept = [("X-Codex-Window-Id", "w:0"), ("session-id", "s"), ("thread-id", "t")]
    client = [*kept[:1], *(("Connection", c) for c in connection_lines), *kept[1:]]
    out = upstream_handshake_headers(client, None, request_id="req-1")
    assert out == [(k, v) for k, v in kept if k.lower() not in removed] + tail()
    assert set(removed_header_names(client)) == {"connection", *removed}


def test_client_websocket_handshake_fields_are_removed() -> None:
    client = [
        ("Sec-WebSocket-Key", "CBD+uLzrJw6BM3lQxqv/bg=="),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Sec-WebSocket-Version", "13"),
        ("session-id", "s"),
    ]
    out = upstream_handshake_headers(client, None, request_id="req-1")
    assert out == [("session-id", "s"), *tail()]


def test_the_seed_list_of_issue_1016() -> None:
    client = [
        ("accept", "text/event-stream"),
        ("accept-encoding", "gzip, br"),
        ("authorization", "Bearer client-token"),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
        ("cookie", "a=b"),
        ("host", "chatgpt.com"),
        ("OpenAI-Beta", "responses=experimental"),
        ("session_id", "s-1"),
    ]
    cred = UpstreamCredential("pool-token", "acct-1")
    out = upstream_handshake_headers(client, cred, request_id="req-1")
    assert out == [("session_id", "s-1"), *tail(cred)]
    assert removed_header_names(client) == [
        "accept",
        "accept-encoding",
        "authorization",
        "connection",
        "content-type",
        "cookie",
        "host",
        "openai-beta",
    ]


@pytest.mark.parametrize("name", ["http-sse.json", "backend-api-codex-http-sse.json"])
def test_codex_cli_http_capture_becomes_exactly_this(name: str) -> None:
    client = [(k, v) for k, v in capture(name)["headers"]]
    values = dict(client)
    cred = UpstreamCredential("pool-token", "acct-1")
    out = upstream_handshake_headers(client, cred, request_id="req-1")
    assert out == [
        ("x-codex-beta-features", values["x-codex-beta-features"]),
        ("x-codex-window-id", values["x-codex-window-id"]),
        ("x-codex-turn-metadata", values["x-codex-turn-metadata"]),
        ("x-client-request-id", values["x-client-request-id"]),
        ("session-id", values["session-id"]),
        ("thread-id", values["thread-id"]),
        ("originator", "codex_exec"),
        ("user-agent", values["user-agent"]),
        ("Authorization", "Bearer pool-token"),
        ("chatgpt-account-id", "acct-1"),
        ("OpenAI-Beta", "responses_websockets=2026-02-06"),
        ("x-request-id", "req-1"),
    ]
    assert removed_header_names(client) == [
        "accept",
        "content-type",
        "authorization",
        "host",
        "content-length",
    ]


# --- credentials -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credential", "expected_tail"),
    [
        (None, [("OpenAI-Beta", WEBSOCKET_BETA), ("x-request-id", "req-1")]),
        (
            UpstreamCredential("tok"),
            [
                ("Authorization", "Bearer tok"),
                ("OpenAI-Beta", WEBSOCKET_BETA),
                ("x-request-id", "req-1"),
            ],
        ),
        (
            UpstreamCredential("tok", "acct-9"),
            [
                ("Authorization", "Bearer tok"),
                ("chatgpt-account-id", "acct-9"),
                ("OpenAI-Beta", WEBSOCKET_BETA),
                ("x-request-id", "req-1"),
            ],
        ),
    ],
)
def test_credential_placement(
    credential: UpstreamCredential | None, expected_tail: Headers
) -> None:
    client = [
        ("Authorization", "Bearer client-token"),
        ("ChatGPT-Account-Id", "client-acct"),
        ("originator", "o"),
    ]
    out = upstream_handshake_headers(client, credential, request_id="req-1")
    assert out == [("originator", "o"), *expected_tail]


def test_credential_repr_hides_the_token() -> None:
    text = repr(UpstreamCredential("sk-secret-token-123", "acct-1"))
    assert "sk-secret" not in text
    assert "acct-1" in text


# --- OpenAI-Beta -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], WEBSOCKET_BETA),
        ([HTTP_ONLY_BETA], WEBSOCKET_BETA),
        (["Responses=Experimental"], WEBSOCKET_BETA),
        (["RESPONSES=EXPERIMENTAL", " responses = experimental "], WEBSOCKET_BETA),
        (["responses=experimental, assistants=v2"], f"assistants=v2, {WEBSOCKET_BETA}"),
        (
            ["assistants=v2", "responses=experimental", "x=1"],
            f"assistants=v2, x=1, {WEBSOCKET_BETA}",
        ),
        (["responses_websockets=2026-02-04"], "responses_websockets=2026-02-04"),
        (["Responses_WebSockets=2026-02-06"], "Responses_WebSockets=2026-02-06"),
        (
            ["responses_websockets=2026-02-04, responses_websockets=2026-02-06"],
            "responses_websockets=2026-02-04",
        ),
        (
            ["a=1", "responses=experimental,responses_websockets=2026-02-04"],
            "a=1, responses_websockets=2026-02-04",
        ),
        (["a=1, A=1", "a=1"], f"a=1, {WEBSOCKET_BETA}"),
        ([" , ,", ""], WEBSOCKET_BETA),
    ],
)
def test_normalize_beta(values: list[str], expected: str) -> None:
    assert normalize_beta(values) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["responses=experimental"], WEBSOCKET_BETA),
        (["assistants=v2", "Responses=Experimental, b=2"], f"assistants=v2, b=2, {WEBSOCKET_BETA}"),
        (
            ["responses_websockets=2026-02-04", "responses=experimental"],
            "responses_websockets=2026-02-04",
        ),
    ],
)
def test_exactly_one_beta_line_goes_upstream(lines: list[str], expected: str) -> None:
    client = [
        (n, v) for v, n in zip(lines, ["OpenAI-Beta", "openai-beta", "OPENAI-BETA"], strict=False)
    ]
    out = upstream_handshake_headers(client, None, request_id="req-1")
    assert beta_lines(out) == [expected]


# --- request ids -------------------------------------------------------------------------


def test_client_request_id_is_replaced_by_the_bridge_one() -> None:
    client = [("X-Request-Id", "client-1"), ("x-request-id", "client-2")]
    out = upstream_handshake_headers(client, None, request_id="bridge-1")
    assert [v for k, v in out if k.lower() == "x-request-id"] == ["bridge-1"]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ([], None),
        ([("x-client-request-id", "c")], None),
        ([("X-Request-ID", " r-1 ")], "r-1"),
        ([("x-request-id", "  "), ("x-request-id", "r-2")], "r-2"),
        ([("x-request-id", "r-1"), ("x-request-id", "r-2")], "r-1"),
    ],
)
def test_client_request_id(client: Headers, expected: str | None) -> None:
    assert client_request_id(client) == expected


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ([], []),
        ([("session-id", "s")], []),
        ([("Accept", "a"), ("ACCEPT", "b"), ("CF-Ray", "r")], ["accept", "cf-ray"]),
        ([("Connection", "X-A"), ("x-a", "1")], ["connection", "x-a"]),
        ([("OpenAI-Beta", "x=1")], ["openai-beta"]),
    ],
)
def test_removed_header_names(client: Headers, expected: list[str]) -> None:
    assert removed_header_names(client) == expected


# --- generated combinations --------------------------------------------------------------


def random_case(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name)


def library_handshake(extra: Headers) -> Headers:
    """The handshake the real websockets client writes with `extra` added."""
    protocol = ClientProtocol(
        parse_uri("wss://upstream.test/v1/responses"),
        extensions=[ClientPerMessageDeflateFactory()],
    )
    request = protocol.connect()
    request.headers.update(extra)
    return list(request.headers.raw_items())


def redact(headers: Headers) -> Headers:
    return [
        (k, "Bearer <redacted:acct>" if k.lower() == "authorization" else v) for k, v in headers
    ]


@pytest.mark.parametrize("seed", range(20))
def test_generated_client_headers_keep_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    pool = [*REMOVED_NAMES, *KEPT_NAMES, *POOL_ONLY_REMOVED_NAMES, "openai-beta"]
    client: Headers = []
    for i in range(rng.randint(0, 25)):
        name = random_case(rng, rng.choice(pool))
        value = rng.choice(
            ["responses=experimental", "keep-alive, x-codex-window-id", f"v{i}", "a=1, b=2"]
        )
        client.append((name, value))
    cred = rng.choice([None, UpstreamCredential("tok"), UpstreamCredential("tok", "acct")])
    pool_mode = rng.random() < 0.5
    out = upstream_handshake_headers(client, cred, request_id="req-1", pool_mode=pool_mode)

    removed = set(removed_header_names(client, pool_mode=pool_mode))
    bridge_own = {"authorization", "chatgpt-account-id", "openai-beta", "x-request-id"}
    kept = [(k, v) for k, v in client if k.lower() not in removed]
    assert out[: len(kept)] == kept
    assert all(k.lower() in bridge_own for k, _ in out[len(kept) :])
    counts: dict[str, int] = {}
    for k, _ in out:
        counts[k.lower()] = counts.get(k.lower(), 0) + 1
    client_counts: dict[str, int] = {}
    for k, _ in kept:
        client_counts[k.lower()] = client_counts.get(k.lower(), 0) + 1
    for name, n in counts.items():
        assert n == 1 or n == client_counts.get(name), (name, out)
    assert counts.get("authorization", 0) == (cred is not None)
    assert counts["openai-beta"] == 1 and counts["x-request-id"] == 1
    assert HTTP_ONLY_BETA not in beta_lines(out)[0].lower()
    # Through the real websockets client, the handshake passes the audit.
    assert handshake_violations(redact(library_handshake(out))) == []


# --- the audit ---------------------------------------------------------------------------

CLEAN: Headers = [
    ("Host", "chatgpt.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "CBD+uLzrJw6BM3lQxqv/bg=="),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ("session-id", "s-1"),
    ("Authorization", "Bearer <redacted:team-a>"),
    ("chatgpt-account-id", "acct-1"),
    ("OpenAI-Beta", WEBSOCKET_BETA),
    ("x-request-id", "req-1"),
]


def test_clean_handshake_has_no_violation() -> None:
    assert handshake_violations(CLEAN) == []


def test_codex_cli_websocket_capture_passes_once_redacted() -> None:
    headers = [(k, v) for k, v in capture("websocket.json")["headers"]]
    assert handshake_violations(redact(headers)) == []
    # As captured, the client's own token is in it ("Bearer <KEY>" stands for it).
    assert handshake_violations(headers) == [
        "authorization: not redacted (expected 'Bearer <redacted:...>')"
    ]


def replace(name: str, value: str | None) -> Headers:
    """CLEAN with `name`'s value replaced (None: removed), or `name` appended."""
    if value is None:
        return [(k, v) for k, v in CLEAN if k.lower() != name.lower()]
    if any(k.lower() == name.lower() for k, _ in CLEAN):
        return [(k, value if k.lower() == name.lower() else v) for k, v in CLEAN]
    return [*CLEAN, (name, value)]


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ([*CLEAN, ("content-type", "application/json")], "content-type: an HTTP framing"),
        ([*CLEAN, ("Content-Length", "12")], "content-length: an HTTP framing"),
        ([*CLEAN, ("accept", "text/event-stream")], "accept: an HTTP framing"),
        ([*CLEAN, ("Accept-Encoding", "gzip")], "accept-encoding: an HTTP framing"),
        ([*CLEAN, ("cookie", "a=b")], "cookie: an HTTP framing"),
        ([*CLEAN, ("transfer-encoding", "chunked")], "transfer-encoding: an HTTP framing"),
        ([*CLEAN, ("keep-alive", "timeout=5")], "keep-alive: a hop-by-hop"),
        ([*CLEAN, ("proxy-authorization", "Basic x")], "proxy-authorization: a hop-by-hop"),
        ([*CLEAN, ("X-Forwarded-For", "1.2.3.4")], "x-forwarded-for: a proxy"),
        ([*CLEAN, ("cf-ray", "r")], "cf-ray: a proxy"),
        ([*CLEAN, ("Sec-WebSocket-Protocol", "p")], "sec-websocket-protocol: a WebSocket"),
        ([*CLEAN, ("Host", "other")], "host: sent 2 times"),
        ([*CLEAN, ("sec-websocket-key", "k")], "sec-websocket-key: sent 2 times"),
        ([*CLEAN, ("x-request-id", "r2")], "x-request-id: sent 2 times"),
        (replace("Connection", "keep-alive, Upgrade"), "connection: 'keep-alive, Upgrade'"),
        (replace("Upgrade", "h2c"), "upgrade: 'h2c'"),
        (replace("OpenAI-Beta", None), "openai-beta: missing"),
        ([*CLEAN, ("openai-beta", WEBSOCKET_BETA)], "openai-beta: sent 2 times"),
        (replace("OpenAI-Beta", "assistants=v2"), "openai-beta: no responses_websockets="),
        (replace("OpenAI-Beta", f"{WEBSOCKET_BETA}, Responses=Experimental"), "HTTP-only token"),
        (replace("Authorization", "Bearer client-token"), "authorization: not redacted"),
        (replace("Authorization", "Bearer <redacted>"), "authorization: not redacted"),
        (replace("Authorization", "Bearer <redacted:sk-abcdefghijkl>"), "authorization: carries"),
        ([*CLEAN, ("x-note", "key sk-proj-abcdefgh12")], "x-note: carries an API key"),
        ([*CLEAN, ("x-id", "eyJhbGciOi.eyJzdWIiOiIx.c2ln")], "x-id: carries an API key"),
    ],
)
def test_handshake_violation(headers: Headers, fragment: str) -> None:
    problems = handshake_violations(headers)
    assert len(problems) == 1, problems
    assert fragment in problems[0]


def test_audit_sees_the_bridge_output_without_the_library_fields() -> None:
    client = [("accept", "*/*"), ("OpenAI-Beta", "responses=experimental")]
    out = upstream_handshake_headers(client, UpstreamCredential("t"), request_id="r")
    assert handshake_violations(redact(out)) == []
    assert handshake_violations(client) == [
        "accept: an HTTP framing/content header, not allowed on a WebSocket handshake",
        "openai-beta: carries the HTTP-only token responses=experimental",
        "openai-beta: no responses_websockets= token",
    ]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("sk-abcdefgh", True),
        ("Bearer sk-proj-ABC_def-123456", True),
        ("sk-short", False),
        ("task-12345678", False),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nature-x", True),
        ("eyJonly.two", False),
        ("01a20a0c-2cb0-7f10-9eb8-be1382b0dfae", False),
    ],
)
def test_secret_detection(text: str, secret: bool) -> None:
    assert contains_secret(text) is secret
    assert contains_secret(redact_secrets(text)) is False
    assert (redact_secrets(text) != text) is secret
