"""The turn engine as playbooks: events in, commands out, no socket, clock or store."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core import sse
from responses_ws_bridge.core.account_pool import AllCoolingDown, Chosen, NoneUsable
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.attempt_plan import PickAny, PickOwner
from responses_ws_bridge.core.create_request import parse_create_request
from responses_ws_bridge.core.failures import (
    ConnectionLost,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamSilent,
)
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Checkout,
    Choose,
    ClientLeft,
    Disable,
    FailClosed,
    Failed,
    FindOwner,
    Finish,
    Frames,
    GetToken,
    Hold,
    Log,
    NoteFigures,
    Open,
    Owned,
    PublishOwner,
    Receive,
    Refresh,
    RefreshRefused,
    Release,
    Respond,
    Send,
    Served,
    Sleep,
    SocketReady,
    StartStream,
    TimedOut,
    Unbound,
    Unhold,
    Write,
)
from responses_ws_bridge.core.turn_engine import Clocks, EngineSettings, PoolFacts, TurnEngine
from responses_ws_bridge.core.turns import Destination, Turn
from websockets.frames import CloseCode

from tests.support.playbook import Playbook

TRUSTED = Destination("https", "api.openai.com", 443, "/v1/responses")
A = Account("a", "tok-a")
B = Account("b", "tok-b")
REFRESHABLE = Account("r", "tok-r", refresh_token="rt-r")
SESSION = [("session-id", "s-1")]


def event(type_: str, seq: int, **fields: Any) -> str:
    return json.dumps({"type": type_, "sequence_number": seq, **fields}, separators=(",", ":"))


CREATED = event("response.created", 0, response={"id": "resp_1"})
DELTA = event("response.output_text.delta", 1, delta="hi")
COMPLETED = event("response.completed", 2, response={"id": "resp_1", "output": []})


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clocks(self) -> Clocks:
        return Clocks(lambda: self.now, lambda: 1_700_000_000.0 + self.now)


def make_turn(
    body: dict[str, Any] | None = None,
    headers: list[tuple[str, str]] | None = None,
    *,
    destination: Destination = TRUSTED,
    credential: UpstreamCredential | None = None,
) -> Turn:
    raw = json.dumps(body or {"model": "m", "input": "hi", "stream": True}).encode()
    create = parse_create_request(raw, max_body=1 << 20)
    client_headers = tuple(headers or [])
    return Turn(
        flow_id="f1",
        create=create,
        client_headers=client_headers,
        request_id="req-1",
        destination=destination,
        affinity=classify(client_headers, create.body),
        client_credential=credential,
    )


def play(
    turn: Turn,
    *,
    pooled: bool = True,
    settings: EngineSettings | None = None,
    time: FakeTime | None = None,
    secrets: tuple[str, ...] = (),
) -> Playbook:
    engine = TurnEngine(
        turn,
        settings or EngineSettings(),
        PoolFacts(pooled=pooled),
        scrub=SecretScrubber(secrets),
        clocks=(time or FakeTime()).clocks(),
        jitter=lambda: 0.0,
    )
    return Playbook(engine.run())


def open_on(pb: Playbook, account: Account, pick: Any, *, owner: object = None) -> None:
    """From the start to a socket ready on `account` (a new one, the pick as given)."""
    pb << FindOwner() >> (owner or Unbound())
    pb << Choose(pick, claim=pick == PickAny(frozenset(), None)) >> Chosen(account)
    if isinstance(pb.next_command(), Bind):
        pb << Bind(account.id) >> None
    pb << NoteFigures(account.id, None) >> None
    pb << Hold(account.id) >> None
    pb.skip_until(GetToken)
    pb << GetToken(account) >> account.bearer
    pb << Open >> SocketReady([])


def test_pass_through_streams_events_and_keeps_the_socket() -> None:
    turn = make_turn(headers=SESSION, credential=UpstreamCredential("client-tok"))
    pb = play(turn, pooled=False)
    pb << FindOwner() >> Unbound()
    pb << Checkout(("session:s-1", None), turn.report.attempts[0]) >> None
    opened = pb.answer(Open, SocketReady([("x-codex-turn-state", "ts-1")]))
    assert ("authorization", "Bearer client-tok") in [(k.lower(), v) for k, v in opened.headers]
    pb << Send(turn.create.message) >> None
    pb << Receive(300.0) >> Frames([CREATED, DELTA])
    start = pb.answer(StartStream)
    assert ("x-codex-turn-state", "ts-1") in start.headers
    assert ("content-type", "text/event-stream") in start.headers
    pb << Write(
        sse.encode_event(CREATED, "response.created")
        + sse.encode_event(DELTA, "response.output_text.delta")
    )
    pb >> None
    pb << Receive(15.0) >> Frames([COMPLETED])
    pb << Write(sse.encode_event(COMPLETED, "response.completed")) >> None
    pb << Finish() >> None
    pb << Release(("session:s-1", None), keep=True) >> None
    assert pb.done
    assert (turn.report.outcome, turn.report.status) == ("response.completed", 200)


def test_a_reused_socket_is_checked_out_and_opens_nothing() -> None:
    turn = make_turn(headers=SESSION, credential=UpstreamCredential("client-tok"))
    pb = play(turn, pooled=False)
    pb << FindOwner() >> Unbound()
    pb << Checkout >> SocketReady([])
    pb << Send(turn.create.message)
    assert turn.report.attempts[0].reused


def test_hard_owner_keeps_the_request_through_1011() -> None:
    turn = make_turn(headers=SESSION)
    pb = play(turn)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR, "boom"))
    pb << Release(("session:s-1", "a"), keep=False) >> None
    pb << Unhold("a") >> None
    pb << Failed("a", UpstreamClosed(CloseCode.INTERNAL_ERROR, "boom")) >> True
    assert "RetrySame" in pb.answer(Log).message
    pb << Sleep >> None
    # The owner again, never another account.
    pb << Choose(PickOwner("a"), claim=False)
    assert turn.report.attempts[0].outcome == "closed"
    assert turn.report.attempts[0].close_code == 1011


def test_a_new_hard_key_is_bound_to_the_first_account_chosen() -> None:
    pb = play(make_turn(headers=SESSION))
    pb << FindOwner() >> Unbound()
    pb << Choose(PickAny(frozenset(), None), claim=True) >> Chosen(B)
    pb << Bind("b")


def test_soft_1011_moves_to_another_account() -> None:
    turn = make_turn({"model": "m", "input": "x", "stream": True, "prompt_cache_key": "k"})
    pb = play(turn)
    pb << FindOwner() >> Unbound()
    pb << Choose(PickAny(frozenset(), None), claim=True) >> Chosen(A)
    pb.skip_until(GetToken)
    pb << GetToken(A) >> "tok-a"
    pb << Open >> SocketReady([])
    pb << Send >> None
    pb << Receive >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR))
    pb.skip_until(Failed)
    pb >> True
    pb.skip_until(Choose)
    pb << Choose(PickAny(frozenset({"a"}), None), claim=True)


def test_the_client_leaving_mid_stream_closes_the_socket_and_gives_the_account_back() -> None:
    turn = make_turn(headers=SESSION)
    pb = play(turn)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED])
    pb << StartStream >> None
    pb << Write >> ClientLeft()
    pb << Release(
        ("session:s-1", "a"), keep=False, code=CloseCode.GOING_AWAY, reason="client went away"
    )
    pb >> None
    pb << Unhold("a") >> None
    assert pb.done
    assert turn.report.attempts[0].outcome == "client_gone"


def test_a_break_after_events_ends_the_stream_with_response_failed() -> None:
    turn = make_turn(headers=SESSION)
    pb = play(turn)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, DELTA])
    pb << StartStream >> None
    pb << Write >> None
    pb << Receive >> Broke(ConnectionLost())
    pb.skip_until(Failed)
    pb >> True
    pb.skip_until(Write)
    failed = pb.last.data.decode()
    assert "event: response.failed" in failed and "stream_incomplete" in failed
    assert '"sequence_number":2' in failed and "resp_1" in failed
    pb >> None
    pb << Finish() >> None
    assert pb.done
    assert (turn.report.outcome, turn.report.status) == ("stream_incomplete", 200)


def test_silence_after_events_sends_keepalives_then_gives_up() -> None:
    time = FakeTime()
    settings = EngineSettings(keepalive_s=15.0, idle_timeout_s=40.0)
    pb = play(make_turn(headers=SESSION), settings=settings, time=time)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(40.0) >> Frames([CREATED])
    pb << StartStream >> None
    pb << Write >> None
    pb << Receive(15.0)
    time.now += 15
    pb >> TimedOut()
    pb << Write(sse.KEEPALIVE) >> None
    pb << Receive(15.0)
    time.now += 15
    pb >> TimedOut()
    pb << Write(sse.KEEPALIVE) >> None
    pb << Receive(10.0)
    time.now += 10
    pb >> TimedOut()
    pb.skip_until(Write, answer=True)
    assert "no event for 40 s" in pb.last.data.decode()


def test_a_silent_upstream_before_any_event_is_a_retry() -> None:
    time = FakeTime()
    pb = play(make_turn(headers=SESSION), settings=EngineSettings(idle_timeout_s=5.0), time=time)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(5.0)
    time.now += 5
    pb >> TimedOut()
    pb.skip_until(Failed)
    assert pb.last.failure == UpstreamSilent(5.0)


def test_an_untrusted_destination_is_refused_before_any_account() -> None:
    where = Destination("https", "evil.example", 443, "/v1/responses")
    pb = play(make_turn(destination=where))
    pb << Log >> None
    response = pb.answer(Respond)
    assert response.status == 403
    assert pb.done


def test_an_unreachable_store_fails_closed() -> None:
    pb = play(make_turn(headers=SESSION))
    pb << FindOwner() >> FailClosed("down")
    response = pb.answer(Respond)
    assert response.status == 503
    assert b"state_store_unavailable" in response.body


@pytest.mark.parametrize(
    ("choice", "status"),
    [
        (AllCoolingDown(until=5.0, retry_after_s=7), 429),
        (NoneUsable("disabled"), 503),
    ],
)
def test_no_usable_account_is_answered_without_an_attempt(choice: object, status: int) -> None:
    pb = play(make_turn())
    pb << FindOwner() >> Unbound()
    pb << Choose >> choice
    assert pb.answer(Respond).status == status
    assert pb.done


def test_a_client_that_does_not_stream_gets_one_json_body() -> None:
    item = event(
        "response.output_item.done", 1, output_index=0, item={"type": "message", "id": "m"}
    )
    pb = play(make_turn({"model": "m", "input": "x"}))
    open_on(pb, A, PickAny(frozenset(), None))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, item])
    pb << Receive >> Frames([COMPLETED])
    pb << PublishOwner("a", "resp_1") >> None
    answer = pb.answer(Respond)
    assert answer.status == 200
    assert json.loads(answer.body)["output"] == [{"type": "message", "id": "m"}]
    pb << Release(None, keep=True) >> None
    pb << Unhold("a") >> None
    pb << Served("a", "resp_1") >> None
    assert pb.done


def test_a_completed_response_is_owned_before_its_terminal_event_is_written() -> None:
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, COMPLETED])
    pb << StartStream >> None
    pb << PublishOwner("a", "resp_1") >> None
    pb << Write >> None
    pb << Finish() >> None


def test_a_401_refreshes_the_token_and_retries_once_for_free() -> None:
    pb = play(make_turn())
    pb << FindOwner() >> Unbound()
    pb << Choose >> Chosen(REFRESHABLE)
    pb.skip_until(GetToken)
    pb << GetToken(REFRESHABLE) >> "old"
    pb << Open >> Broke(HandshakeRejected(401))
    refresh = pb.skip_until(Refresh)
    assert refresh.used_tag
    pb >> True
    assert "free retry (token_refreshed)" in pb.answer(Log).message
    pb << Choose(PickOwner("r"), claim=True)


def test_a_refused_refresh_disables_the_account_when_permanent() -> None:
    turn = make_turn()
    pb = play(turn)
    pb << FindOwner() >> Unbound()
    pb << Choose >> Chosen(REFRESHABLE)
    pb.skip_until(GetToken)
    pb << GetToken(REFRESHABLE) >> RefreshRefused("invalid_grant", permanent=True)
    pb << Disable("r", "token refresh refused: invalid_grant") >> None
    pb.skip_until(Failed)
    assert turn.report.attempts[0].outcome == "refresh_refused"


def _refused_answer(turn: Turn, refused: RefreshRefused) -> Respond:
    pb = play(turn)
    pb << FindOwner() >> (Owned("r") if turn.affinity.kind.value == "hard" else Unbound())
    pb.skip_until(Choose)
    pb >> Chosen(REFRESHABLE)
    pb.skip_until(GetToken)
    pb << GetToken(REFRESHABLE) >> refused
    failed = pb.skip_until(Failed)
    assert failed.failure.cause == "refresh_failed"
    pb >> True
    answer: Respond = pb.skip_until(Respond, answer=True)
    return answer


@pytest.mark.parametrize(
    ("reason", "status", "code", "retry_after"),
    [
        ("token_refresh_timeout", 503, "token_refresh_failed", "7"),
        ("state_store_unavailable", 503, "state_store_unavailable", "7"),
    ],
)
def test_a_hard_session_whose_token_cannot_be_refreshed_is_told_so_at_once(
    reason: str, status: int, code: str, retry_after: str
) -> None:
    answer = _refused_answer(
        make_turn(headers=SESSION), RefreshRefused(reason, permanent=False, retry_after_s=7.0)
    )
    assert answer.status == status
    error = json.loads(answer.body)["error"]
    assert error["code"] == code
    assert reason in error["message"] and "could not connect" not in error["message"]
    assert ("retry-after", retry_after) in answer.headers


def test_a_401_whose_refresh_fails_is_a_refresh_failure_not_an_owner_failure() -> None:
    pb = play(make_turn(headers=SESSION))
    pb << FindOwner() >> Owned("r")
    pb.skip_until(Choose)
    pb >> Chosen(REFRESHABLE)
    pb.skip_until(GetToken)
    pb << GetToken(REFRESHABLE) >> "old"
    pb << Open >> Broke(HandshakeRejected(401))
    pb.skip_until(Refresh)
    pb >> RefreshRefused("unrecognized_error", permanent=False, retry_after_s=3.0)
    pb.skip_until(Failed)
    pb >> True
    answer = pb.skip_until(Respond, answer=True)
    assert answer.status == 503
    assert json.loads(answer.body)["error"]["code"] == "token_refresh_failed"


def test_an_error_event_before_any_output_is_the_clients_answer() -> None:
    error = json.dumps(
        {
            "type": "error",
            "status": 400,
            "error": {"type": "invalid_request_error", "code": "bad", "message": "no"},
        }
    )
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([error])
    # The socket is fine: an error event ends a turn, not a connection.
    pb << Release(("session:s-1", "a"), keep=True) >> None
    answer = pb.skip_until(Respond, answer=True)
    assert answer.status == 400
    assert b'"code": "bad"' in answer.body or b'"code":"bad"' in answer.body


def test_secrets_echoed_in_error_events_are_scrubbed() -> None:
    error = json.dumps({"type": "error", "error": {"message": "bad key tok-secret-123"}})
    pb = play(make_turn(headers=SESSION), secrets=("tok-secret-123",))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, error])
    pb << StartStream >> None
    assert b"tok-secret-123" not in pb.answer(Write).data


def test_a_binary_frame_ends_the_turn_after_what_came_before() -> None:
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, b"\x00"])
    pb << StartStream >> None
    pb << Write(sse.encode_event(CREATED, "response.created")) >> None
    pb.skip_until(Failed)
    pb >> True
    pb.skip_until(Write)
    assert b"invalid_upstream_event" in pb.last.data


def test_rate_limit_frames_become_headers_not_events() -> None:
    limits = json.dumps(
        {
            "type": "codex.rate_limits",
            "rate_limits": {"primary": {"used_percent": 42.0, "window_minutes": 300}},
        }
    )
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([limits, CREATED])
    noted = pb.answer(NoteFigures, None)
    assert noted.limits is not None
    start = pb.answer(StartStream)
    assert ("x-codex-primary-used-percent", "42") in start.headers
    assert b"codex.rate_limits" not in pb.answer(Write).data
