"""Recorded upstream WebSocket sessions served again, with every deviation reported.

`load_sessions` reads mitmproxy flow files: the bridge's own upstream flows
(`recording.session_flows`) and plain captures of a real client talking
WebSocket to a real server (`mitmdump -w`). `ReplayServer` is a real `websockets` server
on 127.0.0.1 that answers the i-th incoming handshake as recorded session i
did (the 101 with its headers, or the rejection with its status and body),
then plays the session back: it waits for each recorded client message and
compares it, sends each recorded server message, and ends as the recording
ended (close code and reason, the client's close, or an abrupt drop).

What the incoming client does differently from the recording becomes a
`Deviation`. The comparisons and the replay plan are pure functions
(`compare_handshake`, `compare_message`, `diff_json`, `replay_steps`);
the server only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mitmproxy import exceptions, http
from mitmproxy import io as mitmio
from mitmproxy.flow import Flow
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response

from responses_ws_bridge.core import http_fields
from responses_ws_bridge.core.openai_errors import error_body
from responses_ws_bridge.core.redaction import CLIENT_ACCOUNT, account_from_authorization
from responses_ws_bridge.local.http_side import HttpAnswer, HttpRequest, sniffing
from responses_ws_bridge.local.loop_thread import LoopThread, WebSocketServerContext
from responses_ws_bridge.recording.session_flows import METADATA_KEY, TRANSPORT_HTTP

# Differ on every connection by design; Authorization is compared as the account.
VOLATILE_HEADERS = frozenset({"host", "sec-websocket-key", "x-request-id", "authorization"})
BETA_HEADER = "openai-beta"
_TOKEN_HEADERS = frozenset({"connection", "upgrade"})
# Fields of a recorded 101 that the WebSocket library writes itself, or that
# belong to the recorded connection only.
_HANDSHAKE_RESPONSE_FIELDS = frozenset(
    {
        "connection",
        "upgrade",
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "content-length",
        "transfer-encoding",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
    }
)
_REJECTION_DROPPED = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection"}
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN = 200

DeviationKind = Literal["changed", "added", "missing", "unexpected", "closed_early"]


# -- recorded sessions


class FlowFileError(Exception):
    """A flow file could not be read."""


@dataclass(frozen=True)
class RecordedMessage:
    from_client: bool
    is_text: bool
    content: bytes
    timestamp: float

    def preview(self) -> str:
        text = self.content.decode("utf-8", "replace") if self.is_text else repr(self.content)
        return _clip(text, 80)


@dataclass(frozen=True)
class RecordedSession:
    """One recorded WebSocket handshake and what followed it."""

    source: str
    flow_id: str
    # "upstream" for the bridge's own recordings, "capture" for plain ones.
    role: str
    path: str
    request_headers: tuple[tuple[str, str], ...]
    started: float
    # None: the connection never got an answer (DNS, refused, timeout, TLS).
    status: int | None = None
    reason: str = ""
    response_headers: tuple[tuple[str, str], ...] = ()
    response_body: bytes = b""
    answered: float | None = None
    messages: tuple[RecordedMessage, ...] = ()
    close_code: int | None = None
    close_reason: str = ""
    closed_by_client: bool | None = None
    ended: float | None = None
    error: str | None = None
    # A socket recorded one flow per turn: the first segment's flow id, and this one's index.
    socket: str | None = None
    segment: int = 0

    @property
    def servable(self) -> bool:
        return self.status is not None

    @property
    def label(self) -> str:
        return f"flow {self.flow_id[:8]} in {self.source}"

    def outline(self) -> str:
        """What the session did, in a few words."""
        if self.status is None:
            return f"no response ({self.error or 'connection failed'})"
        if self.status != 101:
            return f"rejected {self.status} {self.reason}".rstrip()
        sent = sum(1 for m in self.messages if m.from_client)
        words = f"101, {sent} client + {len(self.messages) - sent} server messages, "
        if self.closed_by_client is None and self.close_code is None:
            return words + "recording ends open"
        who = "client" if self.closed_by_client else "server"
        if self.close_code in (None, CloseCode.ABNORMAL_CLOSURE):
            return words + f"{who} dropped the connection (1006)"
        reason = f" {json.dumps(self.close_reason)}" if self.close_reason else ""
        return words + f"{who} closed {self.close_code}{reason}"


def _str_fields(headers: http.Headers) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
        for k, v in headers.fields
    )


def _is_upgrade(headers: http.Headers) -> bool:
    return any(t.strip().lower() == "websocket" for t in headers.get_all("upgrade"))


def session_from_flow(flow: Flow, source: str) -> RecordedSession | None:
    """The recorded session in a flow; None for flows that are not one."""
    if not isinstance(flow, http.HTTPFlow):
        return None
    meta = flow.metadata.get(METADATA_KEY)
    role = meta.get("role") if isinstance(meta, dict) else None
    if role == "client":
        return None
    if role != "upstream" and not _is_upgrade(flow.request.headers):
        return None
    if isinstance(meta, dict) and meta.get("transport") == TRANSPORT_HTTP:
        return None  # a forwarded HTTP exchange (`exchange_from_flow`)
    request = flow.request
    session = RecordedSession(
        source=source,
        flow_id=flow.id,
        role="upstream" if role == "upstream" else "capture",
        path=request.path,
        request_headers=_str_fields(request.headers),
        started=request.timestamp_start,
        error=flow.error.msg if flow.error else None,
    )
    response = flow.response
    if response is None:
        return session
    ws = flow.websocket
    messages = tuple(
        RecordedMessage(m.from_client, m.is_text, m.content, m.timestamp)
        for m in (ws.messages if ws is not None and response.status_code == 101 else ())
    )
    ended = ws.timestamp_end if ws is not None else None
    # A turn's flow whose socket carried on: the socket did not close there.
    carried_on = isinstance(meta, dict) and bool(meta.get("socket_open"))
    closed = ws is not None and not carried_on
    return RecordedSession(
        source=source,
        flow_id=flow.id,
        role=session.role,
        path=session.path,
        request_headers=session.request_headers,
        started=session.started,
        status=response.status_code,
        reason=response.reason,
        response_headers=_str_fields(response.headers),
        response_body=response.raw_content or b"",
        answered=response.timestamp_end or response.timestamp_start,
        messages=messages,
        close_code=ws.close_code if closed and ws is not None else None,
        close_reason=(ws.close_reason or "") if closed and ws is not None else "",
        closed_by_client=ws.closed_by_client if closed and ws is not None else None,
        ended=ended,
        error=session.error,
        socket=str(meta["socket"]) if isinstance(meta, dict) and meta.get("socket") else None,
        segment=int(meta.get("segment", 0)) if isinstance(meta, dict) else 0,
    )


def load_sessions(paths: Iterable[str | Path]) -> list[RecordedSession]:
    """Every recorded WebSocket session in the files, in recorded order.

    Raises FlowFileError when a file cannot be read or is not a flow file.
    """
    found = _read_flows(paths, session_from_flow)
    # sorted() is stable: flows recorded at the same instant keep file order.
    return merge_segments(sorted(found, key=lambda s: s.started))


def _read_flows[T](paths: Iterable[str | Path], take: Callable[[Flow, str], T | None]) -> list[T]:
    """What `take` makes of each flow of the files (None: skipped), in file order.

    Raises FlowFileError when a file cannot be read or is not a flow file.
    """
    found: list[T] = []
    for path in paths:
        try:
            with open(path, "rb") as fp:
                for flow in mitmio.FlowReader(fp).stream():
                    item = take(flow, str(path))
                    if item is not None:
                        found.append(item)
        except OSError as exc:
            raise FlowFileError(f"{path}: {exc.strerror or exc}") from exc
        except exceptions.FlowReadException as exc:
            raise FlowFileError(f"{path}: not a readable flow file ({exc})") from exc
    return found


@dataclass(frozen=True)
class RecordedExchange:
    """One forwarded HTTP exchange the bridge recorded (compaction, models, …)."""

    source: str
    flow_id: str
    method: str
    path: str
    request_headers: tuple[tuple[str, str], ...]
    request_body: bytes
    started: float
    # None: the exchange got no answer.
    status: int | None = None
    reason: str = ""
    response_headers: tuple[tuple[str, str], ...] = ()
    response_body: bytes = b""

    @property
    def label(self) -> str:
        return f"flow {self.flow_id[:8]} in {self.source}"


def exchange_from_flow(flow: Flow, source: str) -> RecordedExchange | None:
    """The forwarded exchange in a flow; None for flows that are not one."""
    if not isinstance(flow, http.HTTPFlow):
        return None
    meta = flow.metadata.get(METADATA_KEY)
    if not isinstance(meta, dict) or meta.get("transport") != TRANSPORT_HTTP:
        return None
    request, response = flow.request, flow.response
    return RecordedExchange(
        source=source,
        flow_id=flow.id,
        method=request.method,
        path=request.path,
        request_headers=_str_fields(request.headers),
        request_body=request.raw_content or b"",
        started=request.timestamp_start,
        status=response.status_code if response is not None else None,
        reason=response.reason if response is not None else "",
        response_headers=_str_fields(response.headers) if response is not None else (),
        response_body=(response.raw_content or b"") if response is not None else b"",
    )


def load_exchanges(paths: Iterable[str | Path]) -> list[RecordedExchange]:
    """Every recorded forwarded exchange in the files, in recorded order."""
    return sorted(_read_flows(paths, exchange_from_flow), key=lambda e: e.started)


def merge_segments(sessions: Sequence[RecordedSession]) -> list[RecordedSession]:
    """Joins the per-turn flows of one socket back into the one session it was.

    `sessions` in start order; a merged session keeps its first segment's place
    and handshake, every segment's messages in order, and the last one's end.
    """
    merged: list[RecordedSession] = []
    where: dict[str, int] = {}
    for session in sessions:
        index = where.get(session.socket) if session.socket is not None else None
        if index is None:
            if session.socket is not None:
                where[session.socket] = len(merged)
            merged.append(session)
            continue
        head = merged[index]
        merged[index] = replace(
            head,
            messages=head.messages + session.messages,
            close_code=session.close_code,
            close_reason=session.close_reason,
            closed_by_client=session.closed_by_client,
            ended=session.ended,
            segment=session.segment,
        )
    return merged


# -- deviations


@dataclass(frozen=True)
class Deviation:
    """One difference between the incoming client and the recording."""

    session_index: int
    field: str
    expected: Any
    got: Any
    kind: DeviationKind = "changed"
    # What the index counts: WebSocket sessions, or forwarded HTTP exchanges.
    of: str = "session"

    @property
    def message(self) -> str:
        where = f"{self.of} {self.session_index}: {self.field}"
        match self.kind:
            case "added":
                return f"{where} added: {_show(self.got)}"
            case "missing":
                return f"{where} missing: expected {_show(self.expected)}"
            case "unexpected":
                return f"{where} unexpected: {_show(self.got)}"
            case "closed_early":
                return (
                    f"{where}: the client closed early ({self.got}) "
                    f"where the recording has {self.expected}"
                )
            case _:
                return f"{where} changed: expected {_show(self.expected)}, got {_show(self.got)}"

    def __str__(self) -> str:
        return self.message


def _clip(text: str, limit: int = _SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return _clip(repr(value))
    try:
        return _clip(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return _clip(repr(value))


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def diff_json(expected: Any, got: Any, path: str) -> list[tuple[str, DeviationKind, Any, Any]]:
    """(JSON path, kind, expected, got) of every difference, depth first."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out: list[tuple[str, DeviationKind, Any, Any]] = []
        for key, value in expected.items():
            where = _key_path(path, str(key))
            if key not in got:
                out.append((where, "missing", value, None))
            else:
                out.extend(diff_json(value, got[key], where))
        for key, value in got.items():
            if key not in expected:
                out.append((_key_path(path, str(key)), "added", None, value))
        return out
    if isinstance(expected, list) and isinstance(got, list):
        out = []
        for i, (e, g) in enumerate(zip(expected, got, strict=False)):
            out.extend(diff_json(e, g, f"{path}[{i}]"))
        for i in range(len(got), len(expected)):
            out.append((f"{path}[{i}]", "missing", expected[i], None))
        for i in range(len(expected), len(got)):
            out.append((f"{path}[{i}]", "added", None, got[i]))
        return out
    # 1, 1.0 and True are equal in Python but not on the wire.
    if type(expected) is not type(got) or expected != got:
        return [(path, "changed", expected, got)]
    return []


def bearer_token(authorization: str) -> str:
    return http_fields.bearer_token(authorization) or authorization.strip()


def account_label(authorization: str | None, tokens: Mapping[str, str] | None) -> str | None:
    """Which account an Authorization value stands for.

    A recorded `Bearer <redacted:ID>` names it; a clear token is looked up in
    `tokens` (token → account id). A token not in the map, or any token when
    there is no map, is the client's own credential: `CLIENT_ACCOUNT`, which is
    how the recorder redacts it too. None: no Authorization at all.
    """
    if authorization is None:
        return None
    named = account_from_authorization(authorization)
    if named is not None:
        return named
    if tokens is not None:
        return tokens.get(bearer_token(authorization), CLIENT_ACCOUNT)
    return CLIENT_ACCOUNT


def _grouped(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        low = name.lower()
        # Their tokens are case-insensitive: "upgrade" and "Upgrade" are one value.
        out.setdefault(low, []).append(value.lower() if low in _TOKEN_HEADERS else value)
    return out


def _header_value(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values)


def compare_handshake(
    index: int,
    recorded: RecordedSession,
    *,
    path: str,
    headers: Sequence[tuple[str, str]],
    tokens: Mapping[str, str] | None,
) -> list[Deviation]:
    """The differences between an incoming handshake and the recorded one."""
    out: list[Deviation] = []
    if path != recorded.path:
        out.append(Deviation(index, "path", recorded.path, path))
    want, have = _grouped(recorded.request_headers), _grouped(headers)
    expected_account = account_label(_first(want.get("authorization")), tokens)
    got_account = account_label(_first(have.get("authorization")), tokens)
    if expected_account != got_account:
        out.append(Deviation(index, "account", expected_account, got_account))
    beta_want, beta_have = want.get(BETA_HEADER), have.get(BETA_HEADER)
    if beta_want != beta_have:
        if beta_have is None:
            out.append(
                Deviation(index, BETA_HEADER, _header_value(beta_want or []), None, "missing")
            )
        elif beta_want is None:
            out.append(Deviation(index, BETA_HEADER, None, _header_value(beta_have), "added"))
        else:
            beta = (_header_value(beta_want), _header_value(beta_have))
            out.append(Deviation(index, BETA_HEADER, *beta))
    ignored = VOLATILE_HEADERS | {BETA_HEADER}
    for name, values in want.items():
        if name in ignored:
            continue
        if name not in have:
            out.append(Deviation(index, f"header {name}", _header_value(values), None, "missing"))
        elif have[name] != values:
            pair = (_header_value(values), _header_value(have[name]))
            out.append(Deviation(index, f"header {name}", *pair))
    for name, values in have.items():
        if name not in ignored and name not in want:
            out.append(Deviation(index, f"header {name}", None, _header_value(values), "added"))
    return out


# An exchange's framing differs by hop; its account is compared as such.
_EXCHANGE_VOLATILE = frozenset({"host", "content-length", "x-request-id", "authorization"})


def compare_exchange(
    index: int,
    recorded: RecordedExchange,
    request: HttpRequest,
    tokens: Mapping[str, str] | None,
) -> list[Deviation]:
    """The differences between an incoming forwarded request and the recorded one."""
    out: list[Deviation] = []
    for name, expected, got in (
        ("method", recorded.method, request.method),
        ("path", recorded.path, request.path),
    ):
        if expected != got:
            out.append(Deviation(index, name, expected, got, of="exchange"))
    want, have = _grouped(recorded.request_headers), _grouped(request.headers)
    accounts = (
        account_label(_first(want.get("authorization")), tokens),
        account_label(_first(have.get("authorization")), tokens),
    )
    if accounts[0] != accounts[1]:
        out.append(Deviation(index, "account", *accounts, of="exchange"))
    for name in sorted(set(want) | set(have)):
        if name in _EXCHANGE_VOLATILE or want.get(name) == have.get(name):
            continue
        before, after = want.get(name), have.get(name)
        out.append(
            Deviation(
                index,
                f"header {name}",
                _header_value(before) if before is not None else None,
                _header_value(after) if after is not None else None,
                "missing" if after is None else "added" if before is None else "changed",
                of="exchange",
            )
        )
    if recorded.request_body != request.body:
        try:
            diffs = diff_json(json.loads(recorded.request_body), json.loads(request.body), "body")
        except ValueError:
            diffs = [
                ("body", "changed", _clip(repr(recorded.request_body)), _clip(repr(request.body)))
            ]
        out += [Deviation(index, p, e, g, k, of="exchange") for p, k, e, g in diffs]
    return out


_EXCHANGE_DROPPED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def exchange_answer(recorded: RecordedExchange) -> HttpAnswer:
    """The recorded answer, as it was (its framing is the replay's own)."""
    if recorded.status is None:
        body = error_body(
            "replay: the recorded exchange got no answer",
            type_="server_error",
            code="replay_no_answer",
        )
        return HttpAnswer(502, [("Content-Type", "application/json")], body)
    headers = [(k, v) for k, v in recorded.response_headers if k.lower() not in _EXCHANGE_DROPPED]
    return HttpAnswer(recorded.status, headers, recorded.response_body)


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def compare_message(
    index: int, position: int, recorded: RecordedMessage, got: str | bytes
) -> list[Deviation]:
    """Differences between the `position`-th client message and the recorded one.

    Two JSON documents are compared field by field (`message[1].model`, ...).
    """
    where = f"message[{position}]"
    got_text = isinstance(got, str)
    if got_text != recorded.is_text:
        kinds = ("text" if recorded.is_text else "binary", "text" if got_text else "binary")
        return [Deviation(index, f"{where} frame type", *kinds)]
    data = got.encode("utf-8", "surrogateescape") if isinstance(got, str) else got
    if data == recorded.content:
        return []
    try:
        expected_doc, got_doc = json.loads(recorded.content), json.loads(data)
    except ValueError:
        shown = (recorded.preview(), _clip(data.decode("utf-8", "replace"), 80))
        return [Deviation(index, where, *shown)]
    diffs = diff_json(expected_doc, got_doc, where)
    return [Deviation(index, path, e, g, kind) for path, kind, e, g in diffs]


# -- the replay plan


@dataclass(frozen=True)
class Expect:
    """Wait for the client's `position`-th message and compare it."""

    position: int
    message: RecordedMessage


@dataclass(frozen=True)
class Send:
    message: RecordedMessage
    delay: float


@dataclass(frozen=True)
class Close:
    """The server closes; `code` None sends a close frame without a code (1005)."""

    code: int | None
    reason: str
    delay: float


@dataclass(frozen=True)
class Abort:
    """The server drops the TCP connection without a close frame."""

    delay: float


@dataclass(frozen=True)
class AwaitClose:
    """The client ends the session; `code` None: the recording ended with it open.

    `pings_unanswered`: the client gave up on its keepalive (it closed with
    1011 "keepalive ping timeout"), so the server leaves its pings unanswered,
    as the recorded upstream did, until the client closes.
    """

    code: int | None
    pings_unanswered: bool = False


Step = Expect | Send | Close | Abort | AwaitClose


def replay_steps(session: RecordedSession, speed: float | None) -> list[Step]:
    """What the server does for a session, in order, with the recorded gaps.

    A server message waits for the time that passed since the previous
    recorded event (divided by `speed`; no wait when `speed` is None).
    """
    if session.status != 101:
        return []

    def gap(now: float | None, before: float) -> float:
        if speed is None or now is None:
            return 0.0
        return max(0.0, now - before) / speed

    steps: list[Step] = []
    before = session.answered if session.answered is not None else session.started
    position = 0
    for message in session.messages:
        if message.from_client:
            steps.append(Expect(position, message))
            position += 1
        else:
            steps.append(Send(message, gap(message.timestamp, before)))
        before = message.timestamp
    code = session.close_code
    if session.closed_by_client:
        keepalive = code == CloseCode.INTERNAL_ERROR and "keepalive" in session.close_reason
        steps.append(
            AwaitClose(code if code is not None else CloseCode.ABNORMAL_CLOSURE, keepalive)
        )
    elif session.closed_by_client is None and code is None:
        steps.append(AwaitClose(None))
    elif code in (None, CloseCode.ABNORMAL_CLOSURE, CloseCode.TLS_HANDSHAKE):
        steps.append(Abort(gap(session.ended, before)))
    else:
        sent = None if code == CloseCode.NO_STATUS_RCVD else code
        steps.append(Close(sent, session.close_reason, gap(session.ended, before)))
    return steps


def _describe_step(step: Step) -> str:
    match step:
        case Expect(position=p):
            return f"message[{p}] from the client"
        case Send():
            return "a server message still to send"
        case Close(code=code):
            return (
                f"the server closing with {code if code is not None else CloseCode.NO_STATUS_RCVD}"
            )
        case Abort():
            return "the server dropping the connection"
        case AwaitClose(code=code):
            return f"the client closing with {code}"


def response_headers_101(recorded: RecordedSession) -> list[tuple[str, str]]:
    """The recorded 101 fields the replay repeats (not the handshake's own)."""
    return [
        (k, v) for k, v in recorded.response_headers if k.lower() not in _HANDSHAKE_RESPONSE_FIELDS
    ]


def rejection_response(recorded: RecordedSession) -> Response:
    """The recorded refusal of the upgrade, body and all."""
    assert recorded.status is not None and recorded.status != 101
    headers = Headers(
        [(k, v) for k, v in recorded.response_headers if k.lower() not in _REJECTION_DROPPED]
    )
    # The body is written as recorded (encoded, if it was), so its length is exact.
    headers["Content-Length"] = str(len(recorded.response_body))
    reason = recorded.reason or "Rejected"
    return Response(recorded.status, reason, headers, recorded.response_body)


# -- the server


@dataclass(frozen=True)
class ServedSession:
    """A recorded session the replay finished serving, and how its client deviated."""

    index: int
    session: RecordedSession
    deviations: int = 0

    @property
    def message(self) -> str:
        plural = "" if self.deviations == 1 else "s"
        return (
            f"served session {self.index} ({self.session.label}): {self.session.outline()}; "
            f"{self.deviations} deviation{plural}"
        )

    def __str__(self) -> str:
        return self.message


Observer = Callable[[ServedSession | Deviation], None]


@dataclass
class _Handshake:
    index: int
    deviations: list[Deviation] = field(default_factory=list)


class ReplayServer(WebSocketServerContext):
    """Serves recorded sessions on 127.0.0.1, one per incoming handshake, in order.

    `async with ReplayServer(sessions) as srv:` starts and stops it. Sessions
    that are not servable (recorded without a response) are skipped with a
    note in `notes`. `tokens` maps a clear bearer token to its account id.
    `observer` is called (in the server's loop) with each ServedSession and
    Deviation as it happens.
    """

    def __init__(
        self,
        sessions: Sequence[RecordedSession],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float | None = None,
        tokens: Mapping[str, str] | None = None,
        message_timeout: float = 10.0,
        close_timeout: float = 10.0,
        observer: Observer | None = None,
        cycle: bool = False,
        exchanges: Sequence[RecordedExchange] = (),
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.sessions = [s for s in sessions if s.servable]
        self.notes = [
            f"skipped {s.label}: not servable, recorded without a response ({s.outline()})"
            for s in sessions
            if not s.servable
        ]
        self.host = host
        self.speed = speed
        self.tokens = dict(tokens) if tokens is not None else None
        self.message_timeout = message_timeout
        self.close_timeout = close_timeout
        self.observer = observer
        # cycle: handshakes past the recording start over at the first session
        # (a fake upstream that never runs dry, e.g. for `make run`).
        self.cycle = cycle
        self.deviations: list[Deviation] = []
        self.served: list[ServedSession] = []
        # Forwarded HTTP exchanges, answered in recorded order to the plain requests that come.
        self.exchanges = list(exchanges)
        self.exchanges_served = 0
        self._requested_port = port
        self._port = 0
        self._server: Server | None = None
        self._handshakes = 0
        self._pending: dict[ServerConnection, _Handshake] = {}
        self._lock = threading.Condition()
        self._all_served: asyncio.Event | None = None

    # -- lifecycle

    async def start(self) -> None:
        self._all_served = asyncio.Event()
        if not self.sessions:
            self._all_served.set()
        self._server = await serve(
            self._serve,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            process_response=self._process_response,
            server_header=None,
            compression=None,
            ping_interval=None,
            max_size=None,
            close_timeout=self.close_timeout,
            create_connection=sniffing(self._http),
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def done(self) -> bool:
        """Whether every servable session has been served."""
        with self._lock:
            return len(self.served) >= len(self.sessions)

    async def wait_all_served(self, timeout: float | None = None) -> bool:
        """Waits (in the server's loop) until every session was served."""
        assert self._all_served is not None, "not started"
        try:
            await asyncio.wait_for(self._all_served.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def wait_served(self, count: int, timeout: float) -> bool:
        """Waits (from another thread) until `count` sessions were served."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self.served) >= count, timeout)

    # -- bookkeeping

    def _deviate(
        self, deviations: Iterable[Deviation], tally: list[Deviation] | None = None
    ) -> None:
        for deviation in deviations:
            with self._lock:
                self.deviations.append(deviation)
                self._lock.notify_all()
            if tally is not None:
                tally.append(deviation)
            if self.observer is not None:
                self.observer(deviation)

    def _finish(self, index: int, deviations: int = 0) -> None:
        served = ServedSession(index, self.sessions[index], deviations)
        with self._lock:
            self.served.append(served)
            complete = len(self.served) >= len(self.sessions)
            self._lock.notify_all()
        if self.observer is not None:
            self.observer(served)
        if complete and self._all_served is not None:
            self._all_served.set()

    # -- forwarded HTTP exchanges

    async def _http(self, request: HttpRequest) -> HttpAnswer:
        """A plain request: the next recorded exchange answers it, deviations noted."""
        with self._lock:
            index = self.exchanges_served
            self.exchanges_served += 1
        if index >= len(self.exchanges):
            got = f"{request.method} {request.path} beyond the {len(self.exchanges)} recorded"
            self._deviate([Deviation(index, "request", None, got, "unexpected", of="exchange")])
            body = error_body(
                "replay: no recorded exchange left for this request",
                type_="server_error",
                code="replay_exhausted",
            )
            return HttpAnswer(503, [("Content-Type", "application/json")], body)
        recorded = self.exchanges[index]
        self._deviate(compare_exchange(index, recorded, request, self.tokens))
        return exchange_answer(recorded)

    # -- handshake

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        index = self._handshakes
        self._handshakes += 1
        if self.cycle and self.sessions:
            index %= len(self.sessions)
        if index >= len(self.sessions):
            got = (
                f"handshake #{index} (GET {request.path}) beyond the {len(self.sessions)} recorded"
            )
            self._deviate([Deviation(index, "handshake", None, got, "unexpected")])
            body = error_body(
                "replay: no recorded session left for this handshake",
                type_="server_error",
                code="replay_exhausted",
            )
            headers = Headers([("Content-Type", "application/json")])
            headers["Content-Length"] = str(len(body))
            return Response(503, "Service Unavailable", headers, body)
        recorded = self.sessions[index]
        handshake = _Handshake(index)
        self._deviate(
            compare_handshake(
                index,
                recorded,
                path=request.path,
                headers=list(request.headers.raw_items()),
                tokens=self.tokens,
            ),
            handshake.deviations,
        )
        if recorded.status != 101:
            self._finish(index, len(handshake.deviations))
            return rejection_response(recorded)
        self._pending[connection] = handshake
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        pending = self._pending.get(connection)
        if pending is None or response.status_code != 101:
            return None
        recorded = response_headers_101(self.sessions[pending.index])
        for name in {k.lower() for k, _ in recorded}:
            # The recorded Date (say) replaces the library's own.
            if name in response.headers:
                del response.headers[name]
        for name, value in recorded:
            response.headers[name] = value
        return None

    # -- one session

    async def _serve(self, ws: ServerConnection) -> None:
        pending = self._pending.pop(ws)
        try:
            await self._play(ws, pending)
        finally:
            self._finish(pending.index, len(pending.deviations))

    async def _play(self, ws: ServerConnection, pending: _Handshake) -> None:
        index, tally = pending.index, pending.deviations
        steps = replay_steps(self.sessions[index], self.speed)
        for step in steps:
            try:
                if not await self._step(ws, pending, step):
                    return
            except ConnectionClosed as exc:
                if isinstance(step, AwaitClose):
                    return
                # The first step the client cut short says where it left.
                expected, got = _describe_step(step), _close_seen(exc)
                self._deviate([Deviation(index, "close", expected, got, "closed_early")], tally)
                return

    async def _step(self, ws: ServerConnection, pending: _Handshake, step: Step) -> bool:
        """Plays one step; False ends the session (a deviation made going on pointless)."""
        index, tally = pending.index, pending.deviations
        match step:
            case Expect(position=position, message=message):
                try:
                    got = await asyncio.wait_for(ws.recv(), self.message_timeout)
                except TimeoutError:
                    missing = Deviation(
                        index, f"message[{position}]", message.preview(), None, "missing"
                    )
                    self._deviate([missing], tally)
                    await ws.close(
                        CloseCode.POLICY_VIOLATION, "replay: expected client message not received"
                    )
                    return False
                self._deviate(compare_message(index, position, message, got), tally)
            case Send(message=message, delay=delay):
                if delay:
                    await asyncio.sleep(delay)
                await ws.send(message.content, text=message.is_text)
            case Close(code=code, reason=reason, delay=delay):
                if delay:
                    await asyncio.sleep(delay)
                if code is None:
                    async with ws.send_context():
                        ws.protocol.send_close()
                    await ws.wait_closed()
                else:
                    await ws.close(code, reason)
            case Abort(delay=delay):
                if delay:
                    await asyncio.sleep(delay)
                if ws.transport is not None:
                    ws.transport.abort()
                await ws.wait_closed()
            case AwaitClose(code=code, pings_unanswered=silent):
                if silent:
                    _stop_answering_pings(ws)
                await self._await_close(ws, pending, code)
        return True

    async def _await_close(
        self, ws: ServerConnection, pending: _Handshake, code: int | None
    ) -> None:
        index, tally = pending.index, pending.deviations
        try:
            async with asyncio.timeout(self.close_timeout):
                got = await ws.recv()
            # The recording has nothing for it: say so and end the socket now, rather
            # than leave its client waiting for an answer that will never come.
            preview = got if isinstance(got, str) else repr(got)
            self._deviate([Deviation(index, "extra message 0", None, preview, "unexpected")], tally)
            await ws.close(CloseCode.TRY_AGAIN_LATER, "replay: nothing recorded for this message")
        except ConnectionClosed as exc:
            seen = exc.rcvd.code if exc.rcvd is not None else CloseCode.ABNORMAL_CLOSURE
            if code is not None and seen != code:
                self._deviate([Deviation(index, "client close code", code, seen)], tally)
        except TimeoutError:
            expected = f"the client closing with {code}" if code is not None else "a client close"
            self._deviate([Deviation(index, "close", expected, None, "missing")], tally)
            if ws.transport is not None:
                ws.transport.abort()


def _stop_answering_pings(ws: ServerConnection) -> None:
    """The protocol answers pings itself; from now on its pongs are dropped."""
    protocol = ws.protocol
    send_frame = protocol.send_frame

    def without_pongs(frame: Frame) -> None:
        if frame.opcode is not Opcode.PONG:
            send_frame(frame)

    protocol.send_frame = without_pongs  # type: ignore[method-assign]


def _close_seen(exc: ConnectionClosed) -> str:
    if exc.rcvd is not None:
        return f"close {exc.rcvd.code} from the client"
    return "connection dropped by the client (1006)"


class ThreadedReplayServer(LoopThread[ReplayServer]):
    """A `ReplayServer` in its own event loop and daemon thread, for synchronous code."""

    def __init__(self, sessions: Sequence[RecordedSession], **kwargs: Any) -> None:
        super().__init__(ReplayServer(sessions, **kwargs), "replay-server")

    @property
    def deviations(self) -> list[Deviation]:
        with self.server._lock:
            return list(self.server.deviations)

    @property
    def served(self) -> list[ServedSession]:
        with self.server._lock:
            return list(self.server.served)

    @property
    def notes(self) -> list[str]:
        return list(self.server.notes)

    @property
    def exchanges_served(self) -> int:
        with self.server._lock:
            return self.server.exchanges_served

    def wait_served(self, count: int, timeout: float) -> bool:
        return self.server.wait_served(count, timeout)
