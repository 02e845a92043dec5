"""A client's WebSocket on `…/responses`, served by the pool: a sans-I/O machine.

Codex CLI with `supports_websockets` (its default for ChatGPT logins) and the
SDKs' realtime-style clients talk the Responses WebSocket protocol to their
base URL. Through a pool the client's socket is answered by the bridge, and
each of its messages goes upstream on a socket of the bridge's own, with the
chosen account's credential and the handshake the header policy builds
(`handshake_headers`, the beta-token rule): one upstream socket per client
socket, its frames relayed back as they came (minus known secrets),
`codex.rate_limits` frames included (a WebSocket client reads them itself;
they are the account's figures too).

| when                            | account                          | upstream socket opened     |
|---------------------------------|----------------------------------|----------------------------|
| handshake with hard affinity    | the owner (or chosen and bound)  | before the client's 101:   |
| headers                         |                                  | its 101 headers are relayed|
| otherwise                       | from the first `response.create` | with that first message    |
|                                 | (`previous_response_id`,         |                            |
|                                 | `prompt_cache_key`) and headers  |                            |

Each client message is a turn (`turns.Turn`, its own report): sent on the
held socket, or on a new one, and its events relayed until the terminal one.
Before the first event of a response, a failure (close 1011, a drop, the
socket age limit, a rate-limit error event, a handshake 401/429/5xx) is
retried as the HTTP bridge retries it (`AttemptPlan`, the `retry_policy`
table: a hard session never leaves its owner); when nothing is left, the
client gets the `error` event the Responses WebSocket sends (status, error
object) and its socket stays open for its next message, or, when its
handshake is still unanswered, the HTTP error a bridged request would get.
After the first event nothing is replayed: the client's socket ends with the
close the upstream gave (a drop is a drop).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from responses_ws_bridge.core import openai_errors, routing, upstream_trust
from responses_ws_bridge.core.account_pool import Chosen, NoneUsable, fail_http_for_choice
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import AffinityKind, classify
from responses_ws_bridge.core.attempt_plan import AttemptPlan, PickClient
from responses_ws_bridge.core.attempt_url import attempt_url
from responses_ws_bridge.core.create_request import CreateRequest, decision_fields_of
from responses_ws_bridge.core.failures import (
    REFRESH_FAILED,
    ConnectFailed,
    ConnectionLost,
    Failure,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamSilent,
    is_connection_limit,
    is_rate_limit,
)
from responses_ws_bridge.core.handshake_headers import (
    UpstreamCredential,
    upstream_handshake_headers,
)
from responses_ws_bridge.core.pool_steps import Ask, Left, PoolSteps
from responses_ws_bridge.core.rate_limits import FRAME_TYPE, from_frame, from_headers
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.token_refresh import fingerprint
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Choose,
    FailClosed,
    FindOwner,
    GetToken,
    Hold,
    Open,
    Owned,
    PublishOwner,
    Receive,
    RefreshRefused,
    Release,
    Send,
    Served,
    Sleep,
    SocketReady,
    TimedOut,
    Unhold,
)
from responses_ws_bridge.core.turn_engine import Clocks, EngineSettings
from responses_ws_bridge.core.turns import CLIENT_GONE, ERROR, Attempt, Destination, Turn
from responses_ws_bridge.core.upstream_events import inspect_event, parse_error_event
from responses_ws_bridge.core.ws_client_commands import (
    AcceptClient,
    ClientClose,
    ClientClosed,
    ClientRecv,
    ClientSend,
    ClientText,
    Idle,
    NewTurn,
    RefuseClient,
)
from responses_ws_bridge.core.ws_client_commands import (
    Attach as AttachTurn,
)

WsClientRun = Generator[Any, Any, None]

# Fields of the upstream's 101 that belong to its own handshake, not the client's.
_HANDSHAKE_OWN = frozenset(
    {
        "connection",
        "upgrade",
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "content-length",
        "transfer-encoding",
        "date",
        "server",
    }
)
# Close codes a client may be sent as they are (RFC 6455 §7.4; 1005 and 1006 never go on the wire).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


@dataclass(frozen=True)
class WsClientRequest:
    """A client's WebSocket upgrade, as the `request` hook saw it."""

    flow_id: str
    headers: tuple[tuple[str, str], ...]
    destination: Destination
    request_id: str
    reverse_target: upstream_trust.Endpoint | None = None
    own_endpoints: tuple[upstream_trust.Endpoint, ...] = ()


def client_101_headers(upstream: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """What of the upstream's 101 the client's 101 carries (turn state, models, rate limits)."""
    return [(k, v) for k, v in upstream if k.lower() not in _HANDSHAKE_OWN]


def close_for(failure: Failure) -> tuple[int | None, str]:
    """The close a client gets when its upstream broke off mid-response (None: a drop)."""
    if isinstance(failure, UpstreamClosed) and failure.code in _SENDABLE:
        return failure.code, failure.reason
    if isinstance(failure, ConnectionLost) or (
        isinstance(failure, UpstreamClosed) and not failure.by_bridge
    ):
        return None, ""
    return 1011, "upstream connection lost"


def error_event(error: openai_errors.HttpError) -> str:
    """The Responses WebSocket's `error` event for what a bridged request would answer."""
    try:
        body = json.loads(error.body)
    except ValueError:
        body = {}
    detail = body.get("error") if isinstance(body, dict) else None
    event: dict[str, Any] = {"type": "error", "status": error.status}
    event["error"] = detail if isinstance(detail, dict) else {"message": "upstream error"}
    kept = {k: v for k, v in error.headers if k.lower() == "retry-after"}
    if kept:
        event["headers"] = kept
    return json.dumps(event, separators=(",", ":"))


class _Done:
    """The turn reached its terminal event."""


class _Closed:
    """The client's socket was closed for it (its upstream broke off mid-response)."""


_DONE = _Done()
_CLOSED = _Closed()


class WsClientEngine(PoolSteps):
    def __init__(
        self,
        request: WsClientRequest,
        settings: EngineSettings,
        *,
        accounts_own_upstreams: bool,
        scrub: SecretScrubber,
        clocks: Clocks,
        jitter: Callable[[], float],
        turns: list[Turn] | None = None,
    ) -> None:
        super().__init__(request_id=request.request_id, scrub=scrub, clocks=clocks, jitter=jitter)
        self.request = request
        self.settings = settings
        self._own_upstreams = accounts_own_upstreams
        # Every turn of the session, the handshake's first: their reports (`turns`: a list
        # the caller reads as the session goes).
        self.turns: list[Turn] = turns if turns is not None else []
        self._turn: Turn | None = None
        self._first = self._new_turn(None)
        self._attempt: Attempt | None = None
        # The upstream socket the session holds, and its account.
        self._account: Account | None = None
        # The held socket has served no turn yet (opened for this one, or the handshake).
        self._fresh = False
        self._url_held = ""
        self._held: str | None = None
        # The client's socket was answered 101 (False: its upgrade is still waiting).
        self._accepted = False

    # -- the session ------------------------------------------------------------------------

    def run(self) -> WsClientRun:
        try:
            yield from self._serve()
        except Left:
            yield from self._let_go()

    def _serve(self) -> WsClientRun:
        refused = self._refusal()
        if refused is not None:
            yield from self._log("refused: the destination is not a trusted upstream")
            yield from self._ask(RefuseClient(refused.status, refused.headers, refused.body))
            return
        first = self._first
        yield from self._ask(NewTurn(first))
        headers: list[tuple[str, str]] = []
        if first.affinity.kind is AffinityKind.HARD:
            # The account is known from the handshake: the upstream's answer is the client's.
            opened = yield from self._open_for(first)
            if isinstance(opened, openai_errors.HttpError):
                first.report.outcome, first.report.status = ERROR, opened.status
                error = self._scrub.error(opened)
                yield from self._ask(RefuseClient(error.status, error.headers, error.body))
                return
            headers = client_101_headers(opened.response_headers)
            first.report.outcome, first.report.status = "101", 101
            self._turn_attempt().outcome = "opened"
        yield from self._ask(AcceptClient(headers))
        self._accepted = True
        while True:
            got = yield from self._ask(ClientRecv())
            if isinstance(got, ClientClosed):
                yield from self._client_closed(got)
                return
            assert isinstance(got, ClientText)
            if not (yield from self._serve_turn(got.text)):
                return

    def _refusal(self) -> openai_errors.HttpError | None:
        return upstream_trust.refusal_of(
            self.request,
            pool_mode=True,
            option=self.settings.upstream_option,
            accounts_own_upstreams=self._own_upstreams,
            trusted_hosts=self.settings.trusted_hosts,
        )

    def _new_turn(self, text: str | None) -> Turn:
        body = decision_fields_of(text) if text is not None else {}
        request = self.request
        number = len(self.turns)
        turn = Turn(
            flow_id=request.flow_id,
            create=CreateRequest(True, (text or "").encode("utf-8", "surrogatepass"), body),
            client_headers=request.headers,
            request_id=request.request_id if number == 0 else f"{request.request_id}-{number}",
            destination=request.destination,
            affinity=classify(request.headers, body),
            client_credential=None,
            reverse_target=request.reverse_target,
            own_endpoints=request.own_endpoints,
        )
        self.turns.append(turn)
        self._turn = turn
        return turn

    # -- opening an upstream socket ---------------------------------------------------------

    def _plan(self, turn: Turn) -> Ask:
        """The turn's retry loop state (an HttpError when the store cannot say the owner)."""
        found = yield from self._ask(FindOwner())
        if isinstance(found, FailClosed):
            return openai_errors.state_store_unavailable()
        owner = found.account_id if isinstance(found, Owned) else found.prefer
        held = self._account.id if self._account is not None else None
        if held is not None and isinstance(found, Owned) and found.account_id != held:
            # The turn belongs to another account (its previous response is there).
            yield from self._release(1000, "the session moves to its owner")
        elif held is not None:
            owner = held
        return AttemptPlan(
            turn.affinity.kind, owner=owner, pooled=True, retry_budget=self.settings.retry_budget
        )

    def _open_for(self, turn: Turn) -> Ask:
        """A socket for the turn from a fresh plan: SocketReady, or the client's error."""
        plan = yield from self._plan(turn)
        if isinstance(plan, openai_errors.HttpError):
            return plan
        last: Failure | None = None
        while True:
            got = yield from self._open_next(plan, turn, last)
            if not isinstance(got, tuple):
                return got
            account, failure = got
            assert self._attempt is not None
            verdict = yield from self._judge(plan, account, self._attempt, failure)
            if verdict is not True:
                return verdict
            last = failure

    def _open_next(self, plan: AttemptPlan, turn: Turn, last: Failure | None) -> Ask:
        """The next attempt's socket: SocketReady, (account, failure), or the client's error."""
        account = yield from self._pick(plan, last)
        if not isinstance(account, Account):
            return account
        if plan.picked(account.id):
            yield from self._ask(Bind(account.id))
        attempt = self._attempt = Attempt(plan.attempts, account.id, "")
        turn.report.account = account.id
        turn.report.attempts.append(attempt)
        opened = yield from self._open(account, attempt, turn)
        if isinstance(opened, SocketReady):
            self._account, self._fresh, self._url_held = account, True, attempt.url
            return opened
        return account, opened

    def _pick(self, plan: AttemptPlan, last: Failure | None) -> Ask:
        """The account of the next attempt, or the client's error."""
        while True:
            pick = plan.next_pick()
            assert not isinstance(pick, PickClient), "a WebSocket client is served by a pool"
            choice = yield from self._ask(Choose(pick, claim=plan.owner is None))
            if isinstance(choice, FailClosed):
                return openai_errors.state_store_unavailable()
            if isinstance(choice, Chosen):
                return choice.account
            if isinstance(choice, NoneUsable) and choice.reason == "excluded":
                again = plan.start_over(jitter=self._jitter())
                if again is not None:
                    yield from self._ask(Sleep(again.delay_s))
                    continue
            fail = fail_http_for_choice(choice, affinity=plan.kind, last_failure=last)
            return openai_errors.for_decision(fail)

    def _open(self, account: Account, attempt: Attempt, turn: Turn) -> Ask:
        url = self._url(account)
        if not isinstance(url, str):
            return url
        attempt.url = url
        token = yield from self._ask(GetToken(account))
        if isinstance(token, RefreshRefused):
            yield from self._refresh_refused(account, token)
            return ConnectFailed(token.reason, cause=REFRESH_FAILED)
        attempt.credential_tag = fingerprint(token)
        headers = upstream_handshake_headers(
            turn.client_headers,
            UpstreamCredential(token, account.chatgpt_account_id),
            request_id=turn.request_id,
            pool_mode=True,
        )
        opened = yield from self._ask(Open(url, headers, account.id, attempt))
        if isinstance(opened, Broke):
            if isinstance(opened.failure, HandshakeRejected):
                yield from self._note(account.id, from_headers(opened.failure.headers))
            return opened.failure
        attempt.preconnected = opened.preconnected
        yield from self._note(account.id, from_headers(opened.response_headers))
        return opened

    def _url(self, account: Account) -> str | Failure:
        return attempt_url(
            routing.upstream_url,
            option=self.settings.upstream_option,
            account=account,
            destination=self.request.destination,
            own_endpoints=self.request.own_endpoints,
        )

    # -- one turn ---------------------------------------------------------------------------

    def _serve_turn(self, text: str) -> Ask:
        """One client message to its terminal event; False when the client's socket ended."""
        turn = self._new_turn(text)
        yield from self._ask(NewTurn(turn))
        plan = yield from self._plan(turn)
        last: Failure | None = None
        while isinstance(plan, AttemptPlan):
            result = yield from self._attempt_turn(plan, turn, last)
            if isinstance(result, _Done):
                return True
            if isinstance(result, _Closed):
                return False
            if isinstance(result, openai_errors.HttpError):
                plan = result
                break
            account, last = result
            verdict = yield from self._judge(plan, account, self._turn_attempt(), last)
            if verdict is not True:
                plan = verdict
        yield from self._refuse_turn(turn, plan)
        return True

    def _attempt_turn(self, plan: AttemptPlan, turn: Turn, last: Failure | None) -> Ask:
        """One attempt: _DONE, _CLOSED (the client's socket ended), (account, failure) to
        judge, or the client's error."""
        account = self._account
        if account is not None:
            plan.picked(account.id)
            # A socket that already served a turn is a reused one (found dead: no strike).
            reused = not self._fresh
            attempt = self._attempt = Attempt(
                plan.attempts, account.id, self._url_held, reused=reused
            )
            turn.report.account = account.id
            turn.report.attempts.append(attempt)
            yield from self._ask(AttachTurn(attempt))
        else:
            got = yield from self._open_next(plan, turn, last)
            if not isinstance(got, SocketReady):
                return got
            account = self._account
            assert account is not None
        result = yield from self._exchange(account, turn)
        if isinstance(result, _Done):
            return result
        failure, seen = result
        if not seen:
            return account, failure
        # Events went out: nothing is replayed, the client gets the close it would have had.
        code, reason = close_for(failure)
        turn.report.outcome = "stream_incomplete"
        yield from self._ask(ClientClose(code, self._scrub(reason)))
        return _CLOSED

    def _turn_attempt(self) -> Attempt:
        assert self._attempt is not None
        return self._attempt

    def _exchange(self, account: Account, turn: Turn) -> Ask:
        """Sends the turn's message, relays its frames: _DONE, or (failure, seen an event)."""
        attempt = self._turn_attempt()
        yield from self._ask(Hold(account.id))
        self._held = account.id
        sent = yield from self._ask(Send(turn.create.message.decode("utf-8", "surrogatepass")))
        result: _Done | tuple[Failure, bool]
        if isinstance(sent, Broke):
            result = (sent.failure, False)
        else:
            result = yield from self._relay(account, attempt, turn)
        self._held = None
        yield from self._ask(Unhold(account.id))
        if isinstance(result, tuple):
            yield from self._release(1000, "")
        return result

    def _relay(self, account: Account, attempt: Attempt, turn: Turn) -> Ask:
        seen = False
        response_id: str | None = None
        while True:
            got = yield from self._ask(Receive(self.settings.idle_timeout_s))
            if isinstance(got, Broke):
                return got.failure, seen
            if isinstance(got, TimedOut):
                return UpstreamSilent(self.settings.idle_timeout_s or 0.0), seen
            for frame in got.frames:
                if isinstance(frame, bytes):
                    yield from self._ask(ClientSend(frame))
                    seen = True
                    continue
                info = inspect_event(frame)
                if info.type == FRAME_TYPE:
                    yield from self._note(account.id, from_frame(frame))
                    yield from self._ask(ClientSend(self._scrub.known(frame)))
                    continue
                if info.type == "error" and not seen:
                    refused = parse_error_event(frame, wall_now=self._clocks.wall())
                    if refused is not None and (
                        is_rate_limit(refused) or is_connection_limit(refused)
                    ):
                        yield from self._note(account.id, from_headers(refused.headers.items()))
                        return refused, False
                response_id = info.response_id or response_id
                if info.type == "response.completed" and response_id is not None:
                    # Known as its producer's before the client can ask anyone about it.
                    yield from self._ask(PublishOwner(account.id, response_id))
                yield from self._ask(ClientSend(self._scrub.known(frame)))
                seen = True
                if info.terminal:
                    return (
                        yield from self._turn_done(account, attempt, turn, info.type, response_id)
                    )

    def _turn_done(
        self, account: Account, attempt: Attempt, turn: Turn, terminal: str | None, rid: str | None
    ) -> Ask:
        attempt.outcome = terminal or "terminal"
        turn.report.outcome, turn.report.status = attempt.outcome, 101
        delivered = rid if terminal == "response.completed" else None
        yield from self._ask(Served(account.id, delivered))
        yield from self._ask(Idle())
        self._fresh = False
        return _DONE

    def _refuse_turn(self, turn: Turn, error: openai_errors.HttpError) -> Ask:
        """No attempt is left for this message: the client gets the `error` event."""
        turn.report.outcome, turn.report.status = ERROR, error.status
        yield from self._ask(ClientSend(error_event(self._scrub.error(error))))

    # -- the end ----------------------------------------------------------------------------

    def _release(self, code: int, reason: str) -> Ask:
        if self._account is not None:
            self._account = None
            yield from self._ask(Release(None, keep=False, code=code, reason=reason))

    def _client_closed(self, closed: ClientClosed) -> Ask:
        """The client ended its socket: the upstream one ends with the same close."""
        code = closed.code if closed.code in _SENDABLE or (closed.code or 0) >= 3000 else 1000
        yield from self._release(code or 1000, closed.reason)

    def _let_go(self) -> WsClientRun:
        """The client left mid-turn: close the upstream socket, give back the account."""
        if self._turn is not None:
            self._turn.report.outcome = CLIENT_GONE
        if self._account is not None:
            self._account = None
            yield Release(None, keep=False, code=1001, reason="client went away")
        if self._held is not None:
            held, self._held = self._held, None
            yield Unhold(held)
