"""A client WebSocket's engine as playbooks, and its small pure rules as tables."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.addons.ws_streaming import accept_key
from responses_ws_bridge.core.account_pool import AllCoolingDown, Chosen
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.attempt_plan import PickAny, PickOwner
from responses_ws_bridge.core.failures import (
    ConnectionLost,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamSilent,
)
from responses_ws_bridge.core.openai_errors import HttpError
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Choose,
    ClientLeft,
    Failed,
    FindOwner,
    Frames,
    GetToken,
    Hold,
    Log,
    NoteFigures,
    Open,
    Owned,
    PublishOwner,
    Receive,
    Release,
    Send,
    Served,
    Sleep,
    SocketReady,
    Unbound,
    Unhold,
)
from responses_ws_bridge.core.turn_engine import Clocks, EngineSettings
from responses_ws_bridge.core.turns import Destination
from responses_ws_bridge.core.ws_client_commands import (
    AcceptClient,
    Attach,
    ClientClose,
    ClientClosed,
    ClientRecv,
    ClientSend,
    ClientText,
    Idle,
    NewTurn,
    RefuseClient,
)
from responses_ws_bridge.core.ws_client_engine import (
    WsClientEngine,
    WsClientRequest,
    client_101_headers,
    close_for,
    error_event,
)

from tests.support.playbook import Playbook

A = Account("a", "tok-a")
B = Account("b", "tok-b")
SESSION = (("session-id", "s-ws"), ("authorization", "Bearer client-key"))
DESTINATION = Destination("https", "chatgpt.com", 443, "/backend-api/codex/responses")


def event(type_: str, seq: int, **fields: Any) -> str:
    return json.dumps({"type": type_, "sequence_number": seq, **fields}, separators=(",", ":"))


CREATED = event("response.created", 0, response={"id": "resp_w"})
DELTA = event("response.output_text.delta", 1, delta="hi tok-a")
COMPLETED = event("response.completed", 2, response={"id": "resp_w", "output": []})
LIMITS = json.dumps({"type": "codex.rate_limits", "rate_limits": {"primary": {"used_percent": 5}}})
CREATE = json.dumps({"type": "response.create", "model": "m", "input": "x"})


def play(headers: tuple[tuple[str, str], ...] = SESSION, host: str = "chatgpt.com") -> Playbook:
    request = WsClientRequest(
        "flow-ws", headers, Destination("https", host, 443, DESTINATION.path), "req-ws"
    )
    engine = WsClientEngine(
        request,
        EngineSettings(),
        accounts_own_upstreams=False,
        scrub=SecretScrubber(["tok-a", "tok-b", "client-key"]),
        clocks=Clocks(lambda: 1000.0, lambda: 1_700_000_000.0),
        jitter=lambda: 0.0,
    )
    return Playbook(engine.run())


def open_on(pb: Playbook, account: Account, pick: Any, *, owner: object = None) -> Open:
    pb << FindOwner() >> (owner or Unbound())
    pb << Choose(pick, claim=owner is None) >> Chosen(account)
    if isinstance(pb.next_command(), Bind):
        pb << Bind(account.id) >> None
    pb << GetToken(account) >> account.bearer
    pb << Open
    return pb.last  # type: ignore[no-any-return]


def relay_turn(pb: Playbook, account: str) -> None:
    """A turn on a socket already open: its frames to the client, the turn done."""
    pb << Hold(account) >> None
    pb << Send(CREATE) >> None
    pb << Receive(300.0) >> Frames([CREATED, DELTA, COMPLETED])
    pb << ClientSend(CREATED) >> None
    # Known secrets leave every event.
    pb << ClientSend(DELTA.replace("tok-a", "<redacted>")) >> None
    pb << PublishOwner(account, "resp_w") >> None
    pb << ClientSend(COMPLETED) >> None
    pb << Served(account, "resp_w") >> None
    pb << Idle() >> None
    pb << Unhold(account) >> None


def test_a_hard_handshake_opens_upstream_before_its_101_and_relays_its_headers() -> None:
    pb = play()
    pb << NewTurn >> None
    opened = open_on(pb, A, PickAny(frozenset(), None))
    headers = dict((k.lower(), v) for k, v in opened.headers)
    assert headers["authorization"] == "Bearer tok-a"
    assert headers["openai-beta"] == "responses_websockets=2026-02-06"
    assert "client-key" not in json.dumps(opened.headers)
    upstream_101 = [("x-codex-turn-state", "ts-1"), ("Sec-WebSocket-Accept", "x"), ("Date", "d")]
    pb >> SocketReady(upstream_101)
    pb << AcceptClient([("x-codex-turn-state", "ts-1")]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    pb << FindOwner() >> Owned("a")
    pb << Attach >> None
    relay_turn(pb, "a")
    pb << ClientRecv() >> ClientClosed(1000, "bye")
    pb << Release(None, keep=False, code=1000, reason="bye") >> None
    assert pb.done


def test_without_hard_headers_the_client_is_accepted_and_its_first_message_chooses() -> None:
    pb = play(headers=(("authorization", "Bearer client-key"),))
    pb << NewTurn >> None
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    open_on(pb, B, PickAny(frozenset(), None))
    pb >> SocketReady([])
    relay_turn(pb, "b")
    pb << ClientRecv()


def test_rate_limit_frames_reach_the_client_and_are_the_accounts_figures() -> None:
    pb = play(headers=())
    pb << NewTurn >> None
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    open_on(pb, A, PickAny(frozenset(), None))
    pb >> SocketReady([])
    pb << Hold("a") >> None
    pb << Send(CREATE) >> None
    pb << Receive >> Frames([LIMITS, CREATED])
    pb << NoteFigures >> None
    pb << ClientSend(LIMITS) >> None
    pb << ClientSend(CREATED) >> None


def test_a_failure_before_the_first_event_is_retried_on_the_hard_owner() -> None:
    pb = play()
    pb << NewTurn >> None
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> SocketReady([])
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    pb << FindOwner() >> Owned("a")
    pb << Attach >> None
    pb << Hold("a") >> None
    pb << Send(CREATE) >> None
    pb << Receive >> Broke(UpstreamClosed(1011, "boom"))
    pb << Unhold("a") >> None
    pb << Release(None, keep=False, code=1000, reason="") >> None
    pb << Failed("a", UpstreamClosed(1011, "boom")) >> True
    assert "RetrySame" in pb.answer(Log).message
    pb << Sleep >> None
    # A new socket, on the owner only; the message is sent again there.
    pb << Choose(PickOwner("a"), claim=False) >> Chosen(A)
    pb << GetToken(A) >> "tok-a"
    pb << Open >> SocketReady([])
    pb << Hold("a") >> None
    pb << Send(CREATE)


def test_a_dead_held_socket_is_replaced_for_free() -> None:
    pb = play()
    pb << NewTurn >> None
    open_on(pb, A, PickAny(frozenset(), None))
    pb >> SocketReady([])
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    pb << FindOwner() >> Owned("a")
    pb << Attach >> None
    relay_turn(pb, "a")
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    pb << FindOwner() >> Owned("a")
    pb << Attach >> None
    pb << Hold("a") >> None
    pb << Send(CREATE) >> Broke(ConnectionLost())
    pb << Unhold("a") >> None
    pb << Release >> None
    assert "free retry (dead_reused_socket)" in pb.answer(Log).message
    pb << Choose(PickOwner("a"), claim=False)


def test_after_the_first_event_the_client_gets_the_close_it_would_have_had() -> None:
    pb = play(headers=())
    pb << NewTurn >> None
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    open_on(pb, A, PickAny(frozenset(), None))
    pb >> SocketReady([])
    pb << Hold("a") >> None
    pb << Send(CREATE) >> None
    pb << Receive >> Frames([CREATED])
    pb << ClientSend(CREATED) >> None
    pb << Receive >> Broke(UpstreamClosed(1011, "internal error tok-a"))
    pb << Unhold("a") >> None
    pb << Release >> None
    pb << ClientClose(1011, "internal error <redacted>") >> None
    assert pb.done


def test_when_no_attempt_is_left_the_client_gets_the_error_event_and_keeps_its_socket() -> None:
    pb = play(headers=())
    pb << NewTurn >> None
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    pb << FindOwner() >> Unbound()
    pb << Choose >> AllCoolingDown(0.0, 7)
    sent = pb.answer(ClientSend)
    got = json.loads(sent.data)
    assert (got["type"], got["status"], got["error"]["code"]) == (
        "error",
        429,
        "all_accounts_cooling_down",
    )
    assert got["headers"] == {"retry-after": "7"}
    pb << ClientRecv()


def test_a_hard_handshake_the_owner_refuses_is_the_clients_http_answer() -> None:
    pb = play()
    pb << NewTurn >> None
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Broke(HandshakeRejected(429, (("retry-after", "9"),), b'{"error":{"code":"x"}}', 9))
    pb << Failed >> False
    pb << Log >> None
    refused = pb.answer(RefuseClient)
    assert refused.status == 429 and ("retry-after", "9") in refused.headers


def test_an_untrusted_destination_is_refused_before_anything() -> None:
    pb = play(host="attacker.example")
    pb << Log >> None
    refused = pb.answer(RefuseClient)
    assert refused.status == 403
    assert pb.done


def test_a_client_that_leaves_mid_turn_closes_the_upstream_socket() -> None:
    pb = play(headers=())
    pb << NewTurn >> None
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    open_on(pb, A, PickAny(frozenset(), None))
    pb >> SocketReady([])
    pb << Hold("a") >> None
    pb << Send(CREATE) >> None
    pb << Receive >> ClientLeft()
    pb << Release(None, keep=False, code=1001, reason="client went away") >> None
    pb << Unhold("a") >> None
    assert pb.done


def test_a_turn_whose_previous_response_is_elsewhere_moves_the_socket_to_its_owner() -> None:
    pb = play(headers=())
    pb << NewTurn >> None
    pb << AcceptClient([]) >> None
    pb << ClientRecv() >> ClientText(CREATE)
    pb << NewTurn >> None
    open_on(pb, A, PickAny(frozenset(), None))
    pb >> SocketReady([])
    relay_turn(pb, "a")
    (
        pb
        << ClientRecv()
        >> ClientText(json.dumps({"type": "response.create", "previous_response_id": "r"}))
    )
    pb << NewTurn >> None
    pb << FindOwner() >> Owned("b")
    pb << Release(None, keep=False, code=1000, reason="the session moves to its owner") >> None
    pb << Choose(PickOwner("b"), claim=False)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (UpstreamClosed(1011, "boom"), (1011, "boom")),
        (UpstreamClosed(1000, ""), (1000, "")),
        (UpstreamClosed(1005, ""), (None, "")),
        (UpstreamClosed(1011, "keepalive", by_bridge=True), (1011, "keepalive")),
        (UpstreamClosed(4000, "x", by_bridge=True), (1011, "upstream connection lost")),
        (ConnectionLost(), (None, "")),
        (UpstreamSilent(5.0), (1011, "upstream connection lost")),
    ],
)
def test_the_close_a_client_gets(failure: Any, expected: tuple[int | None, str]) -> None:
    assert close_for(failure) == expected


def test_the_clients_101_keeps_what_the_upstream_said_but_its_handshake() -> None:
    upstream = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", "abc"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
        ("Date", "now"),
        ("Server", "x"),
        ("x-codex-turn-state", "ts"),
        ("x-codex-primary-used-percent", "3"),
        ("openai-model", "gpt-5-codex"),
    ]
    assert client_101_headers(upstream) == upstream[-3:]


def test_the_error_event_carries_the_status_error_and_retry_after() -> None:
    body = json.dumps({"error": {"message": "m", "type": "t", "code": "c", "param": None}})
    got = json.loads(error_event(HttpError(429, body.encode(), (("retry-after", "3"),))))
    assert got == {
        "type": "error",
        "status": 429,
        "error": {"message": "m", "type": "t", "code": "c", "param": None},
        "headers": {"retry-after": "3"},
    }


def test_the_accept_key_is_rfc_6455s() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
