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
    # The request's first-event deadline (240 s) comes before the idle gap (300 s).
    pb << Receive(240.0) >> Frames([CREATED, DELTA])
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
    pb << Receive >> Frames([CREATED, DELTA])
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
    pb << Receive(40.0) >> Frames([CREATED, DELTA])
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
    pb << Receive >> Frames([CREATED, DELTA, error])
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
    pb << Receive >> Frames([limits, CREATED, DELTA])
    noted = pb.answer(NoteFigures, None)
    assert noted.limits is not None
    start = pb.answer(StartStream)
    assert ("x-codex-primary-used-percent", "42") in start.headers
    assert b"codex.rate_limits" not in pb.answer(Write).data


# -- round two: what the Codex backend and client do ------------------------------------------

IN_PROGRESS = event("response.in_progress", 1, response={"id": "resp_1"})
CODEX = Destination("https", "chatgpt.com", 443, "/backend-api/codex/responses")


def error_frame(code: str, *, status: int = 400, type_: str = "invalid_request_error") -> str:
    return json.dumps(
        {"type": "error", "status": status, "error": {"type": type_, "code": code, "message": code}}
    )


def failed_frame(code: str, seq: int = 2) -> str:
    return event(
        "response.failed",
        seq,
        response={"id": "resp_1", "status": "failed", "error": {"code": code, "message": code}},
    )


SOFT_KEY_A = ("prompt-cache:k", "a")
SOFT_BODY = {"model": "m", "input": "x", "stream": True, "prompt_cache_key": "k"}


def soft_on_a(settings: EngineSettings | None = None, time: FakeTime | None = None) -> Playbook:
    pb = play(make_turn(SOFT_BODY), settings=settings, time=time)
    open_on(pb, A, PickAny(frozenset(), None))
    pb << Send >> None
    return pb


def test_created_is_held_until_the_first_output_event() -> None:
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(240.0) >> Frames([CREATED, IN_PROGRESS])
    # Nothing written: the hold window (2 s) runs.
    pb << Receive(2.0) >> Frames([DELTA])
    pb << StartStream >> None
    written = pb.answer(Write).data
    assert written == b"".join(
        sse.encode_event(f, t)
        for f, t in [
            (CREATED, "response.created"),
            (IN_PROGRESS, "response.in_progress"),
            (DELTA, "response.output_text.delta"),
        ]
    )


def test_held_events_go_out_when_the_hold_window_ends() -> None:
    time = FakeTime()
    pb = play(make_turn(headers=SESSION), time=time)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED])
    pb << Receive(2.0)
    time.now += 2
    pb >> TimedOut()
    pb << StartStream >> None
    assert pb.answer(Write).data == sse.encode_event(CREATED, "response.created")
    # Now streaming: the keepalive runs from the last frame, 2 s ago.
    pb << Receive(13.0)


@pytest.mark.parametrize(
    "frame",
    [
        error_frame("server_is_overloaded", status=500, type_="server_error"),
        error_frame("overloaded_error"),
        json.dumps(
            {
                "type": "error",
                "error": {
                    "message": "Selected model is at capacity. Please try a different model."
                },
            }
        ),
        failed_frame("server_is_overloaded"),
    ],
    ids=["error-server_is_overloaded", "error-overloaded_error", "at-capacity", "failed"],
)
def test_an_overload_after_created_is_a_retry_on_another_account(frame: str) -> None:
    pb = soft_on_a()
    pb << Receive >> Frames([CREATED, IN_PROGRESS, frame])
    # The client saw nothing; the socket is fine (the response ended).
    pb << Release(SOFT_KEY_A, keep=True) >> None
    pb << Unhold("a") >> None
    failed = pb.answer(Failed, True)
    assert failed.failure.kind == "overloaded"
    assert "RetryOther" in pb.answer(Log).message
    pb << Choose(PickAny(frozenset({"a"}), None), claim=True)


def test_an_overload_on_a_hard_owner_is_tried_again_on_the_owner() -> None:
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, error_frame("server_is_overloaded")])
    pb.skip_until(Failed)
    pb >> True
    assert "RetrySame" in pb.answer(Log).message
    pb << Sleep >> None
    pb << Choose(PickOwner("a"), claim=False)


def test_a_non_retryable_failed_response_after_created_is_relayed_in_the_stream() -> None:
    pb = soft_on_a()
    pb << Receive >> Frames([CREATED, failed_frame("invalid_prompt")])
    pb << StartStream >> None
    data = pb.answer(Write).data
    assert data.startswith(b"event: response.created") and b"invalid_prompt" in data
    pb << Finish() >> None


PREWARM = {"model": "m", "input": [], "stream": True, "generate": False}
PREWARM_COMPLETED = event("response.completed", 1, response={"id": "resp_1", "output": []})


def test_a_prewarm_is_not_counted_for_the_account() -> None:
    turn = make_turn(PREWARM, SESSION)
    pb = play(turn)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    # Held without a window: a prewarm's answer has no output to wait for.
    pb << Receive(240.0) >> Frames([CREATED])
    pb << Receive(300.0) >> Frames([PREWARM_COMPLETED])
    pb << StartStream >> None
    # No PublishOwner: its response is no previous_response_id anyone continues from.
    pb << Write >> None
    pb << Finish() >> None
    pb << Release(("session:s-1", "a"), keep=True) >> None
    pb << Unhold("a") >> None
    # No Served: the account is not marked successful, nothing is bound.
    assert pb.done
    assert turn.report.outcome == "response.completed"


def test_a_prewarm_answered_with_output_counts_like_any_turn() -> None:
    pb = play(make_turn(PREWARM, SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, DELTA, COMPLETED])
    pb << StartStream >> None
    pb << PublishOwner("a", "resp_1") >> None
    pb.skip_until(Served)


def test_a_prewarm_whose_socket_dies_after_created_is_sent_once_more() -> None:
    turn = make_turn(PREWARM, SESSION)
    pb = play(turn, settings=EngineSettings(retry_budget=0))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED])
    pb << Receive >> Broke(ConnectionLost())
    pb.skip_until(Log)
    assert "free retry (prewarm_resend)" in pb.last.message
    pb >> None
    pb << Choose(PickOwner("a"), claim=False)


def test_a_normal_request_dying_after_created_has_no_such_free_retry() -> None:
    pb = play(make_turn(headers=SESSION), settings=EngineSettings(retry_budget=0))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED])
    pb << Receive >> Broke(ConnectionLost())
    pb.skip_until(Failed)
    pb >> True
    assert "FailHttp" in pb.answer(Log).message
    assert pb.answer(Respond).status == 502


METADATA = json.dumps(
    {
        "type": "response.metadata",
        "headers": {"x-codex-turn-state": "ts-late", "openai-model": "gpt-real"},
        "metadata": {"model_verification": {}},
    }
)
TIMING = json.dumps({"type": "responsesapi.websocket_timing", "timing_metrics": {}})
CODEX_META = json.dumps({"type": "codex.response.metadata", "x": 1})


@pytest.mark.parametrize(
    ("destination", "relayed"),
    [
        (TRUSTED, []),
        (CODEX, ["response.metadata", "codex.response.metadata"]),
    ],
    ids=["v1", "codex"],
)
def test_vendor_events_reach_only_the_clients_that_read_them(
    destination: Destination, relayed: list[str]
) -> None:
    turn = make_turn(headers=SESSION, destination=destination)
    pb = play(turn)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, METADATA, TIMING, CODEX_META, DELTA, COMPLETED])
    start = pb.answer(StartStream)
    # The metadata's headers arrived before the head: they are on it.
    assert ("x-codex-turn-state", "ts-late") in start.headers
    assert ("openai-model", "gpt-real") in start.headers
    pb << PublishOwner >> None
    types = [t for t, _ in sse.parse_sse(pb.answer(Write).data)]
    expected = ["response.created", *relayed, "response.output_text.delta", "response.completed"]
    assert types == expected
    pb << Finish() >> None
    # The session keeps the late turn state for its next turn on this socket.
    pb << Release(("session:s-1", "a"), keep=True, turn_state="ts-late") >> None


def test_a_turn_state_after_the_head_goes_to_the_sessions_next_socket() -> None:
    turn = make_turn(headers=SESSION)
    pb = play(turn)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, DELTA])
    start = pb.answer(StartStream)
    assert not any(k == "x-codex-turn-state" for k, _ in start.headers)
    pb << Write >> None
    pb << Receive >> Frames([METADATA])
    pb << Receive >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR))
    pb.skip_until(Release)
    assert pb.last.turn_state == "ts-late"


def test_a_retry_on_a_new_socket_carries_the_turn_state_the_first_one_was_given() -> None:
    pb = play(make_turn(headers=SESSION))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, METADATA])
    pb << Receive >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR))
    pb.skip_until(Failed)
    pb >> True
    pb.skip_until(Choose)
    pb >> Chosen(A)
    pb.skip_until(GetToken)
    pb >> "tok-a"
    pb << Open
    assert ("x-codex-turn-state", "ts-late") in pb.last.headers


def test_handshake_answer_headers_reach_the_client() -> None:
    pb = play(make_turn(headers=SESSION))
    pb << FindOwner() >> Owned("a")
    pb << Choose >> Chosen(A)
    pb.skip_until(GetToken)
    pb << GetToken(A) >> "tok-a"
    ready = SocketReady(
        [
            ("x-reasoning-included", "true"),
            ("X-Models-Etag", 'W/"m1"'),
            ("openai-model", "gpt-5-codex-2026"),
            ("x-codex-turn-state", "ts-1"),
            ("x-served-by", "node-7"),
            ("x-codex-primary-used-percent", "12"),
        ]
    )
    pb << Open >> ready
    pb.skip_until(Receive, answer=None)
    pb >> Frames([CREATED, DELTA])
    headers = dict(pb.answer(StartStream).headers)
    assert headers["x-reasoning-included"] == "true"
    assert headers["x-models-etag"] == 'W/"m1"'
    assert headers["openai-model"] == "gpt-5-codex-2026"
    assert headers["x-codex-turn-state"] == "ts-1"
    assert "x-served-by" not in headers


def test_an_auth_error_event_refreshes_a_chatgpt_account_and_tries_again() -> None:
    pb = play(make_turn(headers=SESSION))
    pb << FindOwner() >> Owned("r")
    pb << Choose(PickOwner("r"), claim=False) >> Chosen(REFRESHABLE)
    pb.skip_until(GetToken)
    pb << GetToken(REFRESHABLE) >> "old"
    pb << Open >> SocketReady([])
    pb << Send >> None
    auth = error_frame("invalid_api_key", status=401)
    pb << Receive >> Frames([auth])
    # A refused credential: the socket is not kept.
    pb << Release(("session:s-1", "r"), keep=False) >> None
    pb << Unhold("r") >> None
    assert pb.answer(Refresh, True).used_tag
    assert "free retry (token_refreshed)" in pb.answer(Log).message
    pb << Choose(PickOwner("r"), claim=False)


@pytest.mark.parametrize(
    "frame",
    [
        error_frame("invalid_api_key", status=401),
        error_frame("whatever", status=401, type_="authentication_error"),
        error_frame("token_expired", status=401),
        failed_frame("refresh_token_reused"),
    ],
    ids=["invalid_api_key", "authentication_error", "token_expired", "failed-refresh-code"],
)
def test_an_auth_error_without_a_refresh_fails_over_without_hard_affinity(frame: str) -> None:
    pb = soft_on_a()
    pb << Receive >> Frames([CREATED, frame])
    pb << Release(SOFT_KEY_A, keep=False) >> None
    pb << Unhold("a") >> None
    # `a` has no refresh token; the pool disables it (is_auth_rejection).
    pb << Failed >> False
    assert "RetryOther" in pb.answer(Log).message
    pb << Choose(PickAny(frozenset({"a"}), None), claim=True)


def test_a_permanent_auth_code_is_never_refreshed() -> None:
    pb = play(make_turn(SOFT_BODY))
    pb << FindOwner() >> Unbound()
    pb << Choose >> Chosen(REFRESHABLE)
    pb.skip_until(GetToken)
    pb << GetToken(REFRESHABLE) >> "tok"
    pb << Open >> SocketReady([])
    pb << Send >> None
    pb << Receive >> Frames([error_frame("token_expired", status=401)])
    pb << Release(("prompt-cache:k", "r"), keep=False) >> None
    pb << Unhold("r") >> None
    # Straight to the pool's verdict: no Refresh.
    pb << Failed >> False


def test_account_bound_content_is_reported_with_its_code_and_never_moved() -> None:
    pb = soft_on_a()
    pb << Receive >> Frames([error_frame("invalid_encrypted_content")])
    pb << Release(SOFT_KEY_A, keep=True) >> None
    pb << Unhold("a") >> None
    pb << Failed >> True
    assert "Relay" in pb.answer(Log).message
    answer = pb.answer(Respond)
    assert answer.status == 400
    assert json.loads(answer.body)["error"]["code"] == "invalid_encrypted_content"
    assert pb.done


def test_the_first_event_has_its_own_deadline_over_every_attempt() -> None:
    time = FakeTime()
    settings = EngineSettings(first_event_timeout_s=10.0, idle_timeout_s=300.0)
    pb = play(make_turn(headers=SESSION), settings=settings, time=time)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(10.0)
    time.now += 6
    pb >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR))
    pb.skip_until(Failed)
    pb >> True
    pb.skip_until(Choose)
    pb >> Chosen(A)
    pb.skip_until(GetToken)
    pb >> "tok-a"
    pb << Open >> SocketReady([])
    pb << Send >> None
    # The second attempt has what is left of the request's 10 s.
    pb << Receive(4.0)
    time.now += 4
    pb >> TimedOut()
    failed = pb.skip_until(Failed)
    assert failed.failure == UpstreamSilent(10.0, first_event=True)
    pb >> True
    answer = pb.skip_until(Respond)
    assert answer.status == 504
    assert json.loads(answer.body)["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize("status", [413, 431])
def test_a_request_the_upstream_refuses_for_its_size_is_answered_once(status: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": "too big",
                "type": "invalid_request_error",
                "code": "request_too_large",
                "param": None,
            }
        }
    ).encode()
    pb = play(make_turn(headers=SESSION))
    pb << FindOwner() >> Owned("a")
    pb << Choose >> Chosen(A)
    pb.skip_until(GetToken)
    pb << GetToken(A) >> "tok-a"
    pb << Open >> Broke(HandshakeRejected(status, body=body))
    pb.skip_until(Failed)
    pb >> True
    answer = pb.skip_until(Respond)
    assert answer.status == status
    assert json.loads(answer.body)["error"]["code"] == "request_too_large"
    pb >> None
    assert pb.done


def test_codex_clients_are_kept_alive_before_created_with_an_event() -> None:
    time = FakeTime()
    settings = EngineSettings(keepalive_s=15.0)
    pb = play(make_turn(headers=SESSION, destination=CODEX), settings=settings, time=time)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(15.0)
    time.now += 15
    pb >> TimedOut()
    pb << StartStream >> None
    keepalive = pb.answer(Write).data
    assert sse.parse_sse(keepalive) == [("codex.keepalive", '{"type":"codex.keepalive"}')]
    pb << Receive(15.0) >> Frames([CREATED, DELTA])
    # The head is out already: events follow without another StartStream.
    pb << Write >> None


def test_public_clients_get_nothing_before_created() -> None:
    pb = play(make_turn(headers=SESSION), settings=EngineSettings(keepalive_s=15.0))
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(240.0)


def test_a_failure_after_a_keepalive_ends_the_stream_with_the_error() -> None:
    time = FakeTime()
    settings = EngineSettings(keepalive_s=15.0, retry_budget=0)
    turn = make_turn(headers=SESSION, destination=CODEX)
    pb = play(turn, settings=settings, time=time)
    open_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb << Send >> None
    pb << Receive(15.0)
    time.now += 15
    pb >> TimedOut()
    pb << StartStream >> None
    pb << Write >> None
    pb << Receive >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR))
    pb.skip_until(Failed)
    pb >> True
    written = pb.skip_until(Write, answer=None)
    (failed,) = sse.parse_sse(written.data)
    assert failed[0] == "response.failed"
    assert json.loads(failed[1])["response"]["error"]["code"] == "owner_unavailable"
    pb >> None
    pb << Finish() >> None
    assert (turn.report.outcome, turn.report.status) == ("error", 200)


def test_a_turn_state_never_goes_to_another_account() -> None:
    pb = play(make_turn(SOFT_BODY))
    open_on(pb, A, PickAny(frozenset(), None))
    pb << Send >> None
    pb << Receive >> Frames([CREATED, METADATA])
    pb << Receive >> Broke(UpstreamClosed(CloseCode.INTERNAL_ERROR))
    pb.skip_until(Failed)
    pb >> True
    pb.skip_until(Choose)
    pb >> Chosen(B)
    pb.skip_until(GetToken)
    pb >> "tok-b"
    pb << Open
    assert not any(k == "x-codex-turn-state" for k, _ in pb.last.headers)
    pb >> SocketReady([])
    pb << Send >> None
    pb << Receive >> Frames([CREATED, DELTA, COMPLETED])
    pb.skip_until(Release, answer=None)
    # Nor is a's late turn state kept on b's socket.
    assert pb.last.turn_state is None
