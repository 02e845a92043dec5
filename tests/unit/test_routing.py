"""Which requests are bridged, and the upstream WebSocket URL."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.routing import is_bridged, upstream_url, validate_upstream_option


@pytest.mark.parametrize(
    ("method", "path", "bridged"),
    [
        ("POST", "/v1/responses", True),
        ("POST", "/backend-api/codex/responses", True),
        ("POST", "/responses", True),
        ("POST", "/v1/responses?x=1", True),
        ("POST", "/v1/responses/resp_1", False),
        ("POST", "/v1/responses/compact", False),
        ("POST", "/v1/responsesx", False),
        ("POST", "/v1/responses/", False),
        ("POST", "/v1/xresponses", False),
        ("POST", "/v1/responses/resp_1?a=/responses", False),
        ("POST", "/v1/models", False),
        ("POST", "", False),
        ("GET", "/v1/responses", False),
        ("DELETE", "/v1/responses", False),
        ("post", "/v1/responses", False),
    ],
)
def test_is_bridged(method: str, path: str, bridged: bool) -> None:
    assert is_bridged(method, path) is bridged


@pytest.mark.parametrize(
    ("scheme", "host", "port", "path", "url"),
    [
        (
            "https",
            "chatgpt.com",
            443,
            "/backend-api/codex/responses",
            "wss://chatgpt.com/backend-api/codex/responses",
        ),
        ("http", "127.0.0.1", 80, "/v1/responses", "ws://127.0.0.1/v1/responses"),
        ("http", "127.0.0.1", 8080, "/v1/responses", "ws://127.0.0.1:8080/v1/responses"),
        (
            "https",
            "api.openai.com",
            8443,
            "/v1/responses",
            "wss://api.openai.com:8443/v1/responses",
        ),
        ("https", "api.openai.com", 80, "/v1/responses", "wss://api.openai.com:80/v1/responses"),
        ("http", "::1", 9000, "/v1/responses", "ws://[::1]:9000/v1/responses"),
        ("https", "2001:db8::2", 443, "/v1/responses", "wss://[2001:db8::2]/v1/responses"),
        ("https", "[::1]", 443, "/v1/responses", "wss://[::1]/v1/responses"),
        (
            "https",
            "h",
            443,
            "/v1/responses?api-version=2&x=%2F",
            "wss://h/v1/responses?api-version=2&x=%2F",
        ),
        ("HTTPS", "h", 443, "/v1/responses", "wss://h/v1/responses"),
        ("ws", "h", 80, "/v1/responses", "ws://h/v1/responses"),
    ],
)
def test_flow_destination(scheme: str, host: str, port: int, path: str, url: str) -> None:
    got = upstream_url(
        option="", account_upstream=None, scheme=scheme, host=host, port=port, path=path
    )
    assert got == url


@pytest.mark.parametrize(
    ("option", "account_upstream", "path", "url"),
    [
        (
            "wss://api.openai.com/v1/responses",
            None,
            "/x/responses",
            "wss://api.openai.com/v1/responses",
        ),
        ("wss://api.openai.com", None, "/v1/responses", "wss://api.openai.com/v1/responses"),
        (
            "wss://api.openai.com/",
            None,
            "/v1/responses?a=1",
            "wss://api.openai.com/v1/responses?a=1",
        ),
        ("https://api.openai.com", None, "/v1/responses", "wss://api.openai.com/v1/responses"),
        (
            "http://127.0.0.1:9000/v1/responses",
            None,
            "/p/responses",
            "ws://127.0.0.1:9000/v1/responses",
        ),
        ("ws://[::1]:9000", None, "/v1/responses", "ws://[::1]:9000/v1/responses"),
        (
            "WSS://Host.example/v1/responses?k=v",
            None,
            "/p/responses",
            "wss://Host.example/v1/responses?k=v",
        ),
        ("wss://h/v1/responses#frag", None, "/p/responses", "wss://h/v1/responses"),
        ("", "wss://acct.example/v1/responses", "/p/responses", "wss://acct.example/v1/responses"),
        ("", "https://acct.example", "/v1/responses", "wss://acct.example/v1/responses"),
        (
            "wss://opt.example",
            "wss://acct.example/v1/responses",
            "/v1/responses",
            "wss://opt.example/v1/responses",
        ),
        ("", "", "/v1/responses", "wss://chatgpt.com/v1/responses"),
    ],
)
def test_configured_upstream(
    option: str, account_upstream: str | None, path: str, url: str
) -> None:
    got = upstream_url(
        option=option,
        account_upstream=account_upstream,
        scheme="https",
        host="chatgpt.com",
        port=443,
        path=path,
    )
    assert got == url


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ftp://host/v1/responses", "must be a ws://, wss://, http:// or https:// URL"),
        ("api.openai.com", "must be a ws://"),
        ("", "must be a ws://"),
        ("wss://", "has no host"),
        ("wss:///v1/responses", "has no host"),
        ("wss://host:notaport/v1", "invalid port"),
        ("wss://host:70000/v1", "invalid port"),
    ],
)
def test_invalid_upstream_values(value: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        validate_upstream_option(value)
    assert fragment in str(caught.value)
    if value:
        with pytest.raises(ValueError) as again:
            upstream_url(
                option=value, account_upstream=None, scheme="https", host="h", port=443, path="/"
            )
        assert fragment in str(again.value)


@pytest.mark.parametrize(
    "value",
    ["wss://api.openai.com", "ws://127.0.0.1:1/v1/responses", "https://h", "http://[::1]:80/"],
)
def test_valid_upstream_values(value: str) -> None:
    validate_upstream_option(value)


def test_unmappable_flow_scheme() -> None:
    with pytest.raises(ValueError, match="'ftp'"):
        upstream_url(option="", account_upstream=None, scheme="ftp", host="h", port=21, path="/")
