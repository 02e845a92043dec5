"""Who may receive an upstream turn: option, account, reverse target, allowlist, never the proxy."""

from __future__ import annotations

import json

import pytest
from responses_ws_bridge.core.upstream_trust import (
    DEFAULT_TRUSTED_UPSTREAMS,
    TRUSTED_UPSTREAMS_OPTION,
    Endpoint,
    Refused,
    Target,
    Trusted,
    decide_upstream,
    host_is_trusted,
    is_own_endpoint,
    parse_trusted_hosts,
)

PROXY = Endpoint("127.0.0.1", 8080)
# A second listener (mitmproxy takes several `--mode`s, each with its own port).
SECOND = Endpoint("127.0.0.1", 40001)
OWN = (PROXY, SECOND)


def target(url: str) -> Target:
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return Target(scheme, host.strip("[]"), int(port), "/" + path)


def decide(
    url: str,
    *,
    pool: bool = True,
    option: str = "",
    account: str | None = None,
    reverse: Endpoint | None = None,
    trusted: tuple[str, ...] = DEFAULT_TRUSTED_UPSTREAMS,
) -> Trusted | Refused:
    return decide_upstream(
        pool_mode=pool,
        option=option,
        account_upstream=account,
        target=target(url),
        reverse_target=reverse,
        trusted_hosts=trusted,
        own_endpoints=OWN,
    )


@pytest.mark.parametrize(
    ("url", "kwargs", "expected"),
    [
        # The exfiltration: a pool, nothing configured, the client picks the host.
        ("http://attacker:9000/v1/responses", {}, None),
        ("https://attacker:443/v1/responses", {}, None),
        ("https://chatgpt.com.attacker:443/v1/responses", {}, None),
        ("https://evilchatgpt.com:443/v1/responses", {}, None),
        ("https://files.chatgpt.com:443/v1/responses", {}, None),
        # Official hosts over TLS, any case, trailing dot.
        (
            "https://chatgpt.com:443/backend-api/codex/responses",
            {},
            ("wss://chatgpt.com/backend-api/codex/responses", "allowlist"),
        ),
        (
            "https://API.OpenAI.com.:443/v1/responses",
            {},
            ("wss://API.OpenAI.com./v1/responses", "allowlist"),
        ),
        # The right host in clear would still leak the token to the path.
        ("http://api.openai.com:80/v1/responses", {}, None),
        # Operator-chosen upstreams win, whatever the destination.
        (
            "http://attacker:9000/v1/responses",
            {"option": "ws://127.0.0.1:7000"},
            ("ws://127.0.0.1:7000/v1/responses", "option"),
        ),
        (
            "http://attacker:9000/v1/responses",
            {"account": "wss://api.openai.com/v1/responses"},
            ("wss://api.openai.com/v1/responses", "account"),
        ),
        # Reverse mode: the listener's configured target is the operator's choice.
        (
            "http://127.0.0.1:7000/v1/responses",
            {"reverse": Endpoint("127.0.0.1", 7000)},
            ("ws://127.0.0.1:7000/v1/responses", "reverse"),
        ),
        # ...but only that target: another destination on a reverse listener is not.
        ("http://127.0.0.1:7001/v1/responses", {"reverse": Endpoint("127.0.0.1", 7000)}, None),
        # Pass-through: the client's own credential, the client's own destination.
        (
            "http://attacker:9000/v1/responses",
            {"pool": False},
            ("ws://attacker:9000/v1/responses", "client"),
        ),
        # An empty allowlist trusts no client-chosen destination.
        ("https://chatgpt.com:443/v1/responses", {"trusted": ()}, None),
        # Subdomains only by an explicit wildcard entry.
        (
            "https://eu.api.example.com:443/v1/responses",
            {"trusted": ("*.example.com",)},
            ("wss://eu.api.example.com/v1/responses", "allowlist"),
        ),
    ],
)
def test_decision_table(
    url: str, kwargs: dict[str, object], expected: tuple[str, str] | None
) -> None:
    decision = decide(url, **kwargs)  # type: ignore[arg-type]
    if expected is None:
        assert isinstance(decision, Refused)
        body = json.loads(decision.error.body)
        assert decision.error.status == 403
        assert body["error"]["code"] == "untrusted_upstream"
    else:
        assert decision == Trusted(*expected)


def test_refusal_names_the_option_and_carries_no_destination_secret() -> None:
    decision = decide("http://attacker:9000/v1/responses")
    assert isinstance(decision, Refused)
    message = json.loads(decision.error.body)["error"]["message"]
    assert TRUSTED_UPSTREAMS_OPTION in message
    assert "bridge_upstream" in message


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        # The proxy's own listeners, in both modes.
        ("http://127.0.0.1:8080/v1/responses", {}),
        ("http://127.0.0.1:8080/v1/responses", {"pool": False}),
        ("http://localhost:40001/v1/responses", {"pool": False}),
        ("http://[::1]:8080/v1/responses", {"pool": False}),
        ("http://127.0.0.2:8080/v1/responses", {"pool": False}),
        # Even when configured: a loop is never an upstream.
        ("https://chatgpt.com:443/v1/responses", {"option": "ws://127.0.0.1:8080"}),
        ("https://chatgpt.com:443/v1/responses", {"account": "ws://localhost:40001/x"}),
        # Even as the reverse target.
        ("http://127.0.0.1:8080/v1/responses", {"reverse": PROXY}),
    ],
)
def test_the_proxy_itself_is_never_an_upstream(url: str, kwargs: dict[str, object]) -> None:
    decision = decide(url, **kwargs)  # type: ignore[arg-type]
    assert isinstance(decision, Refused)
    assert "this proxy itself" in json.loads(decision.error.body)["error"]["message"]


@pytest.mark.parametrize(
    ("host", "port", "own", "expected"),
    [
        ("127.0.0.1", 8080, [Endpoint("0.0.0.0", 8080)], True),
        ("::ffff:127.0.0.1", 8080, [Endpoint("::", 8080)], True),
        ("10.0.0.5", 8080, [Endpoint("0.0.0.0", 8080)], False),  # another machine, maybe
        ("10.0.0.5", 8080, [Endpoint("10.0.0.5", 8080)], True),  # the address it came in on
        ("127.0.0.1", 8081, [Endpoint("0.0.0.0", 8080)], False),
        ("example.com", 8080, [Endpoint("0.0.0.0", 8080)], False),
    ],
)
def test_own_endpoint(host: str, port: int, own: list[Endpoint], expected: bool) -> None:
    assert is_own_endpoint(host, port, own) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("chatgpt.com, api.openai.com", ("chatgpt.com", "api.openai.com")),
        (" Chatgpt.COM. ,,chatgpt.com", ("chatgpt.com",)),
        ("*.Example.com", ("*.example.com",)),
        ("", ()),
    ],
)
def test_parse_trusted_hosts(value: str, expected: tuple[str, ...]) -> None:
    assert parse_trusted_hosts(value) == expected


@pytest.mark.parametrize(
    "value", ["https://chatgpt.com", "chatgpt.com:443", "user@host", "a b", "*.", "*"]
)
def test_parse_trusted_hosts_refuses_what_is_not_a_host(value: str) -> None:
    with pytest.raises(ValueError, match=TRUSTED_UPSTREAMS_OPTION):
        parse_trusted_hosts(value)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", False),  # *.example.com is the subdomains, not the domain
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("aexample.com", False),
        ("", False),
    ],
)
def test_wildcard_entries(host: str, expected: bool) -> None:
    assert host_is_trusted(host, ["*.example.com"]) is expected
