"""Forwarded requests: what goes upstream, what comes back, whose an answer is, what is cached."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core import routing, upstream_trust
from responses_ws_bridge.core.answer_cache import AnswerCache
from responses_ws_bridge.core.forward_policy import (
    CLIENT_CREDENTIALS,
    CachedAnswer,
    Verdict,
    answer_headers,
    cache_key,
    cacheable,
    from_cache,
    judge,
    request_headers,
)
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.pool_routes import RouteKind

ACCOUNT = UpstreamCredential("tok-account", "acct-1")


def test_the_clients_credentials_never_go_upstream_whatever_their_case() -> None:
    client = [
        ("Authorization", "Bearer client-key"),
        ("X-API-Key", "client-key"),
        ("api-key", "client-key"),
        ("OpenAI-Organization", "org-client"),
        ("openai-project", "proj-client"),
        ("ChatGPT-Account-Id", "acct-client"),
        ("Cookie", "session=client"),
        ("authorization", "Bearer second-line"),
    ]
    out = request_headers(client, ACCOUNT)
    assert out == [("Authorization", "Bearer tok-account"), ("chatgpt-account-id", "acct-1")]
    assert {k.lower() for k, _ in client} == CLIENT_CREDENTIALS


def test_the_rest_goes_as_the_client_sent_it_in_its_order() -> None:
    client = [
        ("session-id", "s-1"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("Accept-Encoding", "gzip"),
        ("Content-Encoding", "zstd"),
        ("originator", "codex_exec"),
        ("x-codex-beta-features", "remote_compaction_v2"),
        ("User-Agent", "codex_exec/0.169.0"),
        ("x-request-id", "req-1"),
    ]
    assert request_headers(client, UpstreamCredential("t")) == [
        *client,
        ("Authorization", "Bearer t"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "Content-Length",
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Expect",
        "Forwarded",
        "X-Forwarded-For",
        "X-Real-IP",
        "CF-Connecting-IP",
        "x-named-by-connection",
    ],
)
def test_hop_by_hop_framing_and_proxy_trails_stay_on_the_clients_hop(name: str) -> None:
    client = [("Connection", "keep-alive, X-Named-By-Connection"), (name, "v"), ("session-id", "s")]
    out = request_headers(client, UpstreamCredential("t"))
    assert [k.lower() for k, _ in out] == ["session-id", "authorization"]


def test_answer_headers_lose_only_their_hop() -> None:
    upstream = [
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("Content-Encoding", "gzip"),
        ("x-codex-primary-used-percent", "42"),
        ("ETag", '"m1"'),
    ]
    assert answer_headers(upstream) == [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("x-codex-primary-used-percent", "42"),
        ("ETag", '"m1"'),
    ]


C, M, ONE, OTHER = RouteKind.COMPACT, RouteKind.MODELS, RouteKind.ONE_RESPONSE, RouteKind.OTHER
RELAY, ACCOUNT_FAULT, NOT_HERE = Verdict.RELAY, Verdict.ACCOUNT, Verdict.NOT_HERE


@pytest.mark.parametrize(
    ("kind", "status", "probing", "expected"),
    [
        (C, 200, False, RELAY),
        (C, 304, False, RELAY),
        (C, 400, False, RELAY),
        (C, 401, False, ACCOUNT_FAULT),
        (C, 403, False, ACCOUNT_FAULT),
        (C, 404, False, RELAY),
        (C, 409, False, RELAY),
        (C, 429, False, ACCOUNT_FAULT),
        (C, 500, False, ACCOUNT_FAULT),
        (C, 501, False, RELAY),
        (C, 503, False, ACCOUNT_FAULT),
        (M, 403, False, ACCOUNT_FAULT),
        (M, 200, False, RELAY),
        (ONE, 401, False, ACCOUNT_FAULT),
        (ONE, 403, False, RELAY),
        (ONE, 404, False, RELAY),
        (ONE, 404, True, NOT_HERE),
        (ONE, 403, True, RELAY),
        (ONE, 429, True, ACCOUNT_FAULT),
        (ONE, 502, True, ACCOUNT_FAULT),
        (ONE, 200, True, RELAY),
        (OTHER, 403, False, RELAY),
        (OTHER, 404, False, RELAY),
        (OTHER, 429, False, ACCOUNT_FAULT),
        (OTHER, 500, False, ACCOUNT_FAULT),
    ],
)
def test_whose_an_answer_is(kind: RouteKind, status: int, probing: bool, expected: Verdict) -> None:
    assert judge(kind, status, probing=probing) is expected


@pytest.mark.parametrize(
    ("kind", "method", "expected"),
    [
        (M, "GET", "https://h:443/v1/models?x=1"),
        (M, "HEAD", None),
        (C, "POST", None),
        (ONE, "GET", None),
        (OTHER, "GET", None),
    ],
)
def test_only_model_reads_are_shared(kind: RouteKind, method: str, expected: str | None) -> None:
    assert cache_key(kind, method, "https://h:443", "/v1/models?x=1") == expected


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [], True),
        (200, [("Cache-Control", "max-age=60")], True),
        (200, [("Cache-Control", "no-store")], False),
        (200, [("cache-control", "Private, max-age=5")], False),
        (304, [], False),
        (404, [], False),
        (500, [], False),
    ],
)
def test_what_may_be_kept(status: int, headers: list[tuple[str, str]], expected: bool) -> None:
    assert cacheable(status, headers) is expected


CACHED = CachedAnswer(200, (("content-type", "application/json"), ("ETag", '"m1"')), b"{}")


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [(None, 200), ('"m0"', 200), ('"m1"', 304), ('"m0", "m1"', 304), ("*", 304)],
)
def test_a_client_holding_the_cached_version_gets_304(
    if_none_match: str | None, status: int
) -> None:
    headers = [("If-None-Match", if_none_match)] if if_none_match else []
    answer = from_cache(CACHED, headers)
    assert answer.status == status
    if status == 304:
        assert answer.body == b"" and answer.headers == (("ETag", '"m1"'),)


def test_the_cache_keeps_answers_briefly_and_boundedly() -> None:
    now = [0.0]
    cache = AnswerCache(lambda: now[0], ttl_s=30, max_entries=2)
    cache.put("a", CACHED)
    assert cache.get("a") == CACHED
    now[0] = 29.9
    assert cache.get("a") == CACHED
    now[0] = 30.0
    assert cache.get("a") is None
    cache.put("a", CACHED)
    cache.put("b", CACHED)
    cache.put("c", CACHED)
    assert (cache.get("a"), len(cache)) == (None, 2)
    off = AnswerCache(lambda: 0.0, ttl_s=0)
    off.put("a", CACHED)
    assert off.get("a") is None


@pytest.mark.parametrize(
    ("option", "account", "scheme", "host", "port", "path", "expected"),
    [
        ("", None, "https", "chatgpt.com", 443, "/backend-api/codex/responses/compact",
         "https://chatgpt.com/backend-api/codex/responses/compact"),
        ("", None, "http", "127.0.0.1", 8000, "/v1/models?x=1", "http://127.0.0.1:8000/v1/models?x=1"),
        ("wss://api.openai.com/v1/responses", None, "http", "127.0.0.1", 1, "/v1/models",
         "https://api.openai.com/v1/models"),
        ("", "ws://127.0.0.1:9/v1/responses", "https", "chatgpt.com", 443, "/v1/responses/r1",
         "http://127.0.0.1:9/v1/responses/r1"),
        ("ws://up:81", "wss://ignored", "https", "h", 443, "/v1/files", "http://up:81/v1/files"),
    ],
)  # fmt: skip
def test_forwarded_requests_go_to_the_origin_of_their_upstream(
    option: str, account: str | None, scheme: str, host: str, port: int, path: str, expected: str
) -> None:
    got = routing.forward_url(
        option=option, account_upstream=account, scheme=scheme, host=host, port=port, path=path
    )
    assert got == expected


OWN = (upstream_trust.Endpoint("127.0.0.1", 8080),)


@pytest.mark.parametrize(
    ("target", "option", "own_upstreams", "refused"),
    [
        (upstream_trust.Target("https", "chatgpt.com", 443, "/v1/models"), "", False, None),
        (upstream_trust.Target("https", "evil.example", 443, "/v1/models"), "", False, 403),
        (upstream_trust.Target("http", "chatgpt.com", 80, "/v1/models"), "", False, 403),
        (upstream_trust.Target("https", "evil.example", 443, "/v1/models"), "", True, None),
        (upstream_trust.Target("https", "evil.example", 443, "/"), "ws://up:1", False, None),
        (upstream_trust.Target("http", "127.0.0.1", 8080, "/v1/models"), "", True, 403),
    ],
)
def test_a_forwarded_destination_is_trusted_as_a_bridged_one(
    target: upstream_trust.Target, option: str, own_upstreams: bool, refused: int | None
) -> None:
    error = upstream_trust.refusal(
        pool_mode=True,
        option=option,
        accounts_own_upstreams=own_upstreams,
        target=target,
        reverse_target=None,
        trusted_hosts=upstream_trust.DEFAULT_TRUSTED_UPSTREAMS,
        own_endpoints=OWN,
    )
    assert (error.status if error is not None else None) == refused
