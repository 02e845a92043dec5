"""Recorded upstream WebSocket sessions, read from flow files, and how to compare to them.

A session is any WebSocket flow (or rejected WebSocket handshake) in a
mitmproxy flow file: the bridge's own recordings (metadata role "upstream")
and plain `mitmdump -w` captures of a client talking WebSocket to a server.
The comparison functions are pure: they take what was recorded and what
arrived, and return every deviation, precisely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy import io as mitm_io

# Values that differ on every run by design: compared as absent.
VOLATILE_HEADERS = frozenset({"host", "sec-websocket-key", "x-request-id", "authorization"})
_REDACTED_ACCOUNT = re.compile(r"^Bearer <redacted:([^>]*)>$")


@dataclass(frozen=True)
class RecordedMessage:
    from_client: bool
    content: bytes
    timestamp: float

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass(frozen=True)
class RecordedSession:
    index: int
    flow_id: str
    path: str
    request_headers: tuple[tuple[str, str], ...]
    status: int | None  # None: no response was recorded (connect failure)
    reason: str = ""
    response_headers: tuple[tuple[str, str], ...] = ()
    response_body: bytes = b""
    messages: tuple[RecordedMessage, ...] = ()
    close_code: int | None = None
    close_reason: str = ""
    closed_by_client: bool | None = None
    start: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def account(self) -> str | None:
        """The account of a bridge recording, from `Bearer <redacted:ID>`."""
        return account_from_authorization(_first(self.request_headers, "authorization"))

    @property
    def servable(self) -> bool:
        return self.status is not None


@dataclass(frozen=True)
class Deviation:
    session: int
    field: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        return (
            f"session {self.session + 1}: {self.field}: expected {self.expected!r}, "
            f"got {self.got!r}"
        )


def account_from_authorization(value: str | None) -> str | None:
    if value is None:
        return None
    match = _REDACTED_ACCOUNT.match(value.strip())
    return match.group(1) if match else None


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _is_websocket_session(flow: http.HTTPFlow) -> bool:
    role = flow.metadata.get("responses_bridge", {}).get("role")
    if role == "client":
        return False
    if role == "upstream" or flow.websocket is not None:
        return True
    upgrade: str = flow.request.headers.get("upgrade", "")
    return upgrade.lower() == "websocket"


def sessions_from_flows(flows: Iterable[object]) -> list[RecordedSession]:
    chosen = sorted(
        (f for f in flows if isinstance(f, http.HTTPFlow) and _is_websocket_session(f)),
        key=lambda f: f.request.timestamp_start,
    )
    return [_session(i, f) for i, f in enumerate(chosen)]


def load_sessions(paths: Iterable[str | Path]) -> list[RecordedSession]:
    """Every WebSocket session in the flow files, in recorded order."""
    flows: list[object] = []
    for path in paths:
        with open(path, "rb") as f:
            flows.extend(mitm_io.FlowReader(f).stream())
    return sessions_from_flows(flows)


def _session(index: int, flow: http.HTTPFlow) -> RecordedSession:
    request = flow.request
    response = flow.response
    websocket = flow.websocket
    return RecordedSession(
        index=index,
        flow_id=flow.id,
        path=request.path,
        request_headers=tuple(request.headers.items(multi=True)),
        status=response.status_code if response is not None else None,
        reason=response.reason if response is not None else "",
        response_headers=tuple(response.headers.items(multi=True)) if response else (),
        response_body=(response.raw_content or b"") if response is not None else b"",
        messages=tuple(
            RecordedMessage(m.from_client, m.content, m.timestamp) for m in websocket.messages
        )
        if websocket is not None
        else (),
        close_code=websocket.close_code if websocket is not None else None,
        close_reason=(websocket.close_reason or "") if websocket is not None else "",
        closed_by_client=websocket.closed_by_client if websocket is not None else None,
        start=request.timestamp_start,
        meta=dict(flow.metadata.get("responses_bridge", {})),
    )


# -- comparisons (pure) ------------------------------------------------------


def comparable_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The handshake fields that must match a recording, lower-cased and sorted."""
    return sorted((k.lower(), v) for k, v in headers if k.lower() not in VOLATILE_HEADERS)


def handshake_deviations(
    session: RecordedSession,
    *,
    path: str,
    headers: Sequence[tuple[str, str]],
    account: str | None,
    check_account: bool,
) -> list[Deviation]:
    out: list[Deviation] = []
    i = session.index
    if path != session.path:
        out.append(Deviation(i, "path", session.path, path))
    if check_account and account != session.account:
        out.append(Deviation(i, "account", session.account, account))
    expected = comparable_headers(session.request_headers)
    got = comparable_headers(headers)
    for name in sorted({k for k, _ in expected} | {k for k, _ in got}):
        want = [v for k, v in expected if k == name]
        have = [v for k, v in got if k == name]
        if want == have:
            continue
        field_name = "header openai-beta" if name == "openai-beta" else f"header {name}"
        out.append(Deviation(i, field_name, _one(want), _one(have)))
    return out


def _one(values: list[str]) -> str | list[str] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def message_deviations(session_index: int, number: int, expected: str, got: str) -> list[Deviation]:
    """Field-by-field differences between a recorded and an incoming client message."""
    where = f"message {number}"
    try:
        want, have = json.loads(expected), json.loads(got)
    except ValueError:
        return [] if expected == got else [Deviation(session_index, where, expected, got)]
    return [
        Deviation(session_index, f"{where} {path}", a, b) for path, a, b in _diff(want, have, "")
    ]


def _diff(want: Any, have: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(want, dict) and isinstance(have, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(want) + [k for k in have if k not in want]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in have:
                out.append((sub, want[key], "<missing>"))
            elif key not in want:
                out.append((sub, "<absent>", have[key]))
            else:
                out += _diff(want[key], have[key], sub)
        return out
    if isinstance(want, list) and isinstance(have, list) and len(want) == len(have):
        out = []
        for n, (a, b) in enumerate(zip(want, have, strict=True)):
            out += _diff(a, b, f"{path}[{n}]")
        return out
    return [] if want == have else [(path or "<message>", want, have)]
