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
|               | PublishOwner, Finish (or Respond)      | Unhold, Served (not a prewarm)  |
|               | (lifecycle events held: `event_relay`) |                                 |
| a timer rings | Receive timed out (`stream_timers`)    | first event: 504; idle: silent; |
|               |                                        | hold: Write held; keepalive:    |
|               |                                        | Write it (`client_events`)      |
| failure       | NoteFigures, Refresh (401), Failed     | `AttemptPlan`: free retry,      |
|               |                                        | RetrySame (Sleep), RetryOther,  |
|               |                                        | or the client's answer          |
| client gone   | any command answered ClientLeft        | Release(1001), Unhold; the end  |

Every decision is one of the core's tables: `upstream_trust` (where),
`AttemptPlan`/`retry_policy`/`error_classes` (which account, whether to
retry), `handshake_headers` (what the upstream sees), `event_relay`,
`client_events`, `answer_headers` (what the client sees), `stream_timers`
(how long to wait), `prewarm` (what a turn counts for), `openai_errors` (how
a failure is answered).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, replace
from typing import Any

from websockets.frames import CloseCode

from responses_ws_bridge.core import (
    answer_headers,
    http_fields,
    openai_errors,
    prewarm,
    routing,
    sse,
    upstream_trust,
)
from responses_ws_bridge.core.account_pool import Chosen, NoneUsable, fail_http_for_choice
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import SessionKey, session_key
from responses_ws_bridge.core.attempt_plan import AttemptPlan, PickClient
from responses_ws_bridge.core.attempt_url import attempt_url
from responses_ws_bridge.core.client_events import client_kind, keepalive
from responses_ws_bridge.core.error_classes import ErrorClass
from responses_ws_bridge.core.event_relay import JsonRelay, SseRelay, Step
from responses_ws_bridge.core.failures import (
    ConnectFailed,
    Failure,
    HandshakeRejected,
    InvalidUpstreamEvent,
    UpstreamErrorEvent,
    UpstreamSilent,
    close_code_seen,
    describe,
    detail,
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
    DEAD_REUSED_SOCKET,
    DEFAULT_RETRY_BUDGET,
    Decision,
    FailHttp,
    FailStreamIncomplete,
    Relay,
    RetryOther,
    RetrySame,
    in_words,
    wants_refresh,
)
from responses_ws_bridge.core.stream_timers import Timer, after, next_timer
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
# Seconds from the request's arrival within which its first Responses event must come.
DEFAULT_FIRST_EVENT_TIMEOUT_S = 240.0
# Seconds `response.created` / `in_progress` wait for the first output event.
DEFAULT_HOLD_CREATED_S = 2.0
# Error classes after which the socket is not kept: it is too old, or its credential is refused.
_SOCKET_SPENT = frozenset({ErrorClass.CONNECTION_LIMIT, ErrorClass.AUTH, ErrorClass.AUTH_PERMANENT})

EngineRun = Generator[Command, Any, None]
_Ask = Generator[Command, Any, Any]


@dataclass(frozen=True)
class EngineSettings:
    upstream_option: str = ""
    retry_budget: int = DEFAULT_RETRY_BUDGET
    keepalive_s: float | None = DEFAULT_SSE_KEEPALIVE_S
    idle_timeout_s: float | None = DEFAULT_STREAM_IDLE_TIMEOUT_S
    first_event_timeout_s: float | None = DEFAULT_FIRST_EVENT_TIMEOUT_S
    hold_created_s: float | None = DEFAULT_HOLD_CREATED_S
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
    """The turn reached its terminal event and the client has all of it.

    `counts`: it says something about the account (`prewarm.counts`).
    """

    terminal: str
    response_id: str | None
    counts: bool = True


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
        self._kind = client_kind(turn.destination.path)
        self._prewarm = prewarm.is_prewarm(turn.create.body)
        self._start = clocks.monotonic()
        # The client's response head went out (an event, or a keepalive on the Codex path).
        self._started = False
        # Upstream answer headers for the client's head (`answer_headers`).
        self._answer: dict[str, str] = {}
        # The turn state the server issued in this request, and on which account: for a
        # new socket's handshake on that same account (another account's is no routing).
        self._turn_state: tuple[str | None, str] | None = None
        # ... and one a metadata event issued: kept on the socket for the session.
        self._late_state: str | None = None
        self._hold_since: float | None = None
        self._alive_at: float | None = None

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
        error = upstream_trust.refusal_of(
            self.turn,
            pool_mode=self.facts.pooled,
            option=self.settings.upstream_option,
            accounts_own_upstreams=self.facts.accounts_own_upstreams,
            trusted_hosts=self.settings.trusted_hosts,
        )
        if error is None:
            return None
        destination = self.turn.destination
        where = f"{destination.scheme}://{destination.host}:{destination.port}"
        return error, f"refused: {where} is not a trusted upstream"

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
            if fail.retry_after_s is not None:
                fail = replace(fail, resets_at=self._clocks.wall() + fail.retry_after_s)
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
        if account_id is not None and result.counts:
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
        return attempt_url(
            routing.upstream_url,
            option=self.settings.upstream_option,
            account=account,
            destination=self.turn.destination,
            own_endpoints=self.turn.own_endpoints,
        )

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
            self._client_headers(attempt.account),
            credential,
            request_id=self.turn.request_id,
            pool_mode=self.facts.pooled,
        )
        opened = yield from self._ask(Open(url, headers, attempt.account, attempt))
        if isinstance(opened, Broke):
            if isinstance(opened.failure, HandshakeRejected):
                yield from self._note(attempt, from_headers(opened.failure.headers))
            return opened.failure
        attempt.preconnected = opened.preconnected
        yield from self._note(attempt, from_headers(opened.response_headers))
        return opened

    def _client_headers(self, account: str | None) -> tuple[tuple[str, str], ...]:
        """The client's headers, with the turn state the server issued when the client has none.

        Within one request, a new socket on the same account carries the turn
        state an earlier socket (or the session's last one) was given, as Codex
        CLI does when it reconnects within a turn.
        """
        headers = self.turn.client_headers
        known = self._turn_state
        if known is None or known[0] != account:
            return headers
        if http_fields.has(headers, answer_headers.TURN_STATE):
            return headers
        return (*headers, (answer_headers.TURN_STATE, known[1]))

    def _exchange(self, ready: SocketReady, attempt: Attempt) -> _Ask:
        """`response.create` out, events back; the socket kept or closed after."""
        self._answer = answer_headers.from_handshake(ready.response_headers)
        issued = self._answer.get(answer_headers.TURN_STATE)
        if issued is not None:
            self._turn_state = (attempt.account, issued)
        self._late_state = None
        self._hold_since = None
        result: TurnDone | Failure
        sent = yield from self._ask(Send(self.turn.create.message))
        wall = self._clocks.wall
        if isinstance(sent, Broke):
            result = sent.failure
        elif self.turn.create.stream:
            relay = SseRelay(self._scrub, wall, self._kind, hold=self._holds())
            result = yield from self._stream(attempt, relay)
        else:
            result = yield from self._collect(attempt, JsonRelay(self._scrub, wall, self._kind))
        # An error event ends a turn, not a connection (unless the socket is too old or
        # its credential refused).
        keep = isinstance(result, TurnDone) or (
            isinstance(result, UpstreamErrorEvent) and result.kind not in _SOCKET_SPENT
        )
        self._has_socket = False
        yield from self._ask(Release(self._socket, keep=keep, turn_state=self._late_state))
        return result

    def _holds(self) -> bool:
        """Lifecycle events wait for the first output (always for a prewarm: it has none)."""
        return self._prewarm or bool(self.settings.hold_created_s)

    # -- relaying ---------------------------------------------------------------------------

    def _stream(self, attempt: Attempt, relay: SseRelay) -> _Ask:
        self._relay = relay
        last = self._clocks.monotonic()
        while True:
            timer = self._next_timer(relay, last)
            got = yield from self._wait_for(timer)
            if isinstance(got, Broke):
                return got.failure
            done: TurnDone | Failure | None
            if isinstance(got, TimedOut):
                assert timer is not None
                done = yield from self._ring(timer[1], attempt, relay)
            else:
                last = self._clocks.monotonic()
                done = yield from self._deliver(relay.take(got.frames), attempt, relay)
            if done is not None:
                return done

    def _wait_for(self, timer: tuple[float, Timer] | None) -> _Ask:
        """Frames, or TimedOut when `timer` rings first (at once when it is due)."""
        if timer is None:
            return (yield from self._ask(Receive(None)))
        wait = timer[0] - self._clocks.monotonic()
        if wait <= 0:
            return TimedOut()
        return (yield from self._ask(Receive(wait)))

    def _next_timer(self, relay: SseRelay | JsonRelay, last: float) -> tuple[float, Timer] | None:
        """The clock that rings first (`stream_timers`) for this relay."""
        settings = self.settings
        timers = [
            (
                None if relay.responded else after(self._start, settings.first_event_timeout_s),
                Timer.FIRST_EVENT,
            ),
            (after(last, settings.idle_timeout_s), Timer.SILENT),
        ]
        if isinstance(relay, SseRelay):
            if relay.has_held and self._hold_since is not None and not self._prewarm:
                timers.append((after(self._hold_since, settings.hold_created_s), Timer.RELEASE))
            if keepalive(self._kind, started=self._started) is not None:
                since = max(last, self._alive_at or last)
                timers.append((after(since, settings.keepalive_s), Timer.KEEPALIVE))
        return next_timer(timers)

    def _ring(self, timer: Timer, attempt: Attempt, relay: SseRelay) -> _Ask:
        """A timer rang: the turn's failure, or None to read on."""
        if timer is Timer.FIRST_EVENT:
            return UpstreamSilent(self.settings.first_event_timeout_s or 0.0, first_event=True)
        if timer is Timer.SILENT:
            return self._silent()
        if timer is Timer.RELEASE:
            return (yield from self._deliver(relay.release(), attempt, relay))
        # Upstream silence: what this client's idle timer honours.
        data = keepalive(self._kind, started=self._started)
        assert data is not None
        yield from self._start_stream()
        yield from self._ask(Write(data))
        self._alive_at = self._clocks.monotonic()
        return None

    def _start_stream(self) -> _Ask:
        if not self._started:
            self._started = True
            yield from self._ask(StartStream(200, self._stream_headers()))

    def _deliver(self, step: Step, attempt: Attempt, relay: SseRelay) -> _Ask:
        """Writes one batch's events; the turn's end when the batch ended it."""
        yield from self._take_side_channel(step, attempt)
        if step.refused is not None:
            return step.refused
        if relay.has_held and self._hold_since is None:
            self._hold_since = self._clocks.monotonic()
        if step.out:
            yield from self._start_stream()
            if step.terminal is not None:
                yield from self._publish(attempt, relay, step.terminal)
            yield from self._ask(Write(step.out))
        if step.invalid is not None:
            # What came before it is the client's; the turn ends here, never with a cut.
            return InvalidUpstreamEvent(step.invalid)
        if step.terminal is not None:
            # Final before the last byte goes: mitmproxy's `response` hook (and `-w`) may
            # read the report as soon as the client has the end of the stream.
            self._ended(attempt, step.terminal)
            yield from self._ask(Finish())
            return self._done(step.terminal, relay)
        return None

    def _take_side_channel(self, step: Step, attempt: Attempt) -> _Ask:
        """Rate-limit figures, and answer headers a metadata event told."""
        for limits in step.figures:
            yield from self._note(attempt, limits)
        for name, value in step.learned.items():
            if not self._started:
                self._answer[name] = value
            if name == answer_headers.TURN_STATE:
                self._late_state = value
                self._turn_state = (attempt.account, value)

    def _done(self, terminal: str, relay: SseRelay | JsonRelay) -> TurnDone:
        counts = prewarm.counts(prewarm=self._prewarm, output_seen=relay.output_seen)
        return TurnDone(terminal, relay.response_id, counts)

    def _collect(self, attempt: Attempt, relay: JsonRelay) -> _Ask:
        self._relay = relay
        last = self._clocks.monotonic()
        while True:
            timer = self._next_timer(relay, last)
            got = yield from self._wait_for(timer)
            if isinstance(got, Broke):
                return got.failure
            if isinstance(got, TimedOut):
                assert timer is not None
                if timer[1] is Timer.FIRST_EVENT:
                    return UpstreamSilent(self.settings.first_event_timeout_s or 0.0, True)
                return self._silent()
            last = self._clocks.monotonic()
            step = relay.take(got.frames)
            yield from self._take_side_channel(step, attempt)
            if step.refused is not None:
                return step.refused
            if step.invalid is not None:
                return InvalidUpstreamEvent(step.invalid)
            if step.body is not None and step.terminal is not None:
                done = self._done(step.terminal, relay)
                yield from self._publish(attempt, relay, step.terminal)
                self._ended(attempt, step.terminal)
                headers = [*self._head(), ("content-type", "application/json")]
                yield from self._ask(Respond(200, headers, step.body))
                return done

    def _ended(self, attempt: Attempt, terminal: str) -> None:
        attempt.outcome = terminal
        self.report.outcome, self.report.status = terminal, 200

    def _silent(self) -> UpstreamSilent:
        return UpstreamSilent(self.settings.idle_timeout_s or 0.0)

    def _publish(self, attempt: Attempt, relay: SseRelay | JsonRelay, terminal: str) -> _Ask:
        """A completed response's owner is known before its terminal event is delivered:
        no client can ask another instance about it before then, and a failed one is
        owned by nobody."""
        if attempt.account is None or terminal != "response.completed":
            return
        if not prewarm.counts(prewarm=self._prewarm, output_seen=relay.output_seen):
            return
        if relay.response_id is not None:
            yield from self._ask(PublishOwner(attempt.account, relay.response_id))

    def _head(self) -> list[tuple[str, str]]:
        return [
            ("x-request-id", self.turn.request_id),
            *self._answer.items(),
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
        if account is not None and not seen and wants_refresh(failure):
            got = yield from self._refresh(account, attempt)
            # No new token: the request fails as what it is, a refresh failure.
            failure, refreshed = (got, False) if isinstance(got, ConnectFailed) else (failure, got)
        # A reused socket, or one made ahead, that turns out dead is not the account's fault.
        why = plan.retry_for_free(
            failure,
            account=attempt.account,
            reused=attempt.reused or attempt.preconnected,
            client_has_seen_event=seen,
            token_refreshed=refreshed,
            prewarm_after_created=self._prewarm and self._relay is not None and self._relay.created,
        )
        if why is not None:
            if why == DEAD_REUSED_SOCKET and attempt.reused:
                # Its own word: a socket kept for the session died while idle, no upstream fault.
                attempt.outcome = why
            yield from self._log_attempt(attempt, failure, f"retrying at once ({why}, free)")
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
        yield from self._log_attempt(attempt, failure, in_words(decision))
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
        """A handshake 401 or an auth error event: True when a refreshed token is there
        for one more try, the refresh failure when there is none."""
        if not account.refreshable:
            return False
        used = attempt.credential_tag
        if used is None:
            # A reused socket: its handshake carried the token in use then, the current one
            # unless it was refreshed since (then the refresher has nothing to do).
            token = yield from self._ask(GetToken(account))
            if isinstance(token, RefreshRefused):
                return False
            used = fingerprint(token)
        got = yield from self._ask(Refresh(account, used))
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
        error = self._scrub.error(error)
        self.report.code = openai_errors.code_in(error.body)
        if self._started:
            # A keepalive already sent the head: the error ends the stream instead.
            self.report.outcome, self.report.status = ERROR, 200
            yield from self._ask(Write(sse.error_as_failed(error.body, error.status)))
            yield from self._ask(Finish())
            return
        self.report.outcome, self.report.status = ERROR, error.status
        headers = [("x-request-id", self.turn.request_id), *error.headers]
        yield from self._ask(Respond(error.status, headers, error.body))

    def _let_go(self) -> EngineRun:
        """The client left: close the upstream turn promptly, give back the account."""
        if self._attempt is not None and (self._has_socket or self._attempt.outcome == PENDING):
            self._attempt.outcome = CLIENT_GONE
        if self.report.outcome == PENDING:
            self.report.outcome = CLIENT_GONE
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
            f"{attempt.account or 'client'}: {self._scrub(describe(failure))}; {then}"
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


def _failure_figures(failure: Failure) -> Iterable[RateLimits]:
    if isinstance(failure, UpstreamErrorEvent):
        limits = from_headers(failure.headers.items())
        if limits is not None:
            yield limits
