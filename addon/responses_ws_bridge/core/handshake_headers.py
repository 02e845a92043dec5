"""The upstream WebSocket handshake headers, and an audit of a handshake.

Only WebSocket-safe headers go upstream: HTTP framing, hop-by-hop, proxy and
client-credential fields are removed, the bridge's own credential is placed
deliberately, and exactly one `OpenAI-Beta` carries the WebSocket beta token,
never the HTTP one. `handshake_violations` checks a handshake as it was sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from responses_ws_bridge.core import http_fields

WEBSOCKET_BETA = "responses_websockets=2026-02-06"
HTTP_ONLY_BETA = "responses=experimental"
_WS_BETA_PREFIX = "responses_websockets="

# What each removed field is, for the audit's messages.
_FRAMING = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-length",
        "content-encoding",
        "cookie",
        "transfer-encoding",
        "expect",
        "te",
        "trailer",
    }
)
# RFC 9110 §7.6.1 and RFC 2616 §13.5.1.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "upgrade",
    }
)
_PROXY_TRAIL = frozenset({"forwarded", "x-real-ip", "host"})
# The bridge writes these itself, once each, so the client's never pass.
_REPLACED = frozenset({"authorization", "chatgpt-account-id", "openai-beta", "x-request-id"})
_REMOVED = _FRAMING | _HOP_BY_HOP | _PROXY_TRAIL | _REPLACED
# With an account pool the account decides who pays and authenticates: a
# client's billing scope or its own key never goes next to the account's token.
POOL_ONLY_REMOVED = frozenset({"openai-organization", "openai-project", "x-api-key", "api-key"})
_REMOVED_PREFIXES = ("sec-websocket-", "x-forwarded-", "cf-")

# Written by the WebSocket library itself, exactly once (RFC 6455 §4.1).
LIBRARY_FIELDS = (
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
)

# A left boundary keeps words such as "task-12345678" from looking like keys.
_SECRET = re.compile(
    r"(?<![A-Za-z0-9_-])(?:sk-[A-Za-z0-9_-]{8,}"
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)"
)
_REDACTED_BEARER = re.compile(r"Bearer <redacted:[^<>]*>")


@dataclass(frozen=True)
class UpstreamCredential:
    """What the bridge authenticates upstream with: the token, without "Bearer "."""

    bearer: str
    chatgpt_account_id: str | None = None

    def __repr__(self) -> str:
        # Reprs end up in logs and tracebacks; the token must not.
        return (
            f"UpstreamCredential(bearer=<redacted>, chatgpt_account_id={self.chatgpt_account_id!r})"
        )


def redact_secrets(text: str) -> str:
    """`text` with API keys and JWT-looking tokens replaced by `<redacted>`."""
    return _SECRET.sub("<redacted>", text)


def contains_secret(text: str) -> bool:
    return _SECRET.search(text) is not None


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _token_key(token: str) -> str:
    # "Responses = Experimental" and "responses=experimental" are one token.
    return "".join(token.lower().split())


def normalize_beta(values: Iterable[str]) -> str:
    """All client OpenAI-Beta values merged into the one value that goes upstream."""
    kept: list[str] = []
    seen: set[str] = set()
    has_ws = False
    for token in _tokens(values):
        key = _token_key(token)
        if key == HTTP_ONLY_BETA or key in seen:
            continue
        if key.startswith(_WS_BETA_PREFIX):
            # The client knows which WebSocket protocol it speaks: its token wins.
            if has_ws:
                continue
            has_ws = True
        seen.add(key)
        kept.append(token)
    if not has_ws:
        kept.append(WEBSOCKET_BETA)
    return ", ".join(kept)


def _connection_named(client_headers: Sequence[tuple[str, str]]) -> frozenset[str]:
    return frozenset(
        t.lower() for k, v in client_headers if k.lower() == "connection" for t in _tokens([v])
    )


def _is_removed(name: str, connection_named: frozenset[str]) -> bool:
    low = name.lower()
    # RFC 9110 §7.6.1: a field named in Connection belongs to the client's hop
    # only, so it is not forwarded even when it is one we would otherwise keep.
    return low in _REMOVED or low in connection_named or low.startswith(_REMOVED_PREFIXES)


def upstream_handshake_headers(
    client_headers: Sequence[tuple[str, str]],
    credential: UpstreamCredential | None,
    *,
    request_id: str,
    pool_mode: bool = True,
) -> list[tuple[str, str]]:
    """The extra headers for the upstream handshake, in order.

    The WebSocket library adds Host, Upgrade, Connection and Sec-WebSocket-*
    itself. `credential` is the account's (pool mode) or the client's own
    (pass-through mode), or None when there is none to send. `pool_mode`
    False keeps the client's OpenAI-Organization, OpenAI-Project, x-api-key
    and api-key, which are the client's business only when the credential is
    its own; the default is the safe one.
    """
    named = _connection_named(client_headers)
    if pool_mode:
        named = named | POOL_ONLY_REMOVED
    out = [(k, v) for k, v in client_headers if not _is_removed(k, named)]
    if credential is not None:
        out.append(("Authorization", f"Bearer {credential.bearer}"))
        if credential.chatgpt_account_id:
            out.append(("chatgpt-account-id", credential.chatgpt_account_id))
    betas = http_fields.values(client_headers, "openai-beta")
    out.append(("OpenAI-Beta", normalize_beta(betas)))
    out.append(("x-request-id", request_id))
    return out


def client_request_id(client_headers: Sequence[tuple[str, str]]) -> str | None:
    """The client's own x-request-id (the first non-empty one), if it sent one."""
    for k, v in client_headers:
        if k.lower() == "x-request-id" and v.strip():
            return v.strip()
    return None


def removed_header_names(
    client_headers: Sequence[tuple[str, str]], *, pool_mode: bool = True
) -> list[str]:
    """The client fields not passed upstream as they were (lower-case, once each)."""
    named = _connection_named(client_headers)
    if pool_mode:
        named = named | POOL_ONLY_REMOVED
    out: list[str] = []
    for k, _ in client_headers:
        low = k.lower()
        if _is_removed(low, named) and low not in out:
            out.append(low)
    return out


def _why_removed(low: str) -> str:
    if low in _FRAMING:
        return "an HTTP framing/content header"
    if low in _HOP_BY_HOP:
        return "a hop-by-hop header"
    if low.startswith("sec-websocket-"):
        return "a WebSocket field the library did not write"
    return "a proxy/forwarding header"


def handshake_violations(headers: Sequence[tuple[str, str]]) -> list[str]:
    """What is wrong with a handshake as sent on the wire (for audits); [] when nothing."""
    counts: dict[str, int] = {}
    for k, _ in headers:
        counts[k.lower()] = counts.get(k.lower(), 0) + 1
    problems = [
        f"{name}: sent {counts[name]} times (at most once)"
        for name in (*LIBRARY_FIELDS, "authorization", "chatgpt-account-id", "x-request-id")
        if counts.get(name, 0) > 1
    ]
    for k, v in headers:
        problems += _field_violations(k.lower(), v)
    return problems + _beta_violations(http_fields.values(headers, "openai-beta"))


def _field_violations(low: str, value: str) -> list[str]:
    """What is wrong with one handshake field: its name, then its value."""
    problems: list[str] = []
    if low == "connection":
        if [t.lower() for t in _tokens([value])] != ["upgrade"]:
            problems.append(f"connection: {value!r} (must be just 'Upgrade')")
    elif low == "upgrade":
        if value.strip().lower() != "websocket":
            problems.append(f"upgrade: {value!r} (must be 'websocket')")
    elif low not in LIBRARY_FIELDS and low not in _REPLACED and _is_removed(low, frozenset()):
        problems.append(f"{low}: {_why_removed(low)}, not allowed on a WebSocket handshake")
    if low == "authorization" and not _REDACTED_BEARER.fullmatch(value.strip()):
        problems.append("authorization: not redacted (expected 'Bearer <redacted:...>')")
    elif contains_secret(value):
        problems.append(f"{low}: carries an API key or token in clear")
    return problems


def _beta_violations(betas: list[str]) -> list[str]:
    if not betas:
        return ["openai-beta: missing (needs a responses_websockets= token)"]
    problems = []
    if len(betas) > 1:
        problems.append(f"openai-beta: sent {len(betas)} times (exactly once)")
    keys = [_token_key(t) for t in _tokens(betas)]
    if HTTP_ONLY_BETA in keys:
        problems.append("openai-beta: carries the HTTP-only token responses=experimental")
    if not any(t.startswith(_WS_BETA_PREFIX) for t in keys):
        problems.append("openai-beta: no responses_websockets= token")
    return problems
