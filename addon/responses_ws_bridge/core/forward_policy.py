"""A request the pool forwards over HTTP: what goes upstream, what comes back, what is cached.

Everything a client sends through a pool that is not carried over a
WebSocket (compaction, models, one response, the backend's side endpoints)
is forwarded by the bridge itself, with the chosen account's credential in
place of the client's. Pure functions over plain values:

- `request_headers`: the client's fields as they were, minus the client's
  credentials (`Authorization`, `x-api-key`, `api-key`, `OpenAI-Organization`,
  `OpenAI-Project`, `chatgpt-account-id`, `Cookie`), the hop-by-hop fields
  (RFC 9110 §7.6.1) and proxy trails, plus the account's `Authorization`
  and `chatgpt-account-id`. `Host` and the framing are the HTTP client's.
- `answer_headers`: the upstream's fields minus hop-by-hop and framing
  (mitmproxy frames the answer for the client's own hop).
- `judge`: whether an upstream answer is the client's (relayed as it is) or
  a failure of the account (retried as the WebSocket bridge retries):

| status            | COMPACT, MODELS | ONE_RESPONSE, OTHER | ONE_RESPONSE, owner unknown |
|-------------------|-----------------|---------------------|-----------------------------|
| 401               | ACCOUNT         | ACCOUNT             | ACCOUNT                     |
| 403               | ACCOUNT         | RELAY (the object's)| RELAY                       |
| 404               | RELAY           | RELAY               | NOT_HERE: the next account  |
| 429               | ACCOUNT         | ACCOUNT             | ACCOUNT                     |
| 5xx but 501       | ACCOUNT         | ACCOUNT             | ACCOUNT                     |
| anything else     | RELAY           | RELAY               | RELAY                       |

  An ACCOUNT answer is a `HandshakeRejected` to `retry_policy`: 401 refreshes
  the token and disables the account when that does not help, 429 cools it
  down, 5xx counts against its health; a hard session never leaves its
  owner. A 403 on an object (a file, a response) says whose it is, not that
  the account is broken.
- `cache_key`, `cacheable`, `from_cache`: `GET …/models` answers are kept
  briefly per destination, path and query (`answer_cache`), so a fleet of
  clients starting together costs one upstream call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from responses_ws_bridge.core import http_fields
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.pool_routes import RouteKind

Headers = Sequence[tuple[str, str]]

# The client's own credentials and billing scope: never forwarded next to an account's.
CLIENT_CREDENTIALS = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "openai-organization",
        "openai-project",
        "chatgpt-account-id",
        "cookie",
    }
)
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Written by the HTTP client for its own hop.
_FRAMING = frozenset({"host", "content-length", "expect"})
_PROXY_TRAIL = frozenset({"forwarded", "x-real-ip"})
_TRAIL_PREFIXES = ("x-forwarded-", "cf-")
# Every answer is framed again for the client's hop.
_ANSWER_DROPPED = _HOP_BY_HOP | {"content-length"}


class Verdict(StrEnum):
    RELAY = "relay"
    ACCOUNT = "account"
    NOT_HERE = "not_here"


def _named_by_connection(headers: Headers) -> frozenset[str]:
    return frozenset(
        token.strip().lower()
        for value in http_fields.values(headers, "connection")
        for token in value.split(",")
        if token.strip()
    )


def request_headers(
    client_headers: Headers, credential: UpstreamCredential
) -> list[tuple[str, str]]:
    """The forwarded request's fields, in the client's order, with the account's credential."""
    named = _named_by_connection(client_headers)
    out: list[tuple[str, str]] = []
    for name, value in client_headers:
        low = name.lower()
        if (
            low in CLIENT_CREDENTIALS
            or low in _HOP_BY_HOP
            or low in _FRAMING
            or low in _PROXY_TRAIL
            or low in named
            or low.startswith(_TRAIL_PREFIXES)
        ):
            continue
        out.append((name, value))
    out.append(("Authorization", f"Bearer {credential.bearer}"))
    if credential.chatgpt_account_id:
        out.append(("chatgpt-account-id", credential.chatgpt_account_id))
    return out


def answer_headers(upstream_headers: Headers) -> list[tuple[str, str]]:
    """The upstream answer's fields the client gets (its own hop's are mitmproxy's)."""
    named = _named_by_connection(upstream_headers)
    return [(k, v) for k, v in upstream_headers if k.lower() not in _ANSWER_DROPPED | named]


def judge(kind: RouteKind, status: int, *, probing: bool = False) -> Verdict:
    """Whose an upstream answer is (the module's table). `probing`: looking for the
    account that produced a response, trying each account once."""
    if status in (401, 429) or (status >= 500 and status != 501):
        return Verdict.ACCOUNT
    if status == 403 and kind in (RouteKind.COMPACT, RouteKind.MODELS):
        return Verdict.ACCOUNT
    if status == 404 and probing:
        return Verdict.NOT_HERE
    return Verdict.RELAY


# --- the models cache ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def cache_key(kind: RouteKind, method: str, origin: str, path: str) -> str | None:
    """The cache key of a request whose answer may be shared (None: never cached).

    `origin` is where the request goes (scheme, host, port), `path` keeps its query.
    """
    if kind is not RouteKind.MODELS or method != "GET":
        return None
    return f"{origin}{path}"


def cacheable(status: int, headers: Headers) -> bool:
    """A 200 whose upstream did not forbid keeping it."""
    if status != 200:
        return False
    control = ",".join(http_fields.values(headers, "cache-control")).lower()
    return "no-store" not in control and "private" not in control


def from_cache(cached: CachedAnswer, client_headers: Headers) -> CachedAnswer:
    """The cached answer for this client: a 304 when it already holds that version."""
    etag = http_fields.header(cached.headers, "etag")
    wanted = http_fields.header(client_headers, "if-none-match")
    if etag is not None and wanted is not None:
        tags = {t.strip() for t in wanted.split(",")}
        if etag.strip() in tags or "*" in tags:
            keep = [(k, v) for k, v in cached.headers if k.lower() in ("etag", "cache-control")]
            return CachedAnswer(304, tuple(keep), b"")
    return cached
