"""A forwarded request's engine as playbooks: the pool's rules for compaction, models,
one response and the side endpoints, without a socket, clock or store."""

from __future__ import annotations

import json
from typing import Any

from responses_ws_bridge.core.account_pool import AllCoolingDown, Chosen, NoneUsable
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import NO_AFFINITY, Affinity, AffinityKind, classify
from responses_ws_bridge.core.attempt_plan import PickAny, PickOwner
from responses_ws_bridge.core.create_request import CreateRequest
from responses_ws_bridge.core.failures import ConnectFailed, HandshakeRejected
from responses_ws_bridge.core.forward_commands import (
    Abort,
    BodyChunk,
    CacheLookup,
    CacheStore,
    DropFetch,
    Fetch,
    Fetched,
    ReadBody,
)
from responses_ws_bridge.core.forward_engine import ForwardEngine
from responses_ws_bridge.core.forward_policy import CachedAnswer
from responses_ws_bridge.core.pool_routes import Route, RouteKind
from responses_ws_bridge.core.rate_limits import from_headers
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Choose,
    ClientLeft,
    Failed,
    FindOwner,
    Finish,
    GetToken,
    Hold,
    Log,
    NoteFigures,
    Owned,
    PublishOwner,
    Refresh,
    Respond,
    Served,
    Sleep,
    StartStream,
    TimedOut,
    Unbound,
    Unhold,
    Write,
)
from responses_ws_bridge.core.turn_engine import Clocks, EngineSettings
from responses_ws_bridge.core.turns import Destination, ForwardedHttp, Turn

from tests.support.playbook import Playbook

A = Account("a", "tok-a")
B = Account("b", "tok-b", chatgpt_account_id="acct-b")
REFRESHABLE = Account("r", "tok-r", refresh_token="rt-r")
SESSION = [("session-id", "s-1"), ("authorization", "Bearer client-key")]
COMPACT_BODY = {"model": "m", "input": "long context"}
JSON = [("content-type", "application/json")]


def forwarded(
    route: Route,
    *,
    method: str = "POST",
    path: str = "/v1/responses/compact",
    headers: list[tuple[str, str]] | None = None,
    body: dict[str, Any] | None = None,
    host: str = "api.openai.com",
    affinity: Affinity | None = None,
) -> Turn:
    raw = json.dumps(body).encode() if body is not None else b""
    client_headers = tuple(headers or [])
    parsed = body or {}
    return Turn(
        flow_id="f1",
        create=CreateRequest(stream=False, message=b"", body=parsed),
        client_headers=client_headers,
        request_id="req-1",
        destination=Destination("https", host, 443, path),
        affinity=affinity or classify(client_headers, parsed),
        client_credential=None,
        http=ForwardedHttp(route, method, raw),
    )


def compaction(headers: list[tuple[str, str]] | None = None, **body: Any) -> Turn:
    return forwarded(
        Route(RouteKind.COMPACT), headers=SESSION if headers is None else headers,
        body={**COMPACT_BODY, **body},
    )  # fmt: skip


def one_response(method: str = "GET", response_id: str = "resp_1") -> Turn:
    affinity = Affinity(AffinityKind.SOFT, owner_hint=response_id)
    return forwarded(
        Route(RouteKind.ONE_RESPONSE, response_id),
        method=method,
        path=f"/v1/responses/{response_id}",
        affinity=affinity,
    )


def models() -> Turn:
    return forwarded(Route(RouteKind.MODELS), method="GET", path="/v1/models", affinity=NO_AFFINITY)


def play(turn: Turn, *, secrets: tuple[str, ...] = ()) -> Playbook:
    engine = ForwardEngine(
        turn,
        EngineSettings(),
        accounts_own_upstreams=False,
        scrub=SecretScrubber(secrets),
        clocks=Clocks(lambda: 1000.0, lambda: 1_700_000_000.0),
        jitter=lambda: 0.0,
    )
    return Playbook(engine.run())


def fetch_on(pb: Playbook, account: Account, pick: Any, *, owner: object = None) -> Fetch:
    """From the start to the exchange's request on `account`."""
    pb << FindOwner() >> (owner or Unbound())
    pb << Choose(pick, claim=owner is None or isinstance(owner, Unbound)) >> Chosen(account)
    if isinstance(pb.next_command(), Bind):
        pb << Bind(account.id) >> None
    pb << Hold(account.id) >> None
    pb << GetToken(account) >> account.bearer
    pb << Fetch
    return pb.last  # type: ignore[no-any-return]


def again_on(pb: Playbook, account: Account, pick: Any) -> Fetch:
    """A retry, from the next Choose to its exchange's request."""
    pb << Choose(pick, claim=isinstance(pick, PickAny)) >> Chosen(account)
    pb << Hold(account.id) >> None
    pb << GetToken(account) >> account.bearer
    pb << Fetch
    return pb.last  # type: ignore[no-any-return]


def relayed(pb: Playbook, account: str, body: bytes, *, found: str | None = None) -> None:
    """The answer streams back unchanged; the attempt ends served."""
    pb << StartStream(200, JSON) >> None
    pb << ReadBody(300.0) >> BodyChunk(body, True)
    pb << Write(body) >> None
    pb << DropFetch() >> None
    pb << Finish() >> None
    pb << Unhold(account) >> None
    if found is not None:
        pb << PublishOwner(account, found) >> None
    pb << Served(account, found) >> None
    assert pb.done


def test_a_hard_sessions_compaction_goes_to_its_owner_with_the_owners_credential() -> None:
    turn = compaction()
    pb = play(turn)
    fetch = fetch_on(pb, B, PickOwner("b"), owner=Owned("b"))
    assert fetch.url == "https://api.openai.com/v1/responses/compact"
    assert fetch.method == "POST" and fetch.body == turn.http.body  # type: ignore[union-attr]
    assert fetch.headers == [
        ("session-id", "s-1"),
        ("Authorization", "Bearer tok-b"),
        ("chatgpt-account-id", "acct-b"),
    ]
    pb >> Fetched(200, "OK", JSON)
    relayed(pb, "b", b'{"object":"response.compaction"}')
    assert (turn.report.account, turn.report.outcome, turn.report.status) == ("b", "http 200", 200)
    assert turn.report.describe().startswith("forwarded compact · hard session:s-1 · account b")


def test_a_new_session_compaction_binds_its_keys_to_the_account_chosen() -> None:
    pb = play(compaction())
    fetch_on(pb, A, PickAny(frozenset(), None))
    pb >> Fetched(200, "OK", JSON)
    relayed(pb, "a", b"{}")


def test_rate_limit_headers_of_the_answer_are_the_accounts_figures() -> None:
    pb = play(compaction())
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    headers = [*JSON, ("x-codex-primary-used-percent", "42")]
    pb >> Fetched(200, "OK", headers)
    pb << NoteFigures("a", from_headers(headers)) >> None
    pb << StartStream(200, headers)


def test_a_hard_owner_429_is_the_clients_answer_and_no_other_account_is_asked() -> None:
    turn = compaction()
    pb = play(turn)
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    limited = b'{"error":{"code":"rate_limit_exceeded","message":"slow down"}}'
    pb >> Fetched(429, "Too Many Requests", [*JSON, ("retry-after", "7")])
    pb << ReadBody(300.0, 64 * 1024) >> BodyChunk(limited, True)
    pb << DropFetch() >> None
    pb << Unhold("a") >> None
    failed = pb.answer(Failed, False)
    assert failed.failure == HandshakeRejected(429, retry_after_s=7.0)
    pb.answer(Log)
    respond = pb.answer(Respond)
    assert respond.status == 429 and json.loads(respond.body) == json.loads(limited)
    assert ("retry-after", "7") in respond.headers
    assert pb.done


def test_a_soft_compaction_moves_after_a_5xx() -> None:
    turn = compaction(headers=[], prompt_cache_key="k")
    assert turn.affinity.kind is AffinityKind.SOFT
    pb = play(turn)
    fetch_on(pb, A, PickAny(frozenset(), None))
    pb >> Fetched(503, "Service Unavailable", JSON)
    pb << ReadBody >> BodyChunk(b"{}", True)
    pb << DropFetch() >> None
    pb << Unhold("a") >> None
    pb << Failed("a", HandshakeRejected(503)) >> True
    assert "RetryOther" in pb.answer(Log).message
    again_on(pb, B, PickAny(frozenset({"a"}), None))
    pb >> Fetched(200, "OK", JSON)
    relayed(pb, "b", b"{}")


def test_a_hard_owner_5xx_is_retried_on_the_owner_only() -> None:
    pb = play(compaction())
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Broke(ConnectFailed("refused"))
    pb << Unhold("a") >> None
    pb << Failed("a", ConnectFailed("refused")) >> True
    assert "RetrySame" in pb.answer(Log).message
    pb << Sleep >> None
    again_on(pb, A, PickOwner("a"))


def test_a_401_refreshes_the_token_and_tries_the_same_account_for_free() -> None:
    turn = compaction()
    pb = play(turn)
    fetch_on(pb, REFRESHABLE, PickOwner("r"), owner=Owned("r"))
    pb >> Fetched(401, "Unauthorized", JSON)
    pb << ReadBody >> BodyChunk(b"{}", True)
    pb << DropFetch() >> None
    pb << Unhold("r") >> None
    pb << Refresh(REFRESHABLE, turn.report.attempts[0].credential_tag or "") >> True
    assert "free retry (token_refreshed)" in pb.answer(Log).message
    again_on(pb, REFRESHABLE, PickOwner("r"))


def test_an_unknown_response_is_asked_of_each_account_until_one_has_it() -> None:
    turn = one_response()
    pb = play(turn)
    fetch = fetch_on(pb, A, PickAny(frozenset(), None))
    assert (fetch.method, fetch.url) == ("GET", "https://api.openai.com/v1/responses/resp_1")
    pb >> Fetched(404, "Not Found", JSON)
    pb << ReadBody >> BodyChunk(b'{"error":{}}', True)
    pb << DropFetch() >> None
    pb << Unhold("a") >> None
    # Not a failure of a: no health, no budget, just the next account.
    again_on(pb, B, PickAny(frozenset({"a"}), None))
    pb >> Fetched(200, "OK", JSON)
    relayed(pb, "b", b'{"id":"resp_1"}', found="resp_1")
    assert turn.report.attempts[0].outcome == "http 404"


def test_when_no_account_has_the_response_the_client_gets_the_404() -> None:
    pb = play(one_response("DELETE"))
    fetch_on(pb, A, PickAny(frozenset(), None))
    pb >> Fetched(404, "Not Found", JSON)
    pb << ReadBody >> BodyChunk(b'{"error":{"message":"no"}}', True)
    pb << DropFetch() >> None
    pb << Unhold("a") >> None
    pb << Choose(PickAny(frozenset({"a"}), None), claim=True) >> NoneUsable("excluded")
    pb << Respond(404, tuple(JSON), b'{"error":{"message":"no"}}') >> None
    assert pb.done


def test_a_known_producer_is_the_only_account_asked() -> None:
    pb = play(one_response())
    fetch_on(pb, B, PickOwner("b"), owner=Owned("b", from_store=True))
    pb >> Fetched(404, "Not Found", JSON)
    # Its own 404 is the answer: relayed, not probed elsewhere.
    pb << StartStream(404, JSON)


def test_a_memory_of_the_producer_while_the_store_is_away_still_routes() -> None:
    pb = play(one_response())
    pb << FindOwner() >> Unbound(prefer="b")
    pb << Choose(PickOwner("b"), claim=False)


def test_models_come_from_the_cache_when_fresh() -> None:
    turn = models()
    pb = play(turn)
    key = "https://api.openai.com:443/v1/models"
    pb << CacheLookup(key) >> CachedAnswer(200, tuple(JSON), b'{"data":[]}')
    pb << Respond(200, tuple(JSON), b'{"data":[]}') >> None
    assert pb.done and turn.report.outcome == "cached 200"


def test_a_cache_miss_fetches_once_and_keeps_the_answer_for_the_others() -> None:
    pb = play(models())
    pb << CacheLookup >> None
    fetch_on(pb, A, PickAny(frozenset(), None))
    pb >> Fetched(200, "OK", JSON)
    pb << ReadBody(300.0, 1024 * 1024) >> BodyChunk(b'{"data":[]}', True)
    pb << DropFetch() >> None
    stored = CachedAnswer(200, tuple(JSON), b'{"data":[]}')
    pb << CacheStore("https://api.openai.com:443/v1/models", stored) >> None
    pb << Respond(200, tuple(JSON), b'{"data":[]}') >> None
    pb << Unhold("a") >> None
    pb << Served("a", None) >> None
    assert pb.done


def test_a_miss_that_gets_nothing_to_keep_still_ends_its_lead() -> None:
    pb = play(models())
    pb << CacheLookup >> None
    pb << FindOwner() >> Unbound()
    pb << Choose >> AllCoolingDown(0.0, 5)
    pb << Respond >> None
    pb << CacheStore("https://api.openai.com:443/v1/models", None) >> None
    assert pb.done


def test_a_client_that_leaves_mid_answer_closes_the_exchange_and_gives_back_the_account() -> None:
    turn = compaction()
    pb = play(turn)
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Fetched(200, "OK", JSON)
    pb << StartStream >> None
    pb << ReadBody >> BodyChunk(b"{", False)
    pb << Write(b"{") >> ClientLeft()
    pb << DropFetch() >> None
    pb << Unhold("a") >> None
    assert pb.done and turn.report.outcome == "client_gone"


def test_an_upstream_that_breaks_off_mid_answer_cuts_the_clients_answer() -> None:
    pb = play(compaction())
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Fetched(200, "OK", JSON)
    pb << StartStream >> None
    pb << ReadBody >> TimedOut()
    pb << DropFetch() >> None
    pb << Abort("upstream silent mid-answer") >> None
    pb << Unhold("a") >> None


def test_an_untrusted_destination_is_refused_before_any_account_is_chosen() -> None:
    pb = play(forwarded(Route(RouteKind.OTHER), host="attacker.example", path="/v1/files"))
    assert "not a trusted upstream" in pb.answer(Log).message
    respond = pb.answer(Respond)
    assert respond.status == 403
    assert json.loads(respond.body)["error"]["code"] == "untrusted_upstream"
    assert pb.done


def test_secrets_in_upstream_answer_headers_are_cut_out() -> None:
    pb = play(compaction(), secrets=("tok-a",))
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Fetched(200, "OK", [("x-echo", "Bearer tok-a")])
    start = pb.answer(StartStream)
    assert start.headers == [("x-echo", "Bearer <redacted>")]


def test_a_known_secret_in_a_forwarded_answer_is_cut_out_even_across_pieces() -> None:
    pb = play(compaction(), secrets=("tok-a",))
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Fetched(200, "OK", JSON)
    pb << StartStream >> None
    pb << ReadBody >> BodyChunk(b'{"echo":"tok', False)
    written = b""
    while not isinstance(pb.next_command(), Finish):
        command = pb.next_command()
        if isinstance(command, Write):
            written += command.data
            pb >> None
        elif isinstance(command, ReadBody):
            pb >> BodyChunk(b'-a"}', True)
        else:
            pb >> None
    assert written == b'{"echo":"<redacted>"}'


def test_a_compressed_answer_goes_as_it_is() -> None:
    pb = play(compaction(), secrets=("tok-a",))
    fetch_on(pb, A, PickOwner("a"), owner=Owned("a"))
    pb >> Fetched(200, "OK", [*JSON, ("content-encoding", "gzip")])
    pb << StartStream >> None
    pb << ReadBody >> BodyChunk(b"\x1f\x8btok-a", True)
    pb << Write(b"\x1f\x8btok-a")
