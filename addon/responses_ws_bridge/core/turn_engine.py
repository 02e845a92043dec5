"""One bridged request's whole life as a sans-I/O machine: events in, commands out.

`TurnEngine.run()` is a generator, like a mitmproxy proxy layer: it yields a
command (`turn_commands`), the shell carries it out and sends back the event
that answers it. No socket, clock or store is touched here; time and jitter
come in as functions. The life of a turn:

| step          | commands                               | then                            |
|---------------|----------------------------------------|---------------------------------|
| destination   | (pure) Respond 403 when refused        | the end                         |
| owner         | FindOwner                              | FailClosed: Respond 503         |
| account       | Choose (pool; none in pass-through)    | none usable: Respond 429/503;   |
|               |                                        | all failed transiently: Sleep   |
| attempt       | Bind (new hard key), Hold, Checkout    | Broke: judge the failure        |
|               | or GetToken + Open, then Send          |                                 |
| relay         | Receive, StartStream, Write,           | TurnDone: Release(keep),        |
|               | PublishOwner, Finish (or Respond)      | Unhold, Served                  |
| silence       | Receive timed out                      | Write keepalive, or silent      |
| failure       | NoteFigures, Refresh (401), Failed     | `AttemptPlan`: free retry,      |
|               |                                        | RetrySame (Sleep), RetryOther,  |
|               |                                        | or the client's answer          |
| client gone   | any command answered ClientLeft        | Release(1001), Unhold; the end  |

Every decision is one of the core's tables: `upstream_trust` (where),
`AttemptPlan`/`retry_policy` (which account, whether to retry),
`handshake_headers` (what the upstream sees), `event_relay` (what the client
sees), `openai_errors` (how a failure is answered).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.frames import CloseCode

from responses_ws_bridge.core import http_fields, openai_errors, routing, sse, upstream_trust
from responses_ws_bridge.core.account_pool import Chosen, NoneUsable, fail_http_for_choice
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import SessionKey, session_key
from responses_ws_bridge.core.attempt_plan import AttemptPlan, PickClient
from responses_ws_bridge.core.event_relay import JsonRelay, SseRelay, Step
from responses_ws_bridge.core.failures import (
    BAD_URL,
    ConnectFailed,
    Failure,
    HandshakeRejected,
    InvalidUpstreamEvent,
    UpstreamErrorEvent,
    UpstreamSilent,
    close_code_seen,
    describe,
    detail,
    is_connection_limit,
    outcome,
    refresh_failure,
)
from responses_ws_bridge.core.handshake_headers import (
    UpstreamCredential,
    upstream_handshake_headers,
)
from responses_ws_bridge.core.rate_limits import RateLimits, from_headers, merge, to_headers
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.retry_policy import (
    DEFAULT_RETRY_BUDGET,
    Decision,
    FailHttp,
    FailStreamIncomplete,
    Relay,
    RetryOther,
    RetrySame,
)
from responses_ws_bridge.core.token_refresh import fingerprint
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Checkout,
    Choose,
    ClientLeft,
    Command,
    Disable,
    FailClosed,
    Failed,
    FindOwner,
    Finish,
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
    Unhold,
    Write,
)
from responses_ws_bridge.core.turns import CLIENT_GONE, ERROR, PENDING, STREAM_INCOMPLETE, Attempt
from responses_ws_bridge.core.turns import Turn as TurnRequest

DEFAULT_SSE_KEEPALIVE_S = 15.0
# Seconds without any upstream frame after which a turn is given up.
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300.0

EngineRun = Generator[Command, Any, None]
_Ask = Generator[Command, Any, Any]


@dataclass(frozen=True)
class EngineSettings:
    upstream_option: str = ""
    retry_budget: int = DEFAULT_RETRY_BUDGET
    keepalive_s: float | None = DEFAULT_SSE_KEEPALIVE_S
    idle_timeout_s: float | None = DEFAULT_STREAM_IDLE_TIMEOUT_S
    # Hosts a client-chosen destination may be, with an account pool.
    trusted_hosts: tuple[str, ...] = upstream_trust.DEFAULT_TRUSTED_UPSTREAMS


@dataclass(frozen=True)
class PoolFacts:
    """What the turn needs to know of the accounts before it starts."""

    pooled: bool
    # Every account names its own upstream: a client-chosen destination is never used.
    accounts_own_upstreams: bool = False


@dataclass(frozen=True)
class Clocks:
    monotonic: Callable[[], float]
    wall: Callable[[], float]


@dataclass(frozen=True)
class TurnDone:
    """The turn reached its terminal event and the client has all of it."""

    terminal: str
    response_id: str | None


class _Left(Exception):
    """The client went away: the engine lets go of what it holds and stops."""


class _Stop:
    """The request has been answered; no attempt follows."""


_STOP = _Stop()


class TurnEngine:
    def __init__(
        self,
        turn: TurnRequest,
        settings: EngineSettings,
        facts: PoolFacts,
        *,
        scrub: SecretScrubber,
        clocks: Clocks,
        jitter: Callable[[], float],
    ) -> None:
        self.turn = turn
        self.report = turn.report
        self.settings = settings
        self.facts = facts
        self._scrub = scrub
        self._clocks = clocks
        self._jitter = jitter
        self._attempt: Attempt | None = None
        # What the engine holds and must give back, also when the client leaves.
        self._held: str | None = None
        self._socket: SessionKey | None = None
        self._has_socket = False
        self._relay: SseRelay | JsonRelay | None = None
        self._figures: RateLimits | None = None
        self._turn_state: list[tuple[str, str]] = []

    # -- the whole turn ---------------------------------------------------------------------

    def run(self) -> EngineRun:
        try:
            yield from self._serve()
        except _Left:
            yield from self._let_go()

    def _serve(self) -> EngineRun:
        refusal = self._refusal()
        if refusal is not None:
            # Decided before any account is chosen: nothing is sent, no account is judged.
            error, reason = refusal
            yield from self._log(f"bridge {self.turn.request_id}: {reason}")
            yield from self._fail(error)
            return
        found = yield from self._ask(FindOwner())
        if isinstance(found, FailClosed):
            yield from self._fail(openai_errors.state_store_unavailable())
            return
        plan = AttemptPlan(
            self.turn.affinity.kind,
            owner=found.account_id if isinstance(found, Owned) else found.prefer,
            pooled=self.facts.pooled,
            retry_budget=self.settings.retry_budget,
        )
        last: Failure | None = None
        while True:
            account = yield from self._pick(plan, last)
            if isinstance(account, _Stop):
                return
            last = yield from self._attempt_on(plan, account)
            if last is None:
                return
            # The failure that counted (a 401 whose refresh failed is that refresh failure).
            last = yield from self._after(plan, account, last)
            if last is None:
                return

    def _refusal(self) -> tuple[openai_errors.HttpError, str] | None:
        """Why the client's destination may not receive this turn (None: it may).

        With a pool, a destination the client chose is used only when trusted;
        when every account names its own upstream, the destination is never
        used and so never matters. The proxy itself is never an upstream.
        """
        turn, destination = self.turn, self.turn.destination
        target = upstream_trust.Target(
            destination.scheme, destination.host, destination.port, destination.path
        )
        try:
            decision = upstream_trust.decide_upstream(
                pool_mode=self.facts.pooled,
                option=self.settings.upstream_option,
                account_upstream=None,
                target=target,
                reverse_target=turn.reverse_target,
                trusted_hosts=self.settings.trusted_hosts,
                own_endpoints=turn.own_endpoints,
            )
        except ValueError:
            return None  # a malformed URL: the attempt says so (bad_url)
        if isinstance(decision, upstream_trust.Trusted):
            return None
        if (
            self.facts.accounts_own_upstreams
            and not self.settings.upstream_option.strip()
            and not upstream_trust.is_own_endpoint(
                destination.host, destination.port, turn.own_endpoints
            )
        ):
            return None
        where = f"{destination.scheme}://{destination.host}:{destination.port}"
        return decision.error, f"refused: {where} is not a trusted upstream"

    def _pick(self, plan: AttemptPlan, last: Failure | None) -> _Ask:
        """The account of the next attempt (None: the client's credential), or _STOP."""
        while True:
            pick = plan.next_pick()
            if isinstance(pick, PickClient):
                return None
            choice = yield from self._ask(Choose(pick, claim=plan.owner is None))
            if isinstance(choice, FailClosed):
                yield from self._fail(openai_errors.state_store_unavailable())
                return _STOP
            if isinstance(choice, Chosen):
                return choice.account
            if isinstance(choice, NoneUsable) and choice.reason == "excluded":
                again = plan.start_over(jitter=self._jitter())
                if again is not None:
                    # Every account failed once, each time transiently: start over.
                    yield from self._ask(Sleep(again.delay_s))
                    continue
            fail = fail_http_for_choice(choice, affinity=plan.kind, last_failure=last)
            yield from self._fail(openai_errors.for_decision(fail))
            return _STOP

    # -- one attempt ------------------------------------------------------------------------

    def _attempt_on(self, plan: AttemptPlan, account: Account | None) -> _Ask:
        """One attempt; None when it served the turn, else its failure."""
        account_id = account.id if account is not None else None
        if plan.picked(account_id) and account_id is not None:
            yield from self._ask(Bind(account_id))
        attempt = self._attempt = Attempt(plan.attempts, account_id, "")
        self.report.account = account_id
        self.report.attempts.append(attempt)
        self._relay = None
        if account_id is not None:
            # The serving account's own figures only, never an earlier attempt's.
            self._figures = yield from self._ask(NoteFigures(account_id, None))
            yield from self._ask(Hold(account_id))
            self._held = account_id
        result = yield from self._try(account, attempt)
        if account_id is not None:
            self._held = None
            yield from self._ask(Unhold(account_id))
        if not isinstance(result, TurnDone):
            return result
        self.report.outcome, self.report.status = result.terminal, 200
        if account_id is not None:
            delivered = result.response_id if result.terminal == "response.completed" else None
            yield from self._ask(Served(account_id, delivered))
        return None

    def _try(self, account: Account | None, attempt: Attempt) -> _Ask:
        url = self._url(account)
        if not isinstance(url, str):
            return url
        attempt.url = url
        key = session_key(self.turn.affinity, attempt.account)
        ready = (yield from self._ask(Checkout(key, attempt))) if key is not None else None
        attempt.reused = ready is not None
        if ready is None:
            ready = yield from self._open(account, attempt, url)
            if not isinstance(ready, SocketReady):
                return ready
        self._socket, self._has_socket = key, True
        return (yield from self._exchange(ready, attempt))

    def _url(self, account: Account | None) -> str | Failure:
        destination = self.turn.destination
        try:
            url = routing.upstream_url(
                option=self.settings.upstream_option,
                account_upstream=account.upstream if account is not None else None,
                scheme=destination.scheme,
                host=destination.host,
                port=destination.port,
                path=destination.path,
            )
        except ValueError as exc:
            return ConnectFailed(str(exc), cause=BAD_URL)
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        if upstream_trust.is_own_endpoint(parts.hostname or "", port, self.turn.own_endpoints):
            # An account's upstream (or bridge_upstream) aimed at this proxy itself.
            return ConnectFailed("the upstream is this proxy itself", cause=BAD_URL)
        return url

    def _open(self, account: Account | None, attempt: Attempt, url: str) -> _Ask:
        """A new socket for the attempt: SocketReady, or the failure."""
        credential = self.turn.client_credential
        if account is not None:
            token = yield from self._ask(GetToken(account))
            if isinstance(token, RefreshRefused):
                yield from self._refresh_refused(account, token)
                return _refresh_failure(token)
            credential = UpstreamCredential(token, account.chatgpt_account_id)
        attempt.credential_tag = fingerprint(credential.bearer) if credential is not None else None
        headers = upstream_handshake_headers(
            self.turn.client_headers,
            credential,
            request_id=self.turn.request_id,
            pool_mode=self.facts.pooled,
        )
        opened = yield from self._ask(Open(url, headers, attempt.account, attempt))
        if isinstance(opened, Broke):
            if isinstance(opened.failure, HandshakeRejected):
                yield from self._note(attempt, from_headers(opened.failure.headers))
            return opened.failure
        attempt.spare = opened.spare
        yield from self._note(attempt, from_headers(opened.response_headers))
        return opened

    def _exchange(self, ready: SocketReady, attempt: Attempt) -> _Ask:
        """`response.create` out, events back; the socket kept or closed after."""
        turn_state = http_fields.header(ready.response_headers, "x-codex-turn-state")
        self._turn_state = [("x-codex-turn-state", turn_state)] if turn_state is not None else []
        result: TurnDone | Failure
        sent = yield from self._ask(Send(self.turn.create.message))
        if isinstance(sent, Broke):
            result = sent.failure
        elif self.turn.create.stream:
            result = yield from self._stream(attempt, SseRelay(self._scrub, self._clocks.wall))
        else:
            result = yield from self._collect(attempt, JsonRelay(self._scrub, self._clocks.wall))
        # An error event ends a turn, not a connection (unless the socket is too old).
        keep = isinstance(result, TurnDone) or (
            isinstance(result, UpstreamErrorEvent) and not is_connection_limit(result)
        )
        self._has_socket = False
        yield from self._ask(Release(self._socket, keep=keep))
        if isinstance(result, TurnDone):
            attempt.outcome = result.terminal
        return result

    # -- relaying ---------------------------------------------------------------------------

    def _stream(self, attempt: Attempt, relay: SseRelay) -> _Ask:
        self._relay = relay
        last = self._clocks.monotonic()
        while True:
            wait, silent_after = self._wait(last, relay.events_sent > 0)
            if wait is not None and wait <= 0 and silent_after:
                return self._silent()
            got = yield from self._ask(Receive(wait))
            if isinstance(got, Broke):
                return got.failure
            if isinstance(got, TimedOut):
                if silent_after:
                    return self._silent()
                # Upstream silence: a comment keeps intermediaries from timing out.
                yield from self._ask(Write(sse.KEEPALIVE))
                continue
            last = self._clocks.monotonic()
            done = yield from self._deliver(relay.take(got.frames), attempt, relay)
            if done is not None:
                return done

    def _deliver(self, step: Step, attempt: Attempt, relay: SseRelay) -> _Ask:
        """Writes one batch's events; the turn's end when the batch ended it."""
        for limits in step.figures:
            yield from self._note(attempt, limits)
        if step.refused is not None:
            return step.refused
        if step.out:
            if relay.events_sent == step.events:
                yield from self._ask(StartStream(200, self._stream_headers()))
            if step.terminal is not None:
                yield from self._publish(attempt, relay, step.terminal)
            yield from self._ask(Write(step.out))
        if step.invalid is not None:
            # What came before it is the client's; the turn ends here, never with a cut.
            return InvalidUpstreamEvent(step.invalid)
        if step.terminal is not None:
            yield from self._ask(Finish())
            return TurnDone(step.terminal, relay.response_id)
        return None

    def _collect(self, attempt: Attempt, relay: JsonRelay) -> _Ask:
        self._relay = relay
        last = self._clocks.monotonic()
        while True:
            wait, _ = self._wait(last, False)
            if wait is not None and wait <= 0:
                return self._silent()
            got = yield from self._ask(Receive(wait))
            if isinstance(got, Broke):
                return got.failure
            if isinstance(got, TimedOut):
                return self._silent()
            last = self._clocks.monotonic()
            step = relay.take(got.frames)
            for limits in step.figures:
                yield from self._note(attempt, limits)
            if step.refused is not None:
                return step.refused
            if step.invalid is not None:
                return InvalidUpstreamEvent(step.invalid)
            if step.body is not None and step.terminal is not None:
                yield from self._publish(attempt, relay, step.terminal)
                headers = [*self._head(), ("content-type", "application/json")]
                yield from self._ask(Respond(200, headers, step.body))
                return TurnDone(step.terminal, relay.response_id)

    def _wait(self, last: float, streaming: bool) -> tuple[float | None, bool]:
        """How long to wait for frames, and whether silence that long ends the attempt."""
        keepalive = self.settings.keepalive_s if streaming else None
        idle = self.settings.idle_timeout_s
        if idle is None:
            return keepalive, False
        idle_left = idle - (self._clocks.monotonic() - last)
        if keepalive is None or idle_left <= keepalive:
            return idle_left, True
        return keepalive, False

    def _silent(self) -> UpstreamSilent:
        return UpstreamSilent(self.settings.idle_timeout_s or 0.0)

    def _publish(self, attempt: Attempt, relay: SseRelay | JsonRelay, terminal: str) -> _Ask:
        """A completed response's owner is known before its terminal event is delivered:
        no client can ask another instance about it before then, and a failed one is
        owned by nobody."""
        if attempt.account is None or terminal != "response.completed":
            return
        if relay.response_id is not None:
            yield from self._ask(PublishOwner(attempt.account, relay.response_id))

    def _head(self) -> list[tuple[str, str]]:
        return [
            ("x-request-id", self.turn.request_id),
            *self._turn_state,
            *to_headers(self._figures),
        ]

    def _stream_headers(self) -> list[tuple[str, str]]:
        return [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *self._head()]

    # -- after a failure --------------------------------------------------------------------

    def _after(self, plan: AttemptPlan, account: Account | None, failure: Failure) -> _Ask:
        """Judges a failed attempt; the failure as judged when another attempt follows,
        None when the turn ends here."""
        attempt = self._attempt
        assert attempt is not None
        self._judge(attempt, failure)
        seen = isinstance(self._relay, SseRelay) and self._relay.events_sent > 0
        for limits in _failure_figures(failure):
            yield from self._note(attempt, limits)
        refreshed = False
        if account is not None and not seen and _is_401(failure):
            got = yield from self._refresh(account, attempt)
            # No new token: the request fails as what it is, a refresh failure.
            failure, refreshed = (got, False) if isinstance(got, ConnectFailed) else (failure, got)
        # A reused socket, or a spare, that turns out dead is not the account's fault.
        why = plan.retry_for_free(
            failure,
            account=attempt.account,
            reused=attempt.reused or attempt.spare,
            client_has_seen_event=seen,
            token_refreshed=refreshed,
        )
        if why is not None:
            yield from self._log_attempt(attempt, failure, f"free retry ({why})")
            return failure
        usable = True
        if self.facts.pooled and attempt.account is not None:
            usable = yield from self._ask(Failed(attempt.account, failure))
        decision = plan.decide(
            failure,
            account=attempt.account,
            client_has_seen_event=seen,
            owner_usable=usable,
            jitter=self._jitter(),
        )
        yield from self._log_attempt(attempt, failure, type(decision).__name__)
        again = yield from self._follow(decision, failure)
        return failure if again else None

    def _judge(self, attempt: Attempt, failure: Failure) -> None:
        if attempt.outcome == PENDING:
            attempt.outcome = self._scrub(outcome(failure))
        attempt.close_code = close_code_seen(failure)
        attempt.detail = self._scrub(attempt.detail or detail(failure))

    def _follow(self, decision: Decision, failure: Failure) -> _Ask:
        if isinstance(decision, RetrySame):
            yield from self._ask(Sleep(decision.delay_s))
            return True
        if isinstance(decision, RetryOther):
            return True  # the plan has excluded the account; the loop picks again
        if isinstance(decision, FailStreamIncomplete):
            assert isinstance(self._relay, SseRelay)
            self.report.outcome, self.report.status = STREAM_INCOMPLETE, 200
            yield from self._ask(Write(self._relay.failed_event(failure, decision.close_code)))
            yield from self._ask(Finish())
            return False
        if isinstance(decision, Relay):
            yield from self._fail(openai_errors.for_failure(failure, None, passthrough=False))
            return False
        assert isinstance(decision, FailHttp)
        passthrough = not self.facts.pooled
        yield from self._fail(openai_errors.for_failure(failure, decision, passthrough=passthrough))
        return False

    def _refresh(self, account: Account, attempt: Attempt) -> _Ask:
        """A handshake 401: True when a refreshed token is there for one more try, the
        refresh failure when there is none."""
        if not account.refreshable or attempt.credential_tag is None:
            return False
        got = yield from self._ask(Refresh(account, attempt.credential_tag))
        if isinstance(got, RefreshRefused):
            failure = _refresh_failure(got)
            attempt.outcome = outcome(failure)
            attempt.detail = self._scrub(got.reason)
            yield from self._refresh_refused(account, got)
            return failure
        return bool(got)

    def _refresh_refused(self, account: Account, refused: RefreshRefused) -> _Ask:
        if refused.permanent and self.facts.pooled:
            reason = f"token refresh refused: {refused.reason}"
            yield from self._ask(Disable(account.id, reason))

    def _note(self, attempt: Attempt, limits: RateLimits | None) -> _Ask:
        """The upstream told the serving account's figures (a frame, or x-codex-* headers)."""
        if limits is None or attempt.account is None:
            return
        known = yield from self._ask(NoteFigures(attempt.account, limits))
        self._figures = known if known is not None else merge(self._figures, limits)

    # -- answering and letting go -----------------------------------------------------------

    def _fail(self, error: openai_errors.HttpError) -> _Ask:
        self.report.outcome, self.report.status = ERROR, error.status
        error = self._scrub.error(error)
        headers = [("x-request-id", self.turn.request_id), *error.headers]
        yield from self._ask(Respond(error.status, headers, error.body))

    def _let_go(self) -> EngineRun:
        """The client left: close the upstream turn promptly, give back the account."""
        if self._attempt is not None and (self._has_socket or self._attempt.outcome == PENDING):
            self._attempt.outcome = CLIENT_GONE
        if self._has_socket:
            self._has_socket = False
            yield Release(
                self._socket, keep=False, code=CloseCode.GOING_AWAY, reason="client went away"
            )
        if self._held is not None:
            held, self._held = self._held, None
            yield Unhold(held)

    def _log(self, message: str) -> _Ask:
        yield from self._ask(Log(message))

    def _log_attempt(self, attempt: Attempt, failure: Failure, then: str) -> _Ask:
        yield from self._log(
            f"bridge {self.turn.request_id} attempt {attempt.number} on "
            f"{attempt.account or 'client'}: {self._scrub(describe(failure))} -> {then}"
        )

    @staticmethod
    def _ask(command: Command) -> _Ask:
        reply = yield command
        if isinstance(reply, ClientLeft):
            raise _Left
        return reply


def _refresh_failure(refused: RefreshRefused) -> ConnectFailed:
    return refresh_failure(
        refused.reason, permanent=refused.permanent, retry_after_s=refused.retry_after_s
    )


def _is_401(failure: Failure) -> bool:
    return isinstance(failure, HandshakeRejected) and failure.status == 401


def _failure_figures(failure: Failure) -> Iterable[RateLimits]:
    if isinstance(failure, UpstreamErrorEvent):
        limits = from_headers(failure.headers.items())
        if limits is not None:
            yield limits
