"""Upstream WebSocket sessions as mitmproxy flows, built step by step.

The bridge opens its upstream connections itself, so mitmproxy never sees
them. These functions build the `HTTPFlow` mitmproxy would have made for such a
session (the handshake as sent, the 101 or rejection as received, every
message, the close) so that it shows in mitmweb beside the client flow it
served and is saved by `-w`.

A socket kept open between turns is recorded as one flow per turn (a
*segment*): the turn's flow ends, and is saved, when the turn does, and the
next turn on the socket starts a new one with the same handshake. So an idle
socket holds no recorded messages, whatever the number of turns it served.
Segments carry `socket` (the first segment's flow id) and `segment` (0, 1, …)
in their metadata, and `socket_open` when the socket lived on after them;
`replay.merge_segments` joins them back into one session.

Credentials are redacted as they are recorded (`responses_ws_bridge.core.redaction`).
No I/O: the caller supplies every value and timestamp and triggers
mitmproxy's hooks itself.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from mitmproxy import connection, flow, http
from mitmproxy.net.http import status_codes
from mitmproxy.websocket import WebSocketData, WebSocketMessage
from websockets.frames import CloseCode
from wsproto.frame_protocol import Opcode

from responses_ws_bridge.core.redaction import CLIENT_ACCOUNT, redact_headers, redact_text

METADATA_KEY = "responses_bridge"
# How a turn's flow ends when its socket carries on to the next turn.
SEGMENT_END_REASON = "turn over; the socket carries on in the next flow"
# What mitmproxy records for a connection that ended without a close frame.

Affinity = Literal["hard", "soft", "none"]


@dataclass(frozen=True)
class UpstreamMeta:
    """Why this upstream session exists: which account, affinity and attempt."""

    account: str | None
    affinity: Affinity
    key: str | None
    attempt: int
    reused: bool = False


def _encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _headers(fields: Sequence[tuple[str, str]]) -> http.Headers:
    return http.Headers([(_encode(k), _encode(v)) for k, v in fields])


# mitmproxy checks a message's fields as it builds one (`MessageData.__post_init__`): for
# each `X | None` field holding None it raises and catches a TypeError whose traceback
# holds its own frame, a reference cycle that keeps every frame of the stack that built
# the message alive with its locals (a turn, its flows and bodies) until Python's full
# collection. A field set to None after the check leaves no cycle.
_CHECKED_PLACEHOLDER = http.Headers()


def _response(
    *,
    status: int,
    reason: bytes,
    headers: http.Headers,
    content: bytes,
    timestamp_start: float,
    timestamp_end: float,
) -> http.Response:
    response = http.Response(
        b"HTTP/1.1",
        status,
        reason,
        headers,
        content,
        _CHECKED_PLACEHOLDER,
        timestamp_start,
        timestamp_end,
    )
    response.data.trailers = None
    return response


def make_response(status: int, content: bytes, headers: http.Headers) -> http.Response:
    """`http.Response.make(status, content, headers)` without the cycle its checks leave."""
    now = time.time()
    reason = status_codes.RESPONSES.get(status, "").encode()
    response = _response(
        status=status,
        reason=reason,
        headers=headers,
        content=b"",
        timestamp_start=now,
        timestamp_end=now,
    )
    # As `make` does: through the setter, which sets content-length.
    response.content = content
    return response


def _short(flow_id: str) -> str:
    return flow_id[:6]


def describe_upstream(meta: dict[str, Any]) -> str:
    """The one-line comment of an upstream flow, from its metadata."""
    account = meta.get("account")
    parts = ["upstream session" if meta.get("transport") != TRANSPORT_HTTP else "upstream"]
    if meta.get("route"):
        parts[0] += f" {meta['route']}"
    parts.append(f"account {account}" if account is not None else f"account {CLIENT_ACCOUNT}")
    affinity = meta.get("affinity", "none")
    key = meta.get("key")
    if affinity == "none" or key is None:
        parts.append(f"{affinity} affinity" if affinity != "none" else "no affinity")
    else:
        parts.append(f"{affinity} {key}")
    parts.append(f"attempt {meta.get('attempt')}")
    client_flow = meta.get("client_flow")
    if client_flow:
        parts.append(f"client flow {_short(str(client_flow))}")
    if meta.get("reused"):
        parts.append("reused socket")
    segment = meta.get("segment")
    if isinstance(segment, int) and segment > 0:
        parts.append(f"turn {segment + 1} on socket {_short(str(meta.get('socket')))}")

    if meta.get("connection_lost"):
        parts.append(str(meta["connection_lost"]))
    return " · ".join(parts)


def new_upstream_flow(
    *,
    url: str,
    headers: Sequence[tuple[str, str]],
    timestamp: float,
    meta: UpstreamMeta,
    client_flow_id: str | None,
    local_address: tuple[str, int] | None = None,
    secrets: Collection[str] = (),
) -> http.HTTPFlow:
    """A flow for one upstream session attempt, its handshake request recorded.

    `headers` are the handshake headers as sent on the wire, in order; they are
    recorded redacted. `local_address` is the bridge's end of the socket, when
    known.
    """
    parts = urlsplit(url)
    secure = parts.scheme.lower() in ("wss", "https")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    client = connection.Client(
        peername=local_address or ("127.0.0.1", 0),
        sockname=("127.0.0.1", 0),
        timestamp_start=timestamp,
    )
    server = connection.Server(
        address=(host, port),
        timestamp_start=timestamp,
        tls=secure,
        sni=host if secure else None,
    )
    server.state = connection.ConnectionState.OPEN
    f = http.HTTPFlow(client, server)
    f.timestamp_created = timestamp
    f.request = http.Request(
        host=host,
        port=port,
        method=b"GET",
        # mitmproxy represents ws/wss flows by their HTTP schemes.
        scheme=b"https" if secure else b"http",
        authority=b"",
        path=_encode(path),
        http_version=b"HTTP/1.1",
        headers=_headers(redact_headers(headers, account_id=meta.account, secrets=secrets)),
        content=b"",
        trailers=_CHECKED_PLACEHOLDER,
        timestamp_start=timestamp,
        timestamp_end=timestamp,
    )
    f.request.data.trailers = None
    f.websocket = WebSocketData()
    f.metadata[METADATA_KEY] = {
        "role": "upstream",
        "account": meta.account,
        "affinity": meta.affinity,
        "key": meta.key,
        "attempt": meta.attempt,
        "client_flow": client_flow_id,
        "reused": meta.reused,
    }
    f.comment = describe_upstream(f.metadata[METADATA_KEY])
    return f


# An upstream flow's metadata says what it carried: a WebSocket session (the default) or
# one forwarded HTTP exchange.
TRANSPORT_HTTP = "http"


def new_exchange_flow(
    *,
    url: str,
    method: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    timestamp: float,
    meta: UpstreamMeta,
    client_flow_id: str | None,
    route: str,
    secrets: Collection[str] = (),
) -> http.HTTPFlow:
    """A flow for one forwarded HTTP exchange (compaction, models, …), its request recorded.

    Like a session's flow (`new_upstream_flow`) without WebSocket data: the
    request as sent (headers redacted, body with known secrets cut out),
    the answer once it came (`record_exchange_answer`).
    """
    f = new_upstream_flow(
        url=url,
        headers=headers,
        timestamp=timestamp,
        meta=meta,
        client_flow_id=client_flow_id,
        secrets=secrets,
    )
    f.websocket = None
    f.request.method = method
    f.request.raw_content = _redacted_body(body, secrets)
    data = f.metadata[METADATA_KEY]
    data["transport"] = TRANSPORT_HTTP
    data["route"] = route
    f.comment = describe_upstream(data)
    return f


def record_exchange_answer(
    f: http.HTTPFlow,
    *,
    status: int,
    reason: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    timestamp: float,
    secrets: Collection[str] = (),
) -> None:
    """The upstream's whole answer to a forwarded request (a known secret in it cut out)."""
    _record_answer(f, status, reason, headers, body, timestamp, secrets)
    _end_connections(f, timestamp)


def _record_answer(
    f: http.HTTPFlow,
    status: int,
    reason: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    timestamp: float,
    secrets: Collection[str],
) -> None:
    """An upstream answer as recorded: credentials and known secrets cut out."""
    account = f.metadata.get(METADATA_KEY, {}).get("account")
    recorded = redact_headers(headers, account_id=account, secrets=secrets)
    f.response = _response(
        status=status,
        reason=_encode(reason),
        headers=_headers(recorded),
        content=_redacted_body(body, secrets),
        timestamp_start=timestamp,
        timestamp_end=timestamp,
    )
    f.server_conn.timestamp_tcp_setup = f.server_conn.timestamp_tcp_setup or timestamp


def _redacted_body(body: bytes, secrets: Collection[str]) -> bytes:
    if secrets and body:
        return _encode(redact_text(body.decode("utf-8", "surrogateescape"), secrets))
    return body


def note_reuse(f: http.HTTPFlow, *, client_flow_id: str | None, attempt: int = 1) -> None:
    """The session's socket now serves another client request (a later turn)."""
    meta = f.metadata[METADATA_KEY]
    served = meta.setdefault("client_flows", [meta["client_flow"]] if meta["client_flow"] else [])
    if client_flow_id is not None and client_flow_id not in served:
        served.append(client_flow_id)
    meta["client_flow"] = client_flow_id
    meta["attempt"] = attempt
    meta["reused"] = True
    f.comment = describe_upstream(meta)


def next_segment(
    previous_meta: dict[str, Any],
    previous_id: str,
    *,
    url: str,
    headers: Sequence[tuple[str, str]],
    timestamp: float,
    client_flow_id: str | None,
    attempt: int,
    secrets: Collection[str] = (),
) -> http.HTTPFlow:
    """The flow of a socket's next turn, after the segment `previous_id` ended.

    Its handshake request is the socket's own (`headers`, redacted as
    recorded); the caller records the socket's 101 on it again.
    """
    meta = UpstreamMeta(
        account=previous_meta.get("account"),
        affinity=previous_meta.get("affinity", "none"),
        key=previous_meta.get("key"),
        attempt=attempt,
        reused=True,
    )
    f = new_upstream_flow(
        url=url,
        headers=headers,
        timestamp=timestamp,
        meta=meta,
        client_flow_id=client_flow_id,
        secrets=secrets,
    )
    data = f.metadata[METADATA_KEY]
    data["socket"] = previous_meta.get("socket") or previous_id
    data["segment"] = int(previous_meta.get("segment", 0)) + 1
    f.comment = describe_upstream(data)
    return f


def end_segment(f: http.HTTPFlow, *, timestamp: float) -> None:
    """The turn is over and the socket carried on to the next: this segment ends here.

    The flow ends as a normal close by the bridge whose reason says what it is
    (mitmproxy reads a WebSocket flow without a close code as an error); the
    metadata's `socket_open` says the socket itself did not close, and replay
    reads the segment so. The socket's real close is its last turn's flow.
    """
    assert f.websocket is not None, "not a WebSocket flow"
    f.websocket.timestamp_end = timestamp
    f.websocket.close_code = CloseCode.NORMAL_CLOSURE
    f.websocket.close_reason = SEGMENT_END_REASON
    f.websocket.closed_by_client = True
    data = f.metadata[METADATA_KEY]
    data["socket_open"] = True
    data.setdefault("socket", f.id)
    data.setdefault("segment", 0)


def record_handshake_response(
    f: http.HTTPFlow,
    *,
    status: int,
    reason: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    timestamp: float,
    secrets: Collection[str] = (),
) -> None:
    """The upstream's answer to the upgrade: the 101, or a rejection with its body."""
    _record_answer(f, status, reason, headers, body, timestamp, secrets)
    if f.server_conn.tls:
        f.server_conn.timestamp_tls_setup = f.server_conn.timestamp_tls_setup or timestamp
    if status != 101:
        # A refused upgrade ends the connection: no WebSocket was ever open (and
        # mitmproxy's save addon keeps a flow without one at its response).
        f.websocket = None
        _end_connections(f, timestamp)


def record_message(
    f: http.HTTPFlow,
    *,
    from_client: bool,
    content: bytes | str,
    timestamp: float,
    text: bool | None = None,
    secrets: Collection[str] = (),
) -> None:
    """One message; a str is a text frame, bytes a binary one unless `text` says so."""
    assert f.websocket is not None, "not a WebSocket flow"
    is_text = isinstance(content, str) if text is None else text
    if isinstance(content, str):
        data = _encode(redact_text(content, secrets) if secrets else content)
    elif secrets and is_text:
        data = _encode(redact_text(content.decode("utf-8", "surrogateescape"), secrets))
    else:
        data = content
    opcode = Opcode.TEXT if is_text else Opcode.BINARY
    f.websocket.messages.append(WebSocketMessage(opcode, from_client, data, timestamp))


def record_close(
    f: http.HTTPFlow,
    *,
    code: int | None,
    reason: str,
    closed_by_client: bool,
    timestamp: float,
) -> None:
    """The end of the session; `code` None means it ended without a close frame.

    A 1011 the bridge sent itself is its keepalive giving up on a silent
    upstream: a lost connection, not an upstream error, and the flow says so.
    """
    assert f.websocket is not None, "not a WebSocket flow"
    if closed_by_client and code == CloseCode.INTERNAL_ERROR:
        meta = f.metadata.setdefault(METADATA_KEY, {})
        meta["connection_lost"] = "connection lost: closed 1011 by the bridge (keepalive)"
        f.comment = describe_upstream(meta)
    f.websocket.close_code = code if code is not None else CloseCode.ABNORMAL_CLOSURE
    f.websocket.close_reason = reason
    f.websocket.closed_by_client = closed_by_client
    f.websocket.timestamp_end = timestamp
    _end_connections(f, timestamp)


def record_error(f: http.HTTPFlow, message: str, *, timestamp: float | None = None) -> None:
    """The session could not be opened (DNS, refused, timeout, TLS): no response."""
    f.error = flow.Error(message) if timestamp is None else flow.Error(message, timestamp)
    f.server_conn.error = message
    _end_connections(f, f.error.timestamp)


def _end_connections(f: http.HTTPFlow, timestamp: float) -> None:
    for conn in (f.client_conn, f.server_conn):
        conn.state = connection.ConnectionState.CLOSED
        if conn.timestamp_end is None:
            conn.timestamp_end = timestamp


def record_client_attempt(
    client_flow: http.HTTPFlow,
    upstream_flow: http.HTTPFlow,
    *,
    outcome: str,
    close_code: int | None = None,
) -> None:
    """Links a client flow to one upstream attempt that served (or failed) it.

    `outcome` is a short word such as "served", "rejected 429", "closed",
    "connect failed". The client flow's account, affinity and key are those of
    its latest attempt.
    """
    upstream = upstream_flow.metadata.get(METADATA_KEY, {})
    meta = client_flow.metadata.setdefault(
        METADATA_KEY, {"role": "client", "upstream_flows": [], "attempts": []}
    )
    if upstream_flow.id not in meta["upstream_flows"]:
        meta["upstream_flows"].append(upstream_flow.id)
    meta["account"] = upstream.get("account")
    meta["affinity"] = upstream.get("affinity", "none")
    meta["key"] = upstream.get("key")
    meta["attempts"].append(
        {"account": upstream.get("account"), "outcome": outcome, "close_code": close_code}
    )
