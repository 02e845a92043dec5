"""A reused socket is recorded one flow per turn: an idle socket holds one turn's messages at
most, -w gets every turn, and the socket's real close is its last turn's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import hooks, http
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.proxy.layers.websocket import WebsocketEndHook
from mitmproxy.test import tflow
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.create_request import parse_create_request
from responses_ws_bridge.core.turns import Attempt, Destination, Turn
from responses_ws_bridge.local.upstream import LocalUpstream
from responses_ws_bridge.recording.recorder import HookEmitter, SessionFlowTap
from responses_ws_bridge.recording.replay import merge_segments, session_from_flow
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.upstream_client import (
    UpstreamSession,
    UpstreamSettings,
    open_session,
)
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

TIMEOUT = 15.0
TURNS = 10


def run_async(body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await body()

    return asyncio.run(main())


def turn(number: int) -> Turn:
    headers = (("session-id", "seg-1"),)
    create = parse_create_request(
        json.dumps({"model": "m", "input": f"turn {number}", "stream": True}).encode(),
        max_body=1 << 20,
    )
    return Turn(
        flow_id=f"client-{number}",
        create=create,
        client_headers=headers,
        request_id=f"req-{number}",
        destination=Destination("http", "127.0.0.1", 1, "/v1/responses"),
        affinity=classify(headers, create.body),
        client_credential=None,
    )


class Hooks:
    """What the recorder would have run on mitmproxy's addons."""

    def __init__(self) -> None:
        self.seen: list[hooks.Hook] = []

    async def __call__(self, hook: hooks.Hook) -> None:
        self.seen.append(hook)

    def ended(self) -> list[http.HTTPFlow]:
        return [h.flow for h in self.seen if isinstance(h, WebsocketEndHook)]


async def serve_turn(session: UpstreamSession, number: int) -> int:
    """One turn on the socket; the number of messages it took both ways."""
    await session.send(turn(number).create.message)
    messages = 1
    while True:
        batch = await session.next_batch()
        messages += len(batch)
        if any(json.loads(m)["type"] == "response.completed" for m in batch):
            return messages


def test_an_idle_socket_holds_its_last_turn_only_and_every_turn_is_saved() -> None:
    seen = Hooks()

    async def body() -> tuple[list[int | None], list[int]]:
        emitter = HookEmitter(seen)
        pool = SessionPool(idle_ttl_s=60)
        key = ("session:seg-1", None)
        held: list[int | None] = []
        per_turn: list[int] = []
        async with LocalUpstream() as upstream:
            first = turn(1)
            attempt = Attempt(1, None, f"{upstream.url}/v1/responses")
            tap = SessionFlowTap(
                turn=first,
                attempt=attempt,
                emit=emitter,
                redact=True,
                secrets=(),
            )
            session: UpstreamSession | None = await open_session(
                attempt.url, [], UpstreamSettings(), tap=tap
            )
            for number in range(1, TURNS + 1):
                if number > 1:
                    session = pool.checkout(key)
                    assert session is not None and session.tap is tap
                    tap.attach(turn(number), Attempt(1, None, attempt.url, reused=True))
                    # While the turn is live its messages are there to see.
                    assert tap.flow is not None
                assert session is not None
                per_turn.append(await serve_turn(session, number))
                assert tap.flow is not None and tap.flow.websocket is not None
                assert len(tap.flow.websocket.messages) == per_turn[-1]
                pool.checkin(key, session)
                assert tap.flow is not None and tap.flow.websocket is not None
                held.append(len(tap.flow.websocket.messages))
            await pool.close_all()
            await emitter.drain()
        return held, per_turn

    held, per_turn = run_async(body)
    # Flat in the number of turns: an idle socket holds its last turn's messages, no more.
    assert held == per_turn
    ended = seen.ended()
    # One saved flow per turn, none for the close that came while the socket was idle:
    # that close, with its real code, is the last turn's.
    assert len(ended) == TURNS
    assert [len(f.websocket.messages) for f in ended if f.websocket] == per_turn
    assert [f.metadata["responses_bridge"]["segment"] for f in ended] == list(range(TURNS))
    assert {f.metadata["responses_bridge"]["socket"] for f in ended} == {ended[0].id}
    # A turn whose socket carried on ends as a labelled normal close, never an error.
    assert [f.websocket.close_code for f in ended if f.websocket] == [1000] * (TURNS - 1) + [1001]
    assert all(f.metadata["responses_bridge"]["socket_open"] for f in ended[:-1])
    first_turn = ended[0].websocket
    assert first_turn is not None and "carries on" in (first_turn.close_reason or "")
    assert ended[-1].websocket is not None and ended[-1].websocket.close_reason == (
        "proxy shutting down"
    )
    # Joined again, the segments are the socket's whole session, as replay serves it.
    sessions = [session_from_flow(f, "mem") for f in ended]
    (whole,) = merge_segments([s for s in sessions if s is not None])
    assert len(whole.messages) == sum(per_turn)
    assert whole.close_code == 1001
    creates = [json.loads(m.content) for m in whole.messages if m.from_client]
    assert [c["input"] for c in creates] == [f"turn {n}" for n in range(1, TURNS + 1)]
    assert ended[3].comment.endswith(f"turn 4 on socket {ended[0].id[:6]}")


def test_a_sent_message_is_recorded_as_the_bytes_sent_unless_a_secret_is_cut_out() -> None:
    secret = "sk-proj-recorded-secret-0123456789"

    async def body() -> list[bytes]:
        emitter = HookEmitter(Hooks())
        tap = SessionFlowTap(
            turn=turn(1),
            attempt=Attempt(1, "team-a", "wss://upstream.test/v1/responses"),
            emit=emitter,
            redact=True,
            secrets=[secret],
        )
        tap.handshake_done(
            Request("/v1/responses", Headers()),
            Response(101, "Switching Protocols", Headers()),
            None,
        )
        sent = turn(1).create.message
        tap.message(True, sent, 1.0)
        tap.message(True, f'{{"input": "{secret}"}}'.encode(), 2.0)
        tap.message(False, f'{{"delta": "{secret}"}}', 3.0)
        await emitter.drain()
        assert tap.flow is not None and tap.flow.websocket is not None
        recorded = [m.content for m in tap.flow.websocket.messages]
        # No copy of what went out as it was: it is the request's own bytes.
        assert recorded[0] is sent
        return recorded

    recorded = run_async(body)
    assert all(secret.encode() not in m for m in recorded)
    assert b"<redacted>" in recorded[1] and b"<redacted>" in recorded[2]


def test_hooks_queued_together_are_followed_by_one_update_of_every_flow_they_were_on() -> None:
    seen = Hooks()
    a, b = tflow.twebsocketflow(), tflow.tflow()

    async def body() -> None:
        emitter = HookEmitter(seen)
        emitter(HttpRequestHook(a))
        emitter(HttpResponseHook(a))
        emitter(HttpRequestHook(b))
        await emitter.drain()
        # An update of its own is not followed by another.
        emitter(hooks.UpdateHook([b]))
        await emitter.drain()

    run_async(body)
    assert [h.name for h in seen.seen] == ["request", "response", "request", "update", "update"]
    first, second = seen.seen[3], seen.seen[4]
    assert isinstance(first, hooks.UpdateHook) and first.flows == [a, b]
    assert isinstance(second, hooks.UpdateHook) and second.flows == [b]
