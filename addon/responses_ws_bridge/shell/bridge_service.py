"""Serves one bridged request end to end: choose an account, open or reuse, relay, retry.

The I/O around the pure decisions. `AttemptPlan` says where each attempt
goes and what follows a failure; this module asks the pool for that account,
`routing` for the URL and `handshake_headers` for the headers, takes an idle
socket from `session_pool` or opens one with `upstream_client`, relays with
`relay`, and answers the client through `openai_errors.for_failure` when the
plan gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from websockets.frames import CloseCode

from responses_ws_bridge.core import openai_errors, routing, upstream_trust
from responses_ws_bridge.core.account_pool import Chosen, NoneUsable, fail_http_for_choice
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import SessionKey, session_key
from responses_ws_bridge.core.attempt_plan import AttemptPlan, PickAny, PickOwner
from responses_ws_bridge.core.failures import (
    AttemptFailed,
    ConnectFailed,
    Failure,
    HandshakeRejected,
    UpstreamErrorEvent,
    close_code_seen,
    describe,
    detail,
    is_connection_limit,
    outcome,
)
from responses_ws_bridge.core.handshake_headers import (
    UpstreamCredential,
    upstream_handshake_headers,
)
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.rate_limits import RateLimits, from_headers, merge
from responses_ws_bridge.core.retry_policy import (
    DEFAULT_RETRY_BUDGET,
    FailHttp,
    FailStreamIncomplete,
    Relay,
    RetrySame,
)
from responses_ws_bridge.core.token_refresh import fingerprint
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.shell.relay import ClientStream, TurnDone, relay_turn
from responses_ws_bridge.shell.session_pool import (
    DEFAULT_IDLE_TTL_S,
    DEFAULT_MAX_AGE_S,
    DEFAULT_WARM_SPARES,
    SessionPool,
    WarmSpares,
)
from responses_ws_bridge.shell.shared_state import SharedState
from responses_ws_bridge.shell.sink import ClientSink
from responses_ws_bridge.shell.token_refresher import RefreshFailed, TokenRefresher
from responses_ws_bridge.shell.upstream_client import (
    SessionTap,
    UpstreamSession,
    UpstreamSettings,
)
from responses_ws_bridge.state.fallback import FailClosed, Owned

logger = logging.getLogger(__name__)

DEFAULT_SSE_KEEPALIVE_S = 15.0
# Seconds without any upstream frame after which a turn is given up.
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300.0

# Gives the recorder a tap for each new upstream connection (None: not recorded).
TapFactory = Callable[[Turn, Attempt], SessionTap | None]


@dataclass(frozen=True)
class BridgeSettings:
    upstream_option: str = ""
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sse_keepalive_s: float | None = DEFAULT_SSE_KEEPALIVE_S
    retry_budget: int = DEFAULT_RETRY_BUDGET
    session_idle_ttl_s: float = DEFAULT_IDLE_TTL_S
    warm_spares: int = DEFAULT_WARM_SPARES
    session_max_age_s: float = DEFAULT_MAX_AGE_S
    # Hosts a client-chosen destination may be, with an account pool.
    trusted_hosts: tuple[str, ...] = upstream_trust.DEFAULT_TRUSTED_UPSTREAMS
    stream_idle_timeout_s: float | None = DEFAULT_STREAM_IDLE_TIMEOUT_S


class BridgeService:
    def __init__(
        self,
        settings: BridgeSettings,
        *,
        state: PoolState,
        sessions: SessionPool,
        spares: WarmSpares | None = None,
        taps: TapFactory | None = None,
        tokens: TokenRefresher | None = None,
        shared: SharedState | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.state = state
        self.sessions = sessions
        self.spares = spares if spares is not None else WarmSpares(per_key=settings.warm_spares)
        self.tokens = tokens if tokens is not None else TokenRefresher()
        self._taps = taps
        # Affinity, health and load shared with other instances (when `bridge_state` is set).
        self.shared = shared
        self._sleep = sleep
        self._jitter = jitter

    def apply_settings(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.sessions.idle_ttl_s = settings.session_idle_ttl_s
        self.spares.per_key = settings.warm_spares
        self.sessions.max_age_s = settings.session_max_age_s

    def accounts_removed(self, account_ids: list[str]) -> None:
        """Sockets of removed accounts close (idle ones now, busy ones when their turn ends)."""
        for account_id in account_ids:
            self.sessions.drop_account(account_id)
            self.spares.drop_account(account_id)

    # -- serving ------------------------------------------------------------------

    async def serve(self, turn: Turn, sink: ClientSink) -> None:
        """Answers the client of `turn` through `sink`; `turn.report` says what happened."""
        report = turn.report
        state, pool = self.state, self.state.pool
        scrub = state.scrubber()
        if turn.client_credential is not None:
            scrub = scrub.extended([turn.client_credential.bearer])
        client = ClientStream(
            sink=sink,
            headers=[("x-request-id", turn.request_id)],
            keepalive_s=self.settings.sse_keepalive_s,
            scrub=scrub,
        )
        refused = self._refused_destination(turn)
        if refused is not None:
            # Decided before any account is chosen: nothing is sent, no account is judged.
            logger.info("bridge %s: %s", turn.request_id, refused.reason)
            await self._fail(client, turn, refused.error)
            return
        shared = self.shared if self.shared is not None and self.shared.active else None
        owner = state.owner(turn.affinity)
        if shared is not None and pool is not None:
            found = await shared.owner(turn.affinity)
            if isinstance(found, FailClosed):
                await self._fail(client, turn, openai_errors.state_store_unavailable())
                return
            owner = found.account_id if isinstance(found, Owned) else found.prefer
        plan = AttemptPlan(
            turn.affinity.kind,
            owner=owner,
            pooled=pool is not None,
            retry_budget=self.settings.retry_budget,
        )
        last_failure: Failure | None = None
        while True:
            account: Account | None = None
            if pool is not None:
                pick = plan.next_pick()
                assert isinstance(pick, PickOwner | PickAny)
                if shared is not None:
                    shared_choice = await shared.choose(
                        pool, pick, turn.affinity, claim=plan.owner is None
                    )
                    if isinstance(shared_choice, FailClosed):
                        await self._fail(client, turn, openai_errors.state_store_unavailable())
                        return
                    choice = shared_choice
                elif isinstance(pick, PickOwner):
                    choice = pool.choose_owner(pick.account)
                else:
                    choice = pool.choose(exclude=pick.exclude, prefer=pick.prefer)
                if isinstance(choice, NoneUsable) and choice.reason == "excluded":
                    again = plan.start_over(jitter=self._jitter())
                    if again is not None:
                        # Every account failed once, each time transiently: start over.
                        await self._sleep(again.delay_s)
                        continue
                if not isinstance(choice, Chosen):
                    fail = fail_http_for_choice(
                        choice, affinity=plan.kind, last_failure=last_failure
                    )
                    await self._fail(client, turn, openai_errors.for_decision(fail))
                    return
                account = choice.account
            account_id = account.id if account is not None else None
            if plan.picked(account_id) and account_id is not None:
                state.bind(turn.affinity, account_id)
            attempt = Attempt(plan.attempts, account_id, "")
            if pool is not None:
                # The serving account's own figures only, never an earlier attempt's.
                client.rate_limits = pool.rate_limits(account_id) if account_id else None
            report.account = account_id
            report.attempts.append(attempt)
            if shared is not None and account_id is not None:
                client.publish_response_id(shared.response_owner_publisher(account_id))
            try:
                async with self._lease(shared, account_id):
                    done = await self._attempt(turn, account, client, attempt)
            except AttemptFailed as exc:
                failure = last_failure = exc.failure
            else:
                report.outcome, report.status = done.terminal_type, 200
                if account_id is not None:
                    delivered = (
                        done.response_id if done.terminal_type == "response.completed" else None
                    )
                    state.served(turn.affinity, account_id, delivered)
                    if shared is not None:
                        await shared.served(turn.affinity, account_id)
                return
            if attempt.outcome == "pending":
                attempt.outcome = scrub(outcome(failure))
            attempt.close_code = close_code_seen(failure)
            attempt.detail = scrub(attempt.detail or detail(failure))
            seen = client.has_seen_event
            if account_id is not None:
                self._note_rate_limits(account_id, client, _failure_headers(failure))
            refreshed = False
            if account is not None and not seen and _is_401(failure):
                refreshed = await self._refresh_after_401(account, attempt)
            # A reused socket, or a spare, that turns out dead is not the account's fault.
            why = plan.retry_for_free(
                failure,
                account=account_id,
                reused=attempt.reused or attempt.spare,
                client_has_seen_event=seen,
                token_refreshed=refreshed,
            )
            if why is not None:
                logger.info(
                    "bridge %s attempt %d on %s: %s -> free retry (%s)",
                    turn.request_id,
                    attempt.number,
                    account_id or "client",
                    scrub(describe(failure)),
                    why,
                )
                continue
            usable = True
            if pool is not None and account_id is not None:
                pool.record_failure(account_id, failure)
                if shared is not None:
                    await shared.failed(pool, account_id, failure)
                usable = pool.is_usable(account_id)
            decision = plan.decide(
                failure,
                account=account_id,
                client_has_seen_event=seen,
                owner_usable=usable,
                jitter=self._jitter(),
            )
            logger.info(
                "bridge %s attempt %d on %s: %s -> %s",
                turn.request_id,
                attempt.number,
                account_id or "client",
                scrub(describe(failure)),
                type(decision).__name__,
            )
            if isinstance(decision, RetrySame):
                await self._sleep(decision.delay_s)
            elif isinstance(decision, FailStreamIncomplete):
                report.outcome, report.status = "stream_incomplete", 200
                await client.fail_after_events(failure, decision.close_code)
                return
            elif isinstance(decision, Relay):
                await self._fail(
                    client, turn, openai_errors.for_failure(failure, None, passthrough=False)
                )
                return
            elif isinstance(decision, FailHttp):
                error = openai_errors.for_failure(failure, decision, passthrough=pool is None)
                await self._fail(client, turn, error)
                return
            # RetryOther: the plan has excluded the account; the loop picks again.

    def _refused_destination(self, turn: Turn) -> _Refusal | None:
        """Why the client's destination may not receive this turn (None: it may).

        With a pool, a destination the client chose is used only when trusted;
        when every account names its own upstream, the destination is never
        used and so never matters. The proxy itself is never an upstream.
        """
        pool = self.state.pool
        destination = turn.destination
        target = upstream_trust.Target(
            destination.scheme, destination.host, destination.port, destination.path
        )
        try:
            decision = upstream_trust.decide_upstream(
                pool_mode=pool is not None,
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
            pool is not None
            and not self.settings.upstream_option.strip()
            and not upstream_trust.is_own_endpoint(
                destination.host, destination.port, turn.own_endpoints
            )
            and all(_own_upstream(pool.account(i)) for i in pool.ids)
        ):
            return None
        where = f"{destination.scheme}://{destination.host}:{destination.port}"
        return _Refusal(decision.error, f"refused: {where} is not a trusted upstream")

    @staticmethod
    @contextlib.asynccontextmanager
    async def _lease(shared: SharedState | None, account_id: str | None) -> AsyncIterator[None]:
        """An in-flight lease every instance counts, while one attempt runs (shared state)."""
        if shared is None or account_id is None:
            yield
            return
        async with shared.lease(account_id):
            yield

    async def _attempt(
        self, turn: Turn, account: Account | None, client: ClientStream, attempt: Attempt
    ) -> TurnDone:
        """One attempt on `account` (None: the client's credential); raises `AttemptFailed`."""
        try:
            attempt.url = routing.upstream_url(
                option=self.settings.upstream_option,
                account_upstream=account.upstream if account is not None else None,
                scheme=turn.destination.scheme,
                host=turn.destination.host,
                port=turn.destination.port,
                path=turn.destination.path,
            )
        except ValueError as exc:
            attempt.outcome, attempt.detail = "bad_url", str(exc)
            raise AttemptFailed(ConnectFailed(str(exc))) from exc
        parts = urlsplit(attempt.url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        if upstream_trust.is_own_endpoint(parts.hostname or "", port, turn.own_endpoints):
            # An account's upstream (or bridge_upstream) aimed at this proxy itself.
            attempt.outcome, attempt.detail = "bad_url", "the upstream is this proxy itself"
            raise AttemptFailed(ConnectFailed("the upstream is this proxy itself"))
        account_id = account.id if account is not None else None
        key = session_key(turn.affinity, account_id)
        session = self.sessions.checkout(key) if key is not None else None
        attempt.reused = session is not None
        pool = self.state.pool
        if pool is not None and account_id is not None:
            pool.acquire(account_id)
        try:
            if session is None:
                credential = (
                    UpstreamCredential(
                        await self._bearer(account, attempt), account.chatgpt_account_id
                    )
                    if account is not None
                    else turn.client_credential
                )
                attempt.credential_tag = (
                    fingerprint(credential.bearer) if credential is not None else None
                )
                headers = upstream_handshake_headers(
                    turn.client_headers,
                    credential,
                    request_id=turn.request_id,
                    pool_mode=self.state.pooled,
                )
                tap = self._taps(turn, attempt) if self._taps is not None else None
                try:
                    session, attempt.spare = await self.spares.open(
                        attempt.url, headers, self.settings.upstream, account=account_id, tap=tap
                    )
                except AttemptFailed as exc:
                    if account_id is not None and isinstance(exc.failure, HandshakeRejected):
                        self._note_rate_limits(account_id, client, exc.failure.headers)
                    raise
                if account_id is not None:
                    self._note_rate_limits(account_id, client, session.response_headers)
            elif session.tap is not None:
                session.tap.attach(turn, attempt)
            return await self._relay(session, turn, client, attempt, key)
        finally:
            if pool is not None and account_id is not None:
                pool.release(account_id)

    async def _relay(
        self,
        session: UpstreamSession,
        turn: Turn,
        client: ClientStream,
        attempt: Attempt,
        key: SessionKey | None,
    ) -> TurnDone:
        client.extra_headers = [
            ("x-codex-turn-state", v)
            for k, v in session.response_headers
            if k.lower() == "x-codex-turn-state"
        ][:1]
        account_id = attempt.account

        def seen(limits: RateLimits) -> None:
            if account_id is not None:
                self._note_rate_limits(account_id, client, limits=limits)

        try:
            done = await relay_turn(
                session,
                turn.create,
                client,
                seen,
                idle_timeout_s=self.settings.stream_idle_timeout_s,
            )
        except AttemptFailed as exc:
            if is_connection_limit(exc.failure):
                # Too old for another response: this socket is done.
                self.sessions.discard(session)
            elif isinstance(exc.failure, UpstreamErrorEvent):
                # The socket is fine: an error event ends a turn, not a connection.
                self._keep_or_close(session, key)
            else:
                self.sessions.discard(session)
            raise
        except BaseException:
            # The client left (or the proxy stops): end the upstream turn promptly.
            attempt.outcome = "client_gone"
            self.sessions.discard(session, code=CloseCode.GOING_AWAY, reason="client went away")
            raise
        self._keep_or_close(session, key)
        attempt.outcome = done.terminal_type
        return done

    # -- tokens and rate limits ------------------------------------------------------

    async def _bearer(self, account: Account, attempt: Attempt) -> str:
        """The account's access token, refreshed first when due (ChatGPT logins)."""
        try:
            return await self.tokens.access_token(account)
        except RefreshFailed as exc:
            self._refresh_failed(account, exc, attempt)
            raise AttemptFailed(ConnectFailed(str(exc))) from exc

    async def _refresh_after_401(self, account: Account, attempt: Attempt) -> bool:
        """A handshake 401: True when a refreshed token is there for one more try."""
        if not account.refreshable or attempt.credential_tag is None:
            return False
        try:
            return await self.tokens.after_rejection(account, attempt.credential_tag)
        except RefreshFailed as exc:
            self._refresh_failed(account, exc, attempt)
            return False

    def _refresh_failed(self, account: Account, exc: RefreshFailed, attempt: Attempt) -> None:
        attempt.outcome, attempt.detail = "refresh_failed", exc.reason
        pool = self.state.pool
        if exc.permanent and pool is not None:
            pool.disable(account.id, f"token refresh refused: {exc.reason}")

    def _note_rate_limits(
        self,
        account_id: str,
        client: ClientStream,
        headers: Iterable[tuple[str, str]] | None = None,
        *,
        limits: RateLimits | None = None,
    ) -> None:
        """The upstream told the account's figures (a frame, or x-codex-* headers)."""
        if limits is None:
            limits = from_headers(headers)
        if limits is None:
            return
        pool = self.state.pool
        if pool is not None:
            pool.record_rate_limits(account_id, limits)
        client.rate_limits = self._account_limits(account_id, merge(client.rate_limits, limits))

    def _account_limits(self, account_id: str, fallback: RateLimits | None) -> RateLimits | None:
        pool = self.state.pool
        known = pool.rate_limits(account_id) if pool is not None else None
        return known if known is not None else fallback

    def _keep_or_close(self, session: UpstreamSession, key: SessionKey | None) -> None:
        """The turn is over and the socket idle again: it can serve the key's next turn."""
        if key is not None and (key[1] is None or self._account_still_there(key[1])):
            self.sessions.checkin(key, session)
        else:
            self.sessions.discard(session)

    def _account_still_there(self, account_id: str) -> bool:
        pool = self.state.pool
        return pool is not None and pool.account(account_id) is not None

    async def _fail(self, client: ClientStream, turn: Turn, error: openai_errors.HttpError) -> None:
        turn.report.outcome, turn.report.status = "error", error.status
        await client.send_error(error)

    async def shutdown(self) -> None:
        await self.sessions.close_all()
        await self.spares.close_all()


@dataclass(frozen=True)
class _Refusal:
    error: openai_errors.HttpError
    reason: str  # for the log


def _own_upstream(account: Account | None) -> bool:
    return account is not None and bool((account.upstream or "").strip())


def _is_401(failure: Failure) -> bool:
    return isinstance(failure, HandshakeRejected) and failure.status == 401


def _failure_headers(failure: Failure) -> Iterable[tuple[str, str]]:
    if isinstance(failure, UpstreamErrorEvent):
        return failure.headers.items()
    return ()
