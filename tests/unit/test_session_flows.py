"""Upstream sessions as mitmproxy flows: shape, redaction, files, mitmweb's JSON."""

from __future__ import annotations

import gc
import io
import json
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitmio
from mitmproxy.test import tflow
from mitmproxy.tools.web.app import flow_to_json
from responses_ws_bridge.recording.session_flows import (
    METADATA_KEY,
    UpstreamMeta,
    describe_upstream,
    make_response,
    new_upstream_flow,
    note_reuse,
    record_client_attempt,
    record_close,
    record_error,
    record_handshake_response,
    record_message,
)
from wsproto.frame_protocol import Opcode

from tests.support.data import load_capture

SECRET = "at-team-a-0123456789"
T0 = 1_700_000_000.0


def capture_headers() -> list[tuple[str, str]]:
    """The handshake Codex CLI sent, with our account's credential in it."""
    capture = load_capture("websocket.json")
    headers = [(k, v) for k, v in capture["headers"]]
    return [(k, f"Bearer {SECRET}" if k.lower() == "authorization" else v) for k, v in headers]


def meta(**changes: Any) -> UpstreamMeta:
    base: dict[str, Any] = {
        "account": "team-a",
        "affinity": "hard",
        "key": "session:abc",
        "attempt": 2,
    }
    base.update(changes)
    return UpstreamMeta(**base)


def open_flow(
    url: str = "wss://chatgpt.com/backend-api/codex/responses",
    client_flow: http.HTTPFlow | None = None,
    **changes: Any,
) -> http.HTTPFlow:
    return new_upstream_flow(
        url=url,
        headers=capture_headers(),
        timestamp=T0,
        meta=meta(**changes),
        client_flow_id=client_flow.id if client_flow is not None else None,
        local_address=("127.0.0.1", 50123),
        secrets=[SECRET],
    )


def full_session() -> http.HTTPFlow:
    f = open_flow(client_flow=tflow.tflow())
    record_handshake_response(
        f,
        status=101,
        reason="Switching Protocols",
        headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("x-codex-turn-state", "ts")],
        body=b"",
        timestamp=T0 + 0.2,
    )
    record_message(f, from_client=True, content='{"type":"response.create"}', timestamp=T0 + 0.3)
    record_message(f, from_client=False, content='{"type":"response.created"}', timestamp=T0 + 0.5)
    record_close(f, code=1011, reason="internal error", closed_by_client=False, timestamp=T0 + 0.9)
    return f


def round_trip(*flows: http.HTTPFlow) -> list[http.HTTPFlow]:
    buffer = io.BytesIO()
    writer = mitmio.FlowWriter(buffer)
    for f in flows:
        writer.add(f)
    buffer.seek(0)
    read = list(mitmio.FlowReader(buffer).stream())
    assert all(isinstance(f, http.HTTPFlow) for f in read)
    return [f for f in read if isinstance(f, http.HTTPFlow)]


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path"),
    [
        ("wss://chatgpt.com/backend-api/codex/responses", "https", "chatgpt.com", 443,
         "/backend-api/codex/responses"),
        ("ws://127.0.0.1:8765/v1/responses?x=1&y=2", "http", "127.0.0.1", 8765,
         "/v1/responses?x=1&y=2"),
        ("wss://api.openai.com:8443", "https", "api.openai.com", 8443, "/"),
        ("ws://localhost/v1/responses", "http", "localhost", 80, "/v1/responses"),
    ],
)  # fmt: skip
def test_request_line_maps_ws_urls_to_http_schemes(
    url: str, scheme: str, host: str, port: int, path: str
) -> None:
    f = open_flow(url)
    assert (f.request.method, f.request.scheme) == ("GET", scheme)
    assert (f.request.host, f.request.port, f.request.path) == (host, port, path)
    assert f.request.http_version == "HTTP/1.1"
    assert f.server_conn.address == (host, port)
    assert f.server_conn.tls is (scheme == "https")
    assert f.websocket is not None and f.websocket.messages == []


def test_headers_are_recorded_in_order_and_redacted() -> None:
    f = open_flow()
    sent = capture_headers()
    recorded = [(k.decode(), v.decode()) for k, v in f.request.headers.fields]
    assert [k for k, _ in recorded] == [k for k, _ in sent]
    assert dict(recorded)["authorization"] == "Bearer <redacted:team-a>"
    assert SECRET not in json.dumps(recorded)
    # Everything else is as sent on the wire, library fields included.
    assert [h for h in recorded if h[0] != "authorization"] == [
        h for h in sent if h[0] != "authorization"
    ]


def test_metadata_comment_and_timestamps() -> None:
    client = tflow.tflow()
    f = open_flow(client_flow=client)
    assert f.metadata[METADATA_KEY] == {
        "role": "upstream",
        "account": "team-a",
        "affinity": "hard",
        "key": "session:abc",
        "attempt": 2,
        "client_flow": client.id,
        "reused": False,
    }
    assert f.comment == (
        f"upstream session · account team-a · hard session:abc · attempt 2 · "
        f"client flow {client.id[:6]}"
    )
    assert f.timestamp_created == f.request.timestamp_start == T0
    assert f.client_conn.peername == ("127.0.0.1", 50123)
    assert f.client_conn.timestamp_start == f.server_conn.timestamp_start == T0


@pytest.mark.parametrize(
    ("metadata", "comment"),
    [
        (
            {"account": None, "affinity": "none", "key": None, "attempt": 1},
            "upstream session · account client · no affinity · attempt 1",
        ),
        (
            {"account": "b", "affinity": "soft", "key": "cache:k", "attempt": 3, "reused": True},
            "upstream session · account b · soft cache:k · attempt 3 · reused socket",
        ),
    ],
)
def test_describe_upstream(metadata: dict[str, Any], comment: str) -> None:
    assert describe_upstream(metadata) == comment


def test_handshake_101_messages_and_close() -> None:
    f = full_session()
    assert f.response is not None and f.response.status_code == 101
    assert f.response.headers.fields[2] == (b"x-codex-turn-state", b"ts")
    assert f.response.timestamp_start == T0 + 0.2
    ws = f.websocket
    assert ws is not None
    assert [(m.type, m.from_client, m.content, m.timestamp) for m in ws.messages] == [
        (Opcode.TEXT, True, b'{"type":"response.create"}', T0 + 0.3),
        (Opcode.TEXT, False, b'{"type":"response.created"}', T0 + 0.5),
    ]
    assert (ws.close_code, ws.close_reason, ws.closed_by_client) == (1011, "internal error", False)
    assert ws.timestamp_end == f.server_conn.timestamp_end == f.client_conn.timestamp_end
    assert f.error is None


def test_rejection_keeps_status_headers_and_body_and_redacts_cookies() -> None:
    f = open_flow()
    body = json.dumps({"error": {"code": "rate_limit_exceeded", "message": "slow down"}}).encode()
    record_handshake_response(
        f,
        status=429,
        reason="Too Many Requests",
        headers=[
            ("Retry-After", "7"),
            ("Set-Cookie", "id=1"),
            ("Content-Type", "application/json"),
        ],
        body=body,
        timestamp=T0 + 0.1,
    )
    assert f.response is not None
    assert (f.response.status_code, f.response.reason) == (429, "Too Many Requests")
    assert f.response.headers.fields == (
        (b"Retry-After", b"7"),
        (b"Set-Cookie", b"<redacted>"),
        (b"Content-Type", b"application/json"),
    )
    assert f.response.content == body
    assert f.server_conn.timestamp_end == T0 + 0.1


@pytest.mark.parametrize(
    ("content", "text", "opcode", "stored"),
    [
        ("héllo", None, Opcode.TEXT, "héllo".encode()),
        (b"\x00\x01", None, Opcode.BINARY, b"\x00\x01"),
        # The upstream client hands text frames over as bytes at times.
        (b'{"a":1}', True, Opcode.TEXT, b'{"a":1}'),
        (f'{{"key":"{SECRET}"}}', None, Opcode.TEXT, b'{"key":"<redacted>"}'),
    ],
)
def test_record_message_types_and_secrets(
    content: str | bytes, text: bool | None, opcode: Opcode, stored: bytes
) -> None:
    f = open_flow()
    record_message(f, from_client=False, content=content, timestamp=T0, text=text, secrets=[SECRET])
    assert f.websocket is not None
    [message] = f.websocket.messages
    assert (message.type, message.content) == (opcode, stored)


def test_close_without_frame_is_1006() -> None:
    f = open_flow()
    record_close(f, code=None, reason="", closed_by_client=False, timestamp=T0 + 1)
    assert f.websocket is not None and f.websocket.close_code == 1006


def test_connect_failure_has_error_and_no_response() -> None:
    f = open_flow()
    record_error(f, "cannot open wss://chatgpt.com/...: connection refused", timestamp=T0 + 3)
    assert f.response is None
    assert f.error is not None and f.error.msg.endswith("connection refused")
    assert f.error.timestamp == T0 + 3
    assert f.server_conn.error == f.error.msg


def test_client_flow_links_its_attempts() -> None:
    client = tflow.tflow(resp=True)
    first = open_flow(client_flow=client, attempt=1)
    second = open_flow(client_flow=client, attempt=2)
    record_client_attempt(client, first, outcome="closed", close_code=1011)
    record_client_attempt(client, second, outcome="served")
    assert client.metadata[METADATA_KEY] == {
        "role": "client",
        "upstream_flows": [first.id, second.id],
        "account": "team-a",
        "affinity": "hard",
        "key": "session:abc",
        "attempts": [
            {"account": "team-a", "outcome": "closed", "close_code": 1011},
            {"account": "team-a", "outcome": "served", "close_code": None},
        ],
    }


def test_reused_socket_names_the_new_client_flow() -> None:
    first, later = tflow.tflow(), tflow.tflow()
    f = open_flow(client_flow=first, attempt=1)
    note_reuse(f, client_flow_id=later.id)
    data = f.metadata[METADATA_KEY]
    assert (data["client_flow"], data["reused"], data["client_flows"]) == (
        later.id,
        True,
        [first.id, later.id],
    )
    assert f.comment.endswith(f"client flow {later.id[:6]} · reused socket")


def test_flows_round_trip_through_flow_files() -> None:
    client = tflow.tflow(resp=True)
    session = full_session()
    record_client_attempt(client, session, outcome="closed", close_code=1011)
    failed = open_flow()
    record_error(failed, "timed out", timestamp=T0 + 10)
    read_session, read_failed, read_client = round_trip(session, failed, client)

    assert read_session.id == session.id
    assert read_session.request.headers.fields == session.request.headers.fields
    assert read_session.response is not None and read_session.response.status_code == 101
    assert read_session.websocket is not None and session.websocket is not None
    assert [m.get_state() for m in read_session.websocket.messages] == [
        m.get_state() for m in session.websocket.messages
    ]
    assert read_session.websocket.close_code == 1011
    assert read_session.metadata == session.metadata
    assert read_session.comment == session.comment
    assert read_failed.error is not None and read_failed.error.msg == "timed out"
    assert read_failed.response is None
    assert read_client.metadata[METADATA_KEY]["upstream_flows"] == [session.id]


def test_mitmweb_flow_json_accepts_every_shape() -> None:
    session = full_session()
    rejected = open_flow()
    record_handshake_response(
        rejected, status=403, reason="Forbidden", headers=[], body=b"no", timestamp=T0
    )
    failed = open_flow()
    record_error(failed, "refused")
    pending = open_flow()
    for f in (session, rejected, failed, pending, *round_trip(session)):
        data = flow_to_json(f)
        json.dumps(data)
        assert data["request"]["scheme"] == "https"
        assert data["comment"] == f.comment
    assert flow_to_json(session)["websocket"]["close_code"] == 1011
    assert flow_to_json(session)["websocket"]["messages_meta"]["count"] == 2


class _Held:
    """Stands for what a caller holds while it builds a flow (a turn, its body)."""


def _keeps_callers_locals(build: Callable[[], object]) -> bool:
    def caller() -> weakref.ref[_Held]:
        held = _Held()
        build()
        return weakref.ref(held)

    gc.disable()
    try:
        return caller()() is not None
    finally:
        gc.enable()


def test_building_flows_leaves_no_cycle_holding_the_builders_frames() -> None:
    meta = UpstreamMeta(account="team-a", affinity="hard", key="k", attempt=1)

    def session() -> None:
        flow = new_upstream_flow(
            url="wss://api.openai.com/v1/responses",
            headers=[("a", "b")],
            timestamp=T0,
            meta=meta,
            client_flow_id=None,
        )
        record_handshake_response(
            flow, status=101, reason="Switching Protocols", headers=[], body=b"", timestamp=T0
        )

    # mitmproxy's own way leaves one (its field checks raise and catch a TypeError).
    assert _keeps_callers_locals(lambda: http.Response.make(200, b"", http.Headers()))
    assert not _keeps_callers_locals(session)
    assert not _keeps_callers_locals(lambda: make_response(200, b"", http.Headers()))


def test_make_response_is_mitmproxys_make() -> None:
    ours = make_response(404, b'{"error": 1}', http.Headers(content_type="application/json"))
    theirs = http.Response.make(404, b'{"error": 1}', http.Headers(content_type="application/json"))
    mine, other = ours.get_state(), theirs.get_state()
    for state in (mine, other):
        del state["timestamp_start"], state["timestamp_end"]
    assert mine == other
