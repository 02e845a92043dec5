"""One request the pool forwards over HTTP, as a sans-I/O machine: events in, commands out.

Compaction, models, reads and controls of one response and the backend's
side endpoints are not carried over a WebSocket; the bridge sends them
upstream itself, with the chosen account's credential in place of the
client's (`forward_policy.request_headers`). The account is chosen, and a
failure before any byte reached the client is retried, exactly as for a
bridged turn: the same commands (`turn_commands`, plus the HTTP exchange of
`forward_commands`), the same `AttemptPlan` and `retry_policy` table, so a
hard session's compaction goes to its owner and only there.

| route          | account                                    | answer                       |
|----------------|--------------------------------------------|------------------------------|
| COMPACT, OTHER | the request's affinity (hard: owner only)  | streamed back unchanged      |
| ONE_RESPONSE   | the account that produced the response;    | streamed back unchanged; the |
|                | unknown: each account once until one       | account that answered is its |
|                | answers other than 404 (`judge` NOT_HERE)  | producer from then on        |
| MODELS         | any; a fresh cached answer first           | kept for the next clients    |

An upstream answer is the client's, relayed with its status, or an
account's failure (`forward_policy.judge`): a `HandshakeRejected`, judged by
the retry table (401 refreshes the token, 429 cools the account down, 5xx
counts against it). When no attempt is left the client gets what a bridged
turn would have got (`openai_errors.for_failure`: the upstream's own 429,
else a 502); when every account said 404 for a response, that 404.
Rate-limit headers on any answer are the serving account's figures.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from responses_ws_bridge.core import (
    forward_policy,
    http_fields,
    openai_errors,
    routing,
    upstream_trust,
)
from responses_ws_bridge.core.account_pool import Chosen, NoneUsable, fail_http_for_choice
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.attempt_plan import AttemptPlan, PickClient
from responses_ws_bridge.core.attempt_url import attempt_url
from responses_ws_bridge.core.failures import (
    REFRESH_FAILED,
    ConnectFailed,
    Failure,
    UpstreamSilent,
)
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
from responses_ws_bridge.core.forward_policy import CachedAnswer, Verdict
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.pool_routes import RouteKind
from responses_ws_bridge.core.pool_steps import Ask, Left, PoolSteps
from responses_ws_bridge.core.rate_limits import from_headers
from responses_ws_bridge.core.redaction import BodyScrubber, SecretScrubber
from responses_ws_bridge.core.retry_policy import (
    handshake_rejected,
)
from responses_ws_bridge.core.token_refresh import fingerprint
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Choose,
    FailClosed,
    FindOwner,
    Finish,
    GetToken,
    Hold,
    Owned,
    PublishOwner,
    RefreshRefused,
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
from responses_ws_bridge.core.turns import CLIENT_GONE, ERROR, Attempt, Turn

ForwardRun = Generator[Any, Any, None]
_Ask = Ask

# An error answer is read whole to judge it (a 429's reset time); more is not kept.
ERROR_BODY_LIMIT = 64 * 1024
# A cacheable answer larger than this is streamed and not kept.
CACHE_BODY_LIMIT = 1024 * 1024


class _Stop:
    """The request has been answered; no attempt follows."""


_STOP = _Stop()


class _NotHere:
    """A probe's 404: the response is not this account's."""


_NOT_HERE = _NotHere()


class ForwardEngine(PoolSteps):
    def __init__(
        self,
        turn: Turn,
        settings: EngineSettings,
        *,
        accounts_own_upstreams: bool,
        scrub: SecretScrubber,
        clocks: Clocks,
        jitter: Callable[[], float],
    ) -> None:
        assert turn.http is not None, "not a forwarded request"
        super().__init__(request_id=turn.request_id, scrub=scrub, clocks=clocks, jitter=jitter)
        self.turn = turn
        self.http = turn.http
        self.report = turn.report
        self.settings = settings
        self._own_upstreams = accounts_own_upstreams
        self._attempt: Attempt | None = None
        self._held: str | None = None
        self._fetching = False
        # The cache key this engine fetches for (every client asking the same waits on it).
        self._leading: str | None = None
        # Looking for the producer of a response, each account once.
        self._probing = False
        # The last probe's 404, given to the client when no account had the response.
        self._missing: CachedAnswer | None = None

    # -- the whole request ------------------------------------------------------------------

    def run(self) -> ForwardRun:
        try:
            yield from self._serve()
            yield from self._unlead(None)
        except Left:
            yield from self._let_go()

    def _serve(self) -> ForwardRun:
        error = self._refusal()
        if error is not None:
            where = f"{self.turn.destination.scheme}://{self.turn.destination.host}"
            yield from self._log(f"refused: {where} is not a trusted upstream")
            yield from self._fail(error)
            return
        if (yield from self._from_cache()):
            return
        plan = yield from self._plan()
        if plan is None:
            return
        last: Failure | None = None
        while True:
            account = yield from self._pick(plan, last)
            if isinstance(account, _Stop):
                return
            result = yield from self._attempt_on(plan, account)
            if result is None:
                return
            if isinstance(result, _NotHere):
                plan.not_here(account.id)
                continue
            last = result
            if not (yield from self._after(plan, account, result)):
                return

    def _refusal(self) -> openai_errors.HttpError | None:
        return upstream_trust.refusal_of(
            self.turn,
            pool_mode=True,
            option=self.settings.upstream_option,
            accounts_own_upstreams=self._own_upstreams,
            trusted_hosts=self.settings.trusted_hosts,
        )

    def _from_cache(self) -> _Ask:
        """True when a fresh shared answer served the request."""
        destination = self.turn.destination
        origin = f"{destination.scheme}://{destination.host}:{destination.port}"
        key = forward_policy.cache_key(
            self.http.route.kind, self.http.method, origin, destination.path
        )
        if key is None:
            return False
        cached = yield from self._ask(CacheLookup(key))
        if cached is None:
            self._leading = key
            return False
        answer = forward_policy.from_cache(cached, self.turn.client_headers)
        self.report.outcome, self.report.status = f"cached {answer.status}", answer.status
        yield from self._ask(Respond(answer.status, answer.headers, answer.body))
        return True

    def _plan(self) -> _Ask:
        """The retry loop's state, from who owns the request (None: answered already)."""
        found = yield from self._ask(FindOwner())
        one_response = self.http.route.kind is RouteKind.ONE_RESPONSE
        if isinstance(found, FailClosed):
            if not one_response:
                yield from self._fail(openai_errors.state_store_unavailable())
                return None
            found = Unbound()  # reading a response is safe to try on each account
        owner = found.account_id if isinstance(found, Owned) else found.prefer
        kind = self.turn.affinity.kind
        if one_response:
            # Known producer: only it has the response. Unknown: ask each account once.
            kind = AffinityKind.HARD if owner is not None else AffinityKind.NONE
            self._probing = owner is None
        return AttemptPlan(kind, owner=owner, pooled=True, retry_budget=self.settings.retry_budget)

    def _pick(self, plan: AttemptPlan, last: Failure | None) -> _Ask:
        """The account of the next attempt, or _STOP when the request was answered."""
        while True:
            pick = plan.next_pick()
            assert not isinstance(pick, PickClient), "forwarding is for a pool only"
            choice = yield from self._ask(Choose(pick, claim=plan.owner is None))
            if isinstance(choice, FailClosed):
                yield from self._fail(openai_errors.state_store_unavailable())
                return _STOP
            if isinstance(choice, Chosen):
                return choice.account
            if isinstance(choice, NoneUsable) and choice.reason == "excluded":
                if self._missing is not None and last is None:
                    # Every account said it has no such response: so does the client's answer.
                    yield from self._answer_whole(self._missing)
                    return _STOP
                again = plan.start_over(jitter=self._jitter())
                if again is not None:
                    yield from self._ask(Sleep(again.delay_s))
                    continue
            fail = fail_http_for_choice(choice, affinity=plan.kind, last_failure=last)
            yield from self._fail(openai_errors.for_decision(fail))
            return _STOP

    # -- one attempt ------------------------------------------------------------------------

    def _attempt_on(self, plan: AttemptPlan, account: Account) -> _Ask:
        """One attempt: None when it answered the client, else _NOT_HERE or its failure."""
        if plan.picked(account.id):
            yield from self._ask(Bind(account.id))
        attempt = self._attempt = Attempt(plan.attempts, account.id, "")
        self.report.account = account.id
        self.report.attempts.append(attempt)
        yield from self._ask(Hold(account.id))
        self._held = account.id
        result = yield from self._try(account, attempt)
        self._held = None
        yield from self._ask(Unhold(account.id))
        if isinstance(result, Fetched):
            found = self.http.route.response_id if self._probing else None
            if found is not None:
                yield from self._ask(PublishOwner(account.id, found))
            yield from self._ask(Served(account.id, found))
            return None
        return result

    def _try(self, account: Account, attempt: Attempt) -> _Ask:
        """Fetched when the client got the answer; else _NOT_HERE or the failure."""
        url = self._url(account)
        if not isinstance(url, str):
            return url
        attempt.url = url
        token = yield from self._ask(GetToken(account))
        if isinstance(token, RefreshRefused):
            yield from self._refresh_refused(account, token)
            return ConnectFailed(token.reason, cause=REFRESH_FAILED)
        attempt.credential_tag = fingerprint(token)
        credential = UpstreamCredential(token, account.chatgpt_account_id)
        headers = forward_policy.request_headers(self.turn.client_headers, credential)
        timeout = self.settings.idle_timeout_s
        got = yield from self._ask(
            Fetch(url, self.http.method, headers, self.http.body, attempt, timeout)
        )
        if isinstance(got, Broke):
            return got.failure
        self._fetching = True
        yield from self._note(attempt.account, from_headers(got.headers))
        verdict = forward_policy.judge(self.http.route.kind, got.status, probing=self._probing)
        if verdict is Verdict.RELAY:
            yield from self._relay(got, attempt)
            return got
        body = yield from self._read_whole(ERROR_BODY_LIMIT)
        yield from self._drop()
        if isinstance(body, bytes) and verdict is Verdict.NOT_HERE:
            attempt.outcome = f"http {got.status}"
            kept = tuple(forward_policy.answer_headers(got.headers))
            self._missing = CachedAnswer(got.status, kept, body)
            return _NOT_HERE
        if not isinstance(body, bytes):
            return body
        return handshake_rejected(
            got.status, tuple(got.headers), body, wall_now=self._clocks.wall()
        )

    def _url(self, account: Account) -> str | Failure:
        return attempt_url(
            routing.forward_url,
            option=self.settings.upstream_option,
            account=account,
            destination=self.turn.destination,
            own_endpoints=self.turn.own_endpoints,
        )

    # -- the answer -------------------------------------------------------------------------

    def _relay(self, got: Fetched, attempt: Attempt) -> _Ask:
        """The upstream's answer, as it is, to the client (kept for others when cacheable),
        minus any known secret in it (a compressed body goes as it is)."""
        attempt.outcome = f"http {got.status}"
        self.report.outcome, self.report.status = attempt.outcome, got.status
        headers = [(k, self._scrub(v)) for k, v in forward_policy.answer_headers(got.headers)]
        encoding = (http_fields.header(got.headers, "content-encoding") or "identity").strip()
        body = BodyScrubber(self._scrub) if encoding.lower() == "identity" else None
        first = b""
        if self._leading is not None and forward_policy.cacheable(got.status, got.headers):
            whole = yield from self._ask(ReadBody(self.settings.idle_timeout_s, CACHE_BODY_LIMIT))
            if isinstance(whole, BodyChunk) and whole.end:
                yield from self._drop()
                data = body.feed(whole.data) + body.end() if body is not None else whole.data
                answer = CachedAnswer(got.status, tuple(headers), data)
                yield from self._unlead(answer)
                yield from self._ask(Respond(answer.status, answer.headers, answer.body))
                return
            first = whole.data if isinstance(whole, BodyChunk) else b""
        yield from self._ask(StartStream(got.status, headers))
        yield from self._stream_rest(first, body)

    def _stream_rest(self, first: bytes, body: BodyScrubber | None) -> _Ask:
        chunk: BodyChunk | Broke | TimedOut = BodyChunk(first, False)
        while True:
            if isinstance(chunk, Broke | TimedOut):
                # The answer's head went out: the client sees the cut, as from the upstream.
                why = "upstream silent" if isinstance(chunk, TimedOut) else "upstream failed"
                yield from self._drop()
                yield from self._ask(Abort(f"{why} mid-answer"))
                self.report.outcome = "incomplete"
                return
            data = body.feed(chunk.data) if body is not None else chunk.data
            if chunk.end and body is not None:
                data += body.end()
            if data:
                yield from self._ask(Write(data))
            if chunk.end:
                yield from self._drop()
                yield from self._ask(Finish())
                return
            chunk = yield from self._ask(ReadBody(self.settings.idle_timeout_s))

    def _read_whole(self, limit: int) -> _Ask:
        """The rest of the body (bytes, cut at `limit`), or the failure that ended it."""
        got = yield from self._ask(ReadBody(self.settings.idle_timeout_s, limit))
        if isinstance(got, Broke):
            return got.failure
        if isinstance(got, TimedOut):
            return UpstreamSilent(self.settings.idle_timeout_s or 0.0)
        return bytes(got.data)

    def _answer_whole(self, answer: CachedAnswer) -> _Ask:
        self.report.outcome, self.report.status = f"http {answer.status}", answer.status
        yield from self._ask(Respond(answer.status, answer.headers, self._scrub.data(answer.body)))

    def _drop(self) -> _Ask:
        if self._fetching:
            self._fetching = False
            yield from self._ask(DropFetch())

    def _unlead(self, answer: CachedAnswer | None) -> _Ask:
        if self._leading is not None:
            key, self._leading = self._leading, None
            yield from self._ask(CacheStore(key, answer))

    # -- after a failure --------------------------------------------------------------------

    def _after(self, plan: AttemptPlan, account: Account, failure: Failure) -> _Ask:
        """Judges a failed attempt; True when another attempt follows."""
        assert self._attempt is not None
        verdict = yield from self._judge(plan, account, self._attempt, failure)
        if verdict is True:
            return True
        yield from self._fail(verdict)
        return False

    # -- answering and letting go -----------------------------------------------------------

    def _fail(self, error: openai_errors.HttpError) -> _Ask:
        self.report.outcome, self.report.status = ERROR, error.status
        error = self._scrub.error(error)
        headers = [("x-request-id", self.turn.request_id), *error.headers]
        yield from self._ask(Respond(error.status, headers, error.body))

    def _let_go(self) -> ForwardRun:
        """The client left: close the exchange, give back the account and the cache lead."""
        if self._attempt is not None:
            self._attempt.outcome = CLIENT_GONE
        self.report.outcome = CLIENT_GONE
        if self._fetching:
            self._fetching = False
            yield DropFetch()
        if self._held is not None:
            held, self._held = self._held, None
            yield Unhold(held)
        if self._leading is not None:
            key, self._leading = self._leading, None
            yield CacheStore(key, None)
