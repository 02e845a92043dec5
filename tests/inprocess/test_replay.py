"""Replaying recorded upstream sessions with a real websockets client, and every deviation."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitmio
from mitmproxy.test import tflow
from responses_ws_bridge.core.failures import AttemptFailed, close_code_seen
from responses_ws_bridge.core.handshake_headers import WEBSOCKET_BETA
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.local.response_events import encode, rate_limit_event
from responses_ws_bridge.local.upstream import LocalUpstream, Plan
from responses_ws_bridge.recording.replay import (
    Abort,
    AwaitClose,
    Close,
    Deviation,
    Expect,
    RecordedSession,
    ReplayServer,
    Send,
    ThreadedReplayServer,
    compare_handshake,
    diff_json,
    load_sessions,
    replay_steps,
    session_from_flow,
)
from responses_ws_bridge.recording.session_flows import (
    UpstreamMeta,
    end_segment,
    new_upstream_flow,
    record_client_attempt,
    record_close,
    record_error,
    record_handshake_response,
    record_message,
)
from responses_ws_bridge.shell.upstream_client import UpstreamSettings, open_session
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from tests.support.data import ROOT

T0 = 1_700_000_000.0
BOUND = 20.0
CREATE = {"type": "response.create", "model": "gpt-5-codex", "input": [{"role": "user"}]}
EXTRA = [
    ("Authorization", "Bearer tok-a"),
    ("OpenAI-Beta", WEBSOCKET_BETA),
    ("session-id", "s-1"),
    ("x-codex-window-id", "s-1:0"),
]
TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}
SECRETS = list(TOKENS)


def run[T](coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(BOUND):
            return await coro

    return asyncio.run(bounded())


def wire_headers(extra: Sequence[tuple[str, str]] = EXTRA) -> list[tuple[str, str]]:
    """What the websockets client puts on the wire (key and host differ each time)."""
    return [
        ("Host", "chatgpt.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        *extra,
    ]


def recorded_flow(
    messages: Sequence[tuple[bool, str, float]] = (),
    *,
    status: int = 101,
    close: tuple[int | None, str, bool] | None = (1000, "", True),
    start: float = T0,
    extra: Sequence[tuple[str, str]] = EXTRA,
    response_headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    account: str | None = "team-a",
) -> http.HTTPFlow:
    """A session as the bridge records it: (from_client, text, offset) messages."""
    f = new_upstream_flow(
        url="wss://chatgpt.com/backend-api/codex/responses",
        headers=wire_headers(extra),
        timestamp=start,
        meta=UpstreamMeta(account, "hard", "session:s-1", 1),
        client_flow_id=None,
        secrets=SECRETS,
    )
    record_handshake_response(
        f,
        status=status,
        reason="Switching Protocols" if status == 101 else "Too Many Requests",
        headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"), *response_headers],
        body=body,
        timestamp=start + 0.1,
    )
    for from_client, text, offset in messages:
        record_message(f, from_client=from_client, content=text, timestamp=start + offset)
    if close is not None and status == 101:
        code, reason, by_client = close
        last = messages[-1][2] if messages else 0.1
        record_close(
            f, code=code, reason=reason, closed_by_client=by_client, timestamp=start + last
        )
    return f


def turn(offset: float = 0.2, gap: float = 0.0) -> list[tuple[bool, str, float]]:
    events = [
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}},
        {"type": "response.completed", "sequence_number": 1, "response": {"id": "resp_1"}},
    ]
    return [
        (True, encode(CREATE), offset),
        (False, encode(events[0]), offset + gap),
        (False, encode(events[1]), offset + 2 * gap),
    ]


def write(path: Path, *flows: http.HTTPFlow) -> Path:
    with path.open("wb") as fp:
        writer = mitmio.FlowWriter(fp)
        for f in flows:
            writer.add(f)
    return path


def sessions_of(tmp_path: Path, *flows: http.HTTPFlow) -> list[RecordedSession]:
    return load_sessions([write(tmp_path / "recorded.mitm", *flows)])


async def client(
    url: str, extra: Sequence[tuple[str, str]] = EXTRA, path: str = "/backend-api/codex/responses"
) -> ClientConnection:
    return await connect(
        url + path,
        additional_headers=list(extra),
        user_agent_header=None,
        compression=None,
        ping_interval=None,
    )


async def replay(
    sessions: Sequence[RecordedSession],
    drive: Callable[[ReplayServer], Awaitable[None]],
    **kwargs: Any,
) -> ReplayServer:
    """Runs `drive` against a replay server, then waits until it served everything."""
    async with ReplayServer(sessions, **kwargs) as srv:
        await drive(srv)
        assert await srv.wait_all_served(BOUND)
    return srv


async def one_turn(
    srv: ReplayServer,
    *,
    extra: Sequence[tuple[str, str]] = EXTRA,
    create: dict[str, Any] = CREATE,
    close: bool = True,
) -> list[str]:
    ws = await client(srv.url, extra)
    await ws.send(json.dumps(create, separators=(",", ":")))
    got = [str(await ws.recv()), str(await ws.recv())]
    if close:
        await ws.close()
    return got


# -- loading


def test_load_keeps_websocket_sessions_in_recorded_order(tmp_path: Path) -> None:
    later = recorded_flow(turn(), start=T0 + 10)
    earlier = recorded_flow(turn(), start=T0 + 5)
    client_flow = tflow.tflow(resp=True)
    record_client_attempt(client_flow, later, outcome="served")
    plain_http = tflow.tflow(resp=True)
    capture = tflow.twebsocketflow()
    capture.request.timestamp_start = T0 + 7
    rejected_capture = tflow.twebsocketflow()
    rejected_capture.websocket = None
    rejected_capture.response = http.Response.make(429, b"{}", {"Retry-After": "1"})
    rejected_capture.request.timestamp_start = T0 + 8
    failed = recorded_flow(close=None, start=T0 + 1)
    failed.response = None
    record_error(failed, "connection refused")

    first = write(tmp_path / "a.mitm", later, client_flow, plain_http, capture)
    second = write(tmp_path / "b.mitm", earlier, rejected_capture, failed)
    sessions = load_sessions([first, second])

    assert [s.flow_id for s in sessions] == [
        failed.id,
        earlier.id,
        capture.id,
        rejected_capture.id,
        later.id,
    ]
    assert [s.role for s in sessions] == ["upstream", "upstream", "capture", "capture", "upstream"]
    assert [s.status for s in sessions] == [None, 101, 101, 429, 101]
    assert sessions[0].error == "connection refused" and not sessions[0].servable
    assert sessions[1].source == str(second)
    assert sessions[4].messages[0].content == encode(CREATE).encode()


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    from responses_ws_bridge.recording.replay import FlowFileError

    bad = tmp_path / "bad.mitm"
    bad.write_bytes(b"this is not a flow file")
    with pytest.raises(FlowFileError, match=r"bad\.mitm"):
        load_sessions([bad])
    with pytest.raises(FlowFileError, match=r"missing\.mitm"):
        load_sessions([tmp_path / "missing.mitm"])


# -- pure comparisons


@pytest.mark.parametrize(
    ("expected", "got", "diffs"),
    [
        ({"a": 1}, {"a": 1}, []),
        ({"a": 1}, {"a": 2}, [("m.a", "changed", 1, 2)]),
        ({"a": 1}, {"a": 1.0}, [("m.a", "changed", 1, 1.0)]),
        ({"a": 1}, {"a": True}, [("m.a", "changed", 1, True)]),
        ({"a": 1}, {}, [("m.a", "missing", 1, None)]),
        ({}, {"b": None}, [("m.b", "added", None, None)]),
        ({"x-y": {"z": [1, 2]}}, {"x-y": {"z": [1, 3]}}, [('m["x-y"].z[1]', "changed", 2, 3)]),
        ([1, 2, 3], [1], [("m[1]", "missing", 2, None), ("m[2]", "missing", 3, None)]),
        ([1], [1, {"k": 1}], [("m[1]", "added", None, {"k": 1})]),
        ("text", {"k": 1}, [("m", "changed", "text", {"k": 1})]),
    ],
)
def test_diff_json(expected: Any, got: Any, diffs: list[tuple[str, str, Any, Any]]) -> None:
    assert diff_json(expected, got, "m") == diffs


def _session(headers: Sequence[tuple[str, str]]) -> RecordedSession:
    return RecordedSession("f", "id", "upstream", "/v1/responses", tuple(headers), T0, status=101)


REDACTED_A = ("Authorization", "Bearer <redacted:team-a>")


@pytest.mark.parametrize(
    ("recorded", "incoming", "tokens", "deviations"),
    [
        # Volatile fields never count; the account does.
        (
            [("Host", "a"), ("Sec-WebSocket-Key", "k1"), ("x-request-id", "r1"), REDACTED_A],
            [("Host", "b"), ("Sec-WebSocket-Key", "k2"), ("X-Request-Id", "r2"), EXTRA[0]],
            TOKENS,
            [],
        ),
        ([REDACTED_A], [("Authorization", "Bearer tok-b")], TOKENS,
         [("account", "team-a", "team-b")]),
        # Without a map, the incoming token is the client's own.
        ([REDACTED_A], [("Authorization", "Bearer tok-a")], None,
         [("account", "team-a", "client")]),
        # A plain capture holds the token in clear: compared as redacted forms.
        ([("Authorization", "Bearer x")], [("Authorization", "Bearer y")], None, []),
        ([("Authorization", "Bearer tok-a")], [("Authorization", "Bearer tok-b")], TOKENS,
         [("account", "team-a", "team-b")]),
        ([REDACTED_A], [], TOKENS, [("account", "team-a", None)]),
        (
            [("OpenAI-Beta", WEBSOCKET_BETA)],
            [("openai-beta", "responses=experimental")],
            None,
            [("openai-beta", WEBSOCKET_BETA, "responses=experimental")],
        ),
        ([("OpenAI-Beta", WEBSOCKET_BETA)], [], None, [("openai-beta", WEBSOCKET_BETA, None)]),
        ([("x-a", "1")], [("X-A", "2")], None, [("header x-a", "1", "2")]),
        ([("x-a", "1"), ("x-a", "2")], [("x-a", "1")], None, [("header x-a", "1, 2", "1")]),
        ([("x-a", "1")], [], None, [("header x-a", "1", None)]),
        ([], [("accept", "*/*")], None, [("header accept", None, "*/*")]),
    ],
)  # fmt: skip
def test_compare_handshake(
    recorded: list[tuple[str, str]],
    incoming: list[tuple[str, str]],
    tokens: dict[str, str] | None,
    deviations: list[tuple[str, Any, Any]],
) -> None:
    found = compare_handshake(
        3, _session(recorded), path="/v1/responses", headers=incoming, tokens=tokens
    )
    assert [(d.field, d.expected, d.got) for d in found] == deviations
    assert all(d.session_index == 3 for d in found)


def test_deviation_messages_are_precise() -> None:
    assert (
        str(Deviation(0, "header x-a", "1", "2"))
        == "session 0: header x-a changed: expected '1', got '2'"
    )
    assert str(Deviation(1, "message[0].tools", None, [1], "added")) == (
        "session 1: message[0].tools added: [1]"
    )
    assert str(Deviation(2, "header x-b", "v", None, "missing")) == (
        "session 2: header x-b missing: expected 'v'"
    )


def test_replay_steps_with_and_without_speed() -> None:
    f = recorded_flow(
        [(True, "c0", 0.3), (False, "s0", 0.7), (False, "s1", 0.8), (True, "c1", 2.0)],
        close=(1011, "boom", False),
    )
    f.websocket.timestamp_end = T0 + 2.5  # type: ignore[union-attr]
    session = _from_flow(f)
    steps = replay_steps(session, speed=2.0)
    assert [type(s) for s in steps] == [Expect, Send, Send, Expect, Close]
    delays = [round(s.delay, 6) for s in steps if isinstance(s, (Send, Close))]
    assert delays == [0.2, 0.05, 0.25]
    assert [round(getattr(s, "delay", 0), 6) for s in replay_steps(session, None)] == [0] * 5
    assert isinstance(steps[-1], Close) and (steps[-1].code, steps[-1].reason) == (1011, "boom")


@pytest.mark.parametrize(
    ("close", "step"),
    [
        ((1000, "", True), AwaitClose(1000)),
        ((None, "", True), AwaitClose(1006)),
        # The client's keepalive gave up: the replay leaves its pings unanswered too.
        ((1011, "keepalive ping timeout", True), AwaitClose(1011, pings_unanswered=True)),
        ((1011, "internal error", True), AwaitClose(1011)),
        ((1006, "", False), Abort(0.0)),
        ((None, "", False), Abort(0.0)),
        ((1005, "", False), Close(None, "", 0.0)),
        ((1013, "later", False), Close(1013, "later", 0.0)),
    ],
)
def test_replay_ends_as_recorded(close: tuple[int | None, str, bool], step: object) -> None:
    assert replay_steps(_from_flow(recorded_flow(close=close)), None) == [step]


def _from_flow(f: http.HTTPFlow) -> RecordedSession:
    from responses_ws_bridge.recording.replay import session_from_flow

    session = session_from_flow(f, "mem")
    assert session is not None
    return session


# -- live replays


class RecordingTap:
    """Records one upstream_client session with the session_flows functions."""

    def __init__(self, url: str, account: str) -> None:
        self.url, self.account = url, account
        self.flow: http.HTTPFlow | None = None

    def attach(self, turn: Turn, attempt: Attempt) -> None:
        pass

    def idle(self) -> None:
        pass

    def handshake_done(
        self, request: Request | None, response: Response | None, error: str | None
    ) -> None:
        headers = list(request.headers.raw_items()) if request is not None else []
        self.flow = new_upstream_flow(
            url=self.url,
            headers=headers,
            timestamp=time.time(),
            meta=UpstreamMeta(self.account, "none", None, 1),
            client_flow_id=None,
            secrets=SECRETS,
        )
        if response is not None:
            record_handshake_response(
                self.flow,
                status=response.status_code,
                reason=response.reason_phrase,
                headers=list(response.headers.raw_items()),
                body=bytes(response.body or b""),
                timestamp=time.time(),
            )
        if error is not None:
            record_error(self.flow, error)

    def message(self, from_client: bool, data: str | bytes, timestamp: float) -> None:
        assert self.flow is not None
        record_message(
            self.flow, from_client=from_client, content=data, timestamp=timestamp, text=True
        )

    def closed(
        self, code: int | None, reason: str, closed_by_client: bool, timestamp: float
    ) -> None:
        assert self.flow is not None
        record_close(
            self.flow,
            code=code,
            reason=reason,
            closed_by_client=closed_by_client,
            timestamp=timestamp,
        )


async def bridge_like_turn(url: str, tap: RecordingTap | None) -> tuple[list[str], int | None]:
    """One turn the way the bridge's upstream client does it: events, and the close code."""
    settings = UpstreamSettings(ping_interval=None, connect_timeout=BOUND)
    session = await open_session(url, [*EXTRA[1:], EXTRA[0]], settings, tap=tap)
    await session.send(encode({**CREATE, "input": "Say hello"}))
    events: list[str] = []
    try:
        while not any('"response.completed"' in e for e in events):
            events.extend(str(m) for m in await session.next_batch())
    except AttemptFailed as exc:
        return events, close_code_seen(exc.failure)
    await session.close()
    return events, 1000


def test_a_live_recording_replays_cleanly(tmp_path: Path) -> None:
    async def record() -> tuple[list[http.HTTPFlow], list[tuple[list[str], int | None]]]:
        flows, outcomes = [], []
        async with LocalUpstream(tokens=TOKENS) as upstream:
            upstream.script(Plan(), Plan(close_code=1011, close_after_events=2))
            for _ in range(2):
                tap = RecordingTap(upstream.url + "/v1/responses", "team-a")
                outcomes.append(await bridge_like_turn(tap.url, tap))
                await upstream.wait_until(lambda records: all(r.ended for r in records), BOUND)
                assert tap.flow is not None
                flows.append(tap.flow)
        return flows, outcomes

    flows, recorded_outcomes = run(record())
    assert [code for _, code in recorded_outcomes] == [1000, 1011]
    sessions = load_sessions([write(tmp_path / "live.mitm", *flows)])

    async def drive(srv: ReplayServer) -> None:
        outcomes = [await bridge_like_turn(srv.url + "/v1/responses", None) for _ in range(2)]
        assert outcomes == recorded_outcomes

    srv = run(replay(sessions, drive, tokens=TOKENS))
    assert srv.deviations == []
    assert [s.index for s in srv.served] == [0, 1]
    assert "server closed 1011" in str(srv.served[1])


def test_a_turn_whose_socket_carried_on_replays_as_open() -> None:
    """Its flow ends as a labelled normal close; the socket itself did not close there."""
    flow = recorded_flow(turn(), close=None)
    end_segment(flow, timestamp=T0 + 1)
    assert flow.websocket is not None and flow.websocket.close_code == 1000
    session = session_from_flow(flow, "mem")
    assert session is not None
    assert (session.close_code, session.closed_by_client) == (None, None)
    assert replay_steps(session, None)[-1] == AwaitClose(None)


def test_a_message_past_the_recording_ends_the_socket_at_once(tmp_path: Path) -> None:
    """A second turn on a socket whose recording ended: closed now (1013), not left waiting."""
    sessions = sessions_of(tmp_path, recorded_flow(turn()))

    async def drive(srv: ReplayServer) -> None:
        ws = await client(srv.url)
        await ws.send(encode(CREATE))
        await ws.recv()
        await ws.recv()
        await ws.send(encode(CREATE))
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert time.monotonic() - started < 2
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

    srv = run(replay(sessions, drive, tokens=TOKENS))
    assert [(d.field, d.kind) for d in srv.deviations] == [("extra message 0", "unexpected")]
    assert srv.served[0].deviations == 1
    assert str(srv.served[0]).endswith("; 1 deviation")


def test_changed_header_wrong_account_and_changed_create(tmp_path: Path) -> None:
    sessions = sessions_of(tmp_path, recorded_flow(turn()))
    extra = [("Authorization", "Bearer tok-b"), *EXTRA[1:3], ("x-codex-window-id", "s-1:1")]
    create = {**CREATE, "model": "gpt-4.1", "stream": True}
    del create["input"]

    async def drive(srv: ReplayServer) -> None:
        await one_turn(srv, extra=extra, create=create)

    srv = run(replay(sessions, drive, tokens=TOKENS))
    assert [(d.session_index, d.field, d.expected, d.got, d.kind) for d in srv.deviations] == [
        (0, "account", "team-a", "team-b", "changed"),
        (0, "header x-codex-window-id", "s-1:0", "s-1:1", "changed"),
        (0, "message[0].model", "gpt-5-codex", "gpt-4.1", "changed"),
        (0, "message[0].input", [{"role": "user"}], None, "missing"),
        (0, "message[0].stream", None, True, "added"),
    ]


def test_an_extra_handshake_is_a_deviation_and_refused(tmp_path: Path) -> None:
    sessions = sessions_of(tmp_path, recorded_flow(turn()))
    refused: list[int] = []

    async def drive(srv: ReplayServer) -> None:
        await one_turn(srv)
        with pytest.raises(InvalidStatus) as info:
            await client(srv.url)
        refused.append(info.value.response.status_code)

    srv = run(replay(sessions, drive, tokens=TOKENS))
    assert refused == [503]
    [extra] = srv.deviations
    assert (extra.session_index, extra.field, extra.kind) == (1, "handshake", "unexpected")
    assert "beyond the 1 recorded" in str(extra)


def test_a_recorded_1011_is_replayed_as_1011(tmp_path: Path) -> None:
    sessions = sessions_of(
        tmp_path, recorded_flow(turn()[:2], close=(1011, "internal error", False))
    )

    async def drive(srv: ReplayServer) -> None:
        ws = await client(srv.url)
        await ws.send(encode(CREATE))
        assert json.loads(await ws.recv())["type"] == "response.created"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "internal error")

    assert run(replay(sessions, drive, tokens=TOKENS)).deviations == []


def test_a_recorded_abrupt_end_drops_the_connection(tmp_path: Path) -> None:
    sessions = sessions_of(tmp_path, recorded_flow(turn()[:2], close=(None, "", False)))

    async def drive(srv: ReplayServer) -> None:
        ws = await client(srv.url)
        await ws.send(encode(CREATE))
        await ws.recv()
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is None  # no close frame: 1006

    assert run(replay(sessions, drive, tokens=TOKENS)).deviations == []


def test_a_recorded_rejection_is_replayed_as_such(tmp_path: Path) -> None:
    body = json.dumps({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}})
    rejected = recorded_flow(
        status=429,
        response_headers=[("Retry-After", "7"), ("Content-Type", "application/json")],
        body=body.encode(),
    )
    sessions = sessions_of(tmp_path, rejected)
    seen: list[Response] = []

    async def drive(srv: ReplayServer) -> None:
        with pytest.raises(InvalidStatus) as info:
            await client(srv.url)
        seen.append(info.value.response)

    srv = run(replay(sessions, drive, tokens=TOKENS))
    [response] = seen
    assert (response.status_code, response.reason_phrase) == (429, "Too Many Requests")
    assert response.headers["Retry-After"] == "7"
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body) == json.loads(body)
    assert srv.deviations == []
    assert str(srv.served[0]).endswith("rejected 429 Too Many Requests; 0 deviations")


def test_recorded_101_headers_and_server_events_are_repeated(tmp_path: Path) -> None:
    messages = [(True, encode(CREATE), 0.2), (False, encode(rate_limit_event(2)), 0.3)]
    f = recorded_flow(messages, response_headers=[("x-codex-turn-state", "ts-1")])
    sessions = sessions_of(tmp_path, f)

    async def drive(srv: ReplayServer) -> None:
        ws = await client(srv.url)
        assert ws.response is not None
        assert ws.response.headers["x-codex-turn-state"] == "ts-1"
        await ws.send(encode(CREATE))
        assert await ws.recv() == encode(rate_limit_event(2))
        await ws.close()

    assert run(replay(sessions, drive, tokens=TOKENS)).deviations == []


def test_recorded_timing_is_kept_scaled_by_speed(tmp_path: Path) -> None:
    # 0.6 s between the client's message and the first event; speed 2 → 0.3 s.
    sessions = sessions_of(tmp_path, recorded_flow(turn(gap=0.6)))
    waited: list[float] = []

    async def drive(srv: ReplayServer) -> None:
        ws = await client(srv.url)
        sent = time.monotonic()
        await ws.send(encode(CREATE))
        await ws.recv()
        waited.append(time.monotonic() - sent)
        await ws.recv()
        await ws.close()

    assert run(replay(sessions, drive, tokens=TOKENS, speed=2.0)).deviations == []
    # A lower bound only: the replay sleeps at least the scaled gap.
    assert waited[0] >= 0.3 - 0.01


def test_client_closing_early_and_a_missing_message(tmp_path: Path) -> None:
    two_turns = [*turn(0.2), *turn(1.0)]
    sessions = sessions_of(tmp_path, recorded_flow(two_turns), recorded_flow(turn(), start=T0 + 5))

    async def drive(srv: ReplayServer) -> None:
        # Session 0: one turn, then the client leaves before its second message.
        await one_turn(srv)
        # Session 1: the client never sends its response.create.
        ws = await client(srv.url)
        with pytest.raises(ConnectionClosed):
            await ws.recv()

    srv = run(replay(sessions, drive, tokens=TOKENS, message_timeout=0.2))
    assert [(d.session_index, d.field, d.kind) for d in srv.deviations] == [
        (0, "close", "closed_early"),
        (1, "message[0]", "missing"),
    ]
    assert "message[1] from the client" in str(srv.deviations[0])


def test_client_close_code_is_compared(tmp_path: Path) -> None:
    sessions = sessions_of(tmp_path, recorded_flow(turn(), close=(1000, "", True)))

    async def drive(srv: ReplayServer) -> None:
        ws = await client(srv.url)
        await ws.send(encode(CREATE))
        await ws.recv()
        await ws.recv()
        await ws.close(1001)

    srv = run(replay(sessions, drive, tokens=TOKENS))
    assert [(d.field, d.expected, d.got) for d in srv.deviations] == [
        ("client close code", 1000, 1001)
    ]


def test_a_plain_mitmdump_capture_replays(tmp_path: Path) -> None:
    capture = tflow.twebsocketflow(close_code=1001, close_reason="bye")
    sessions = sessions_of(tmp_path, capture)

    async def drive(srv: ReplayServer) -> None:
        # The capture's "connection: upgrade" is websockets' "Connection: Upgrade".
        async with await client(srv.url, extra=[], path="/ws") as ws:
            await ws.send(b"hello binary")
            await ws.send("hello text")
            assert await ws.recv() == "it's me"
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "bye")

    srv = run(replay(sessions, drive))
    assert srv.deviations == []
    assert srv.served[0].session.role == "capture"


def test_unservable_sessions_are_skipped_with_a_note(tmp_path: Path) -> None:
    failed = recorded_flow(close=None)
    failed.response = None
    record_error(failed, "timed out")
    sessions = sessions_of(tmp_path, failed, recorded_flow(turn(), start=T0 + 1))
    srv = ReplayServer(sessions)
    assert len(srv.sessions) == 1
    [note] = srv.notes
    assert "not servable" in note and "timed out" in note


def test_threaded_server_for_synchronous_code(tmp_path: Path) -> None:
    sessions = sessions_of(tmp_path, recorded_flow(turn()))
    with ThreadedReplayServer(sessions, tokens=TOKENS) as srv:

        async def drive() -> list[str]:
            return await one_turn(srv.server)

        events = run(drive())
        assert srv.wait_served(1, BOUND)
    assert [json.loads(e)["type"] for e in events] == ["response.created", "response.completed"]
    assert srv.deviations == []


# -- scripts/replay.py


def _start_script(*args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "replay.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _url(lines: queue.Queue[str]) -> str:
    while True:
        line = lines.get(timeout=BOUND)
        if line.startswith("replaying "):
            return line.rsplit(" ", 1)[1]


def _drain(lines: queue.Queue[str]) -> list[str]:
    out = []
    while not lines.empty():
        out.append(lines.get_nowait())
    return out


@pytest.mark.parametrize(("model", "status"), [("gpt-5-codex", 0), ("gpt-4.1", 1)])
def test_replay_script_exit_status(tmp_path: Path, model: str, status: int) -> None:
    flows = write(tmp_path / "s.mitm", recorded_flow(turn()))
    accounts = tmp_path / "accounts.json"
    accounts.write_text(
        json.dumps({"accounts": [{"id": "team-a", "access_token": "tok-a"}]}), encoding="utf-8"
    )
    proc, lines = _start_script(
        "--flows", str(flows), "--port", "0", "--accounts", str(accounts), "--exit-after-all"
    )
    try:
        url = _url(lines)
        run(one_turn_at(url, {**CREATE, "model": model}))
        assert proc.wait(timeout=BOUND) == status
    finally:
        proc.kill()
        proc.wait(timeout=BOUND)
    output = _drain(lines)
    assert any(line.startswith("served session 0") for line in output), output
    deviations = [line for line in output if line.startswith("DEVIATION")]
    if status:
        assert deviations == [
            "DEVIATION session 0: message[0].model changed: expected 'gpt-5-codex', got 'gpt-4.1'"
        ]
    else:
        assert deviations == []


async def one_turn_at(url: str, create: dict[str, Any]) -> None:
    ws = await client(url)
    await ws.send(encode(create))
    await ws.recv()
    await ws.recv()
    await ws.close()


def test_replay_script_stops_on_sigterm_and_rejects_bad_files(tmp_path: Path) -> None:
    flows = write(tmp_path / "s.mitm", recorded_flow(turn()))
    proc, lines = _start_script("--flows", str(flows), "--port", "0")
    try:
        _url(lines)
        proc.terminate()
        assert proc.wait(timeout=BOUND) == 0
    finally:
        proc.kill()
        proc.wait(timeout=BOUND)
    assert "0 of 1 sessions and 0 of 0 exchanges served, 0 deviations" in _drain(lines)

    bad = tmp_path / "bad.mitm"
    bad.write_text("nope")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "replay.py"), "--flows", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert done.returncode == 2
    assert "bad.mitm" in done.stderr
