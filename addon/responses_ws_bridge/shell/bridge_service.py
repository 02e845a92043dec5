"""Serves one bridged request end to end: choose an account, open or reuse, relay, retry.

This is the shell around the pure decisions. Per attempt it asks the pool (or
the hard owner) for an account, `routing` for the URL and `handshake_headers`
for the headers, takes an idle session from `session_pool` or opens one with
`upstream_client`, and relays with `relay`. When an attempt fails it turns
what happened into a `retry_policy` failure and does what `decide` says.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from responses_ws_bridge.core import openai_errors, routing
from responses_ws_bridge.core.account_pool import AccountPool, Chosen, fail_http_for_choice
from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.affinity import Affinity, AffinityKind, owner_for
from responses_ws_bridge.core.bindings import Binding, MemoryBindingStore
from responses_ws_bridge.core.create_request import CreateRequest
from responses_ws_bridge.core.handshake_headers import (
    UpstreamCredential,
    upstream_handshake_headers,
)
from responses_ws_bridge.core.retry_policy import (
    ConnectError,
    ConnectionLost,
    FailHttp,
    FailStreamIncomplete,
    Failure,
    Relay,
    RetryOther,
    RetrySame,
    UpstreamClose,
    decide,
    describe,
    error_event_failure,
    handshake_failure,
)
from responses_ws_bridge.core.upstream_events import UpstreamErrorEvent
from responses_ws_bridge.shell.loopback import ResponseSink
from responses_ws_bridge.shell.relay import ClientStream, TurnDone, TurnRefused, relay_turn
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.upstream_client import (
    CLOSE_GOING_AWAY,
    ConnectFailed,
    HandshakeRejected,
    SessionTap,
    UpstreamClosed,
    UpstreamSession,
    UpstreamSettings,
    open_session,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    """Where the client meant to send the request (before the loopback detour)."""

    scheme: str
    host: str
    port: int
    path: str


@dataclass(frozen=True)
class Turn:
    """Everything decided about one client request in the `request` hook."""

    flow_id: str
    create: CreateRequest
    client_headers: tuple[tuple[str, str], ...]
    request_id: str
    destination: Destination
    affinity: Affinity
    # Pass-through mode only: the client's own credential, placed deliberately.
    client_credential: UpstreamCredential | None


@dataclass(frozen=True)
class BridgeSettings:
    upstream_option: str = ""
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sse_keepalive_s: float | None = 15.0
    retry_budget: int = 2
    session_idle_ttl_s: float = 120.0
    binding_max: int = 100_000
    binding_ttl_s: float = 24 * 3600.0


@dataclass
class Attempt:
    """One upstream attempt, as the client flow's metadata shows it."""

    number: int
    account: str | None
    url: str
    reused: bool = False
    outcome: str = "pending"
    close_code: int | None = None
    detail: str = ""
    upstream_flow: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass
class TurnReport:
    """What happened to a turn, for the client flow's metadata and the log."""

    affinity: Affinity
    account: str | None = None
    outcome: str = "pending"
    status: int | None = None
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class _AttemptResult:
    """How one attempt ended: done, or a failure the policy must judge."""

    done: TurnDone | None = None
    failure: Failure | None = None
    error_event: UpstreamErrorEvent | None = None
    rejection: HandshakeRejected | None = None
    closed: UpstreamClosed | None = None


class BridgeService:
    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.pool: AccountPool | None = None
        self.accounts: AccountsConfig | None = None
        self.sessions = SessionPool(idle_ttl_s=settings.session_idle_ttl_s)
        self.bindings = MemoryBindingStore(
            settings.binding_max, settings.binding_ttl_s, time.monotonic
        )
        self.response_owners = MemoryBindingStore(
            settings.binding_max, settings.binding_ttl_s, time.monotonic
        )
        self.reports: dict[str, TurnReport] = {}
        # Set by the recorder: a tap per new upstream connection.
        self.tap_factory: Callable[[Turn, Attempt], SessionTap | None] | None = None
        self._sleep = asyncio.sleep
        self._random = random.random

    # -- configuration ---------------------------------------------------------

    def apply_settings(self, settings: BridgeSettings) -> None:
        old, self.settings = self.settings, settings
        self.sessions.idle_ttl_s = settings.session_idle_ttl_s
        if (old.binding_max, old.binding_ttl_s) != (settings.binding_max, settings.binding_ttl_s):
            self.bindings = MemoryBindingStore(
                settings.binding_max, settings.binding_ttl_s, time.monotonic
            )
            self.response_owners = MemoryBindingStore(
                settings.binding_max, settings.binding_ttl_s, time.monotonic
            )

    def set_accounts(self, config: AccountsConfig | None) -> None:
        """A new accounts file (None: pass-through mode). Removed accounts end cleanly."""
        if config is None:
            removed = self.pool.ids if self.pool is not None else []
            self.pool = None
        elif self.pool is None:
            self.pool = AccountPool(config)
            removed = []
        else:
            removed = self.pool.reload(config)
        self.accounts = config
        for account_id in removed:
            self.sessions.drop_account(account_id)
            self.bindings.remove_account(account_id)
            self.response_owners.remove_account(account_id)

    # -- serving ------------------------------------------------------------------

    async def serve(self, turn: Turn, sink: ResponseSink) -> None:
        report = self.reports.setdefault(turn.flow_id, TurnReport(turn.affinity))
        client = ClientStream(
            sink=sink,
            headers=[("x-request-id", turn.request_id)],
            keepalive_s=self.settings.sse_keepalive_s,
        )
        kind = turn.affinity.kind
        owner = self._owner(turn.affinity)
        prefer: str | None = owner
        # The account the last decision said to retry on. The decision table
        # alone says where a retry goes; this loop follows it to the letter.
        pinned: str | None = owner if kind is AffinityKind.HARD else None
        exclude: set[str] = set()
        last_failure: Failure | None = None
        free_retry = True  # a reused socket found dead costs no retry
        number = 0
        while True:
            account: Account | None = None
            if self.pool is not None:
                if pinned is not None:
                    choice = self.pool.choose_owner(pinned)
                else:
                    choice = self.pool.choose(exclude=exclude, prefer=prefer)
                if not isinstance(choice, Chosen):
                    fail = fail_http_for_choice(choice, affinity=kind, last_failure=last_failure)
                    await self._fail(client, report, self._error_for(fail, None))
                    return
                account = choice.account
                if kind is AffinityKind.HARD and owner is None:
                    # The first request of a hard key binds it, before any retry:
                    # from here on only this account may serve it.
                    owner = pinned = account.id
                    self._bind(turn.affinity, owner)
            number += 1
            result, attempt = await self._attempt(turn, account, client, report, number)
            if result.done is not None:
                report.outcome, report.status = result.done.terminal_type, 200
                return
            failure = result.failure
            assert failure is not None
            last_failure = failure
            account_id = account.id if account is not None else "client"
            if (
                attempt.reused
                and free_retry
                and not client.has_seen_event
                and isinstance(failure, UpstreamClose | ConnectionLost)
            ):
                free_retry = False
                number -= 1
                prefer = account_id
                pinned = account.id if account is not None else None
                continue
            usable = True
            if self.pool is not None and account is not None:
                self.pool.record_failure(account.id, failure)
                usable = self.pool.is_usable(account.id)
            decision = decide(
                affinity=kind,
                failure=failure,
                client_has_seen_event=client.has_seen_event,
                attempts_made=number,
                retry_budget=self.settings.retry_budget,
                account_id=account_id,
                owner_usable=usable,
                jitter=self._random(),
            )
            logger.info(
                "bridge %s attempt %d on %s: %s -> %s",
                turn.request_id,
                number,
                account_id,
                describe(failure),
                type(decision).__name__,
            )
            if isinstance(decision, RetrySame):
                prefer = decision.account
                pinned = decision.account if self.pool is not None else None
                await self._sleep(decision.delay_s)
            elif isinstance(decision, RetryOther):
                if self.pool is None:
                    # Pass-through has one credential: nowhere else to go.
                    await self._fail(client, report, self._passthrough_error(result))
                    return
                exclude.add(decision.exclude)
                prefer = pinned = None
            elif isinstance(decision, FailStreamIncomplete):
                report.outcome, report.status = "stream_incomplete", 200
                closed = result.closed
                reason = closed.reason if closed is not None else describe(failure)
                await client.fail_incomplete(decision.close_code, reason)
                return
            elif isinstance(decision, Relay):
                assert result.error_event is not None
                await self._fail(client, report, openai_errors.from_error_event(result.error_event))
                return
            else:
                error = (
                    self._passthrough_error(result)
                    if self.pool is None
                    else self._error_for(decision, result)
                )
                await self._fail(client, report, error)
                return

    async def _attempt(
        self,
        turn: Turn,
        account: Account | None,
        client: ClientStream,
        report: TurnReport,
        number: int,
    ) -> tuple[_AttemptResult, Attempt]:
        account_id = account.id if account is not None else None
        report.account = account_id
        try:
            url = routing.upstream_url(
                option=self.settings.upstream_option,
                account_upstream=account.upstream if account is not None else None,
                scheme=turn.destination.scheme,
                host=turn.destination.host,
                port=turn.destination.port,
                path=turn.destination.path,
            )
        except ValueError as exc:
            attempt = Attempt(number, account_id, "", outcome="bad_url", detail=str(exc))
            report.attempts.append(attempt)
            return _AttemptResult(failure=ConnectError(str(exc))), attempt
        pool_key = (turn.affinity.key or "", account_id)
        session = self.sessions.checkout(pool_key) if turn.affinity.key else None
        attempt = Attempt(number, account_id, url, reused=session is not None)
        report.attempts.append(attempt)
        if self.pool is not None and account_id is not None:
            self.pool.acquire(account_id)
        try:
            if session is None:
                credential = (
                    UpstreamCredential(account.bearer, account.chatgpt_account_id)
                    if account is not None
                    else turn.client_credential
                )
                headers = upstream_handshake_headers(
                    turn.client_headers, credential, request_id=turn.request_id
                )
                tap = self.tap_factory(turn, attempt) if self.tap_factory else None
                session = await open_session(url, headers, self.settings.upstream, tap=tap)
            elif session.tap is not None:
                session.tap.attach((turn, attempt))
            return await self._relay(session, turn, client, attempt, pool_key), attempt
        except HandshakeRejected as exc:
            attempt.outcome, attempt.detail = "rejected", f"HTTP {exc.status}"
            failure = handshake_failure(exc.status, exc.headers, exc.body, wall_now=time.time())
            return _AttemptResult(failure=failure, rejection=exc), attempt
        except ConnectFailed as exc:
            attempt.outcome, attempt.detail = "connect_failed", exc.detail
            lost = ConnectError(exc.detail, timed_out=exc.timed_out)
            return _AttemptResult(failure=lost), attempt
        finally:
            if self.pool is not None and account_id is not None:
                self.pool.release(account_id)

    async def _relay(
        self,
        session: UpstreamSession,
        turn: Turn,
        client: ClientStream,
        attempt: Attempt,
        pool_key: tuple[str, str | None],
    ) -> _AttemptResult:
        client.extra_headers = [
            ("x-codex-turn-state", v)
            for k, v in session.response_headers
            if k.lower() == "x-codex-turn-state"
        ][:1]
        try:
            result = await relay_turn(session, turn.create, client)
        except UpstreamClosed as exc:
            self.sessions.discard(session)
            attempt.outcome, attempt.close_code = "closed", exc.code
            attempt.detail = exc.reason
            failure: Failure = (
                UpstreamClose(exc.code, exc.reason) if exc.code is not None else ConnectionLost()
            )
            return _AttemptResult(failure=failure, closed=exc)
        except BaseException:
            # The client left (or the proxy stops): end the upstream turn promptly.
            attempt.outcome = "client_gone"
            self.sessions.discard(session, code=CLOSE_GOING_AWAY, reason="client went away")
            raise
        # The turn is over and the socket is idle again: it can serve the key's next turn.
        if turn.affinity.key:
            self.sessions.checkin(pool_key, session)
        else:
            self.sessions.discard(session)
        if isinstance(result, TurnRefused):
            attempt.outcome = f"error_event:{result.error.code}"
            failure = error_event_failure(_error_event_dict(result.error), wall_now=time.time())
            return _AttemptResult(failure=failure, error_event=result.error)
        attempt.outcome = result.terminal_type
        self._succeeded(turn, attempt.account, result)
        return _AttemptResult(done=result)

    # -- bookkeeping ------------------------------------------------------------------

    def _owner(self, affinity: Affinity) -> str | None:
        if self.pool is None:
            return None

        def bound(key: str) -> str | None:
            binding = self.bindings.get(key)
            return binding.account_id if binding is not None else None

        def produced(response_id: str) -> str | None:
            binding = self.response_owners.get(response_id)
            return binding.account_id if binding is not None else None

        return owner_for(affinity, bound_account=bound, response_owner=produced)

    def _bind(self, affinity: Affinity, account_id: str) -> None:
        for key in affinity.keys:
            self.bindings.set(key, Binding(account_id, affinity.kind))

    def _succeeded(self, turn: Turn, account_id: str | None, result: TurnDone) -> None:
        if account_id is None or self.pool is None:
            return
        self.pool.record_success(account_id)
        if turn.affinity.kind is not AffinityKind.NONE:
            self._bind(turn.affinity, account_id)
        if result.response_id is not None:
            self.response_owners.set(result.response_id, Binding(account_id))

    # -- errors ------------------------------------------------------------------

    @staticmethod
    def _passthrough_error(result: _AttemptResult | None) -> openai_errors.HttpError:
        """Pass-through: the upstream's verdict on the client's own credential, as it was."""
        if result is None or result.failure is None:
            return openai_errors.no_account()
        if result.rejection is not None:
            rejection = result.rejection
            return openai_errors.upstream_rejected(
                rejection.status, rejection.body, dict(rejection.headers)
            )
        if result.error_event is not None:
            return openai_errors.from_error_event(result.error_event)
        if result.closed is not None:
            return openai_errors.upstream_closed(result.closed.code, result.closed.reason)
        failure = result.failure
        if isinstance(failure, ConnectError):
            if failure.timed_out:
                return openai_errors.upstream_timeout(failure.detail)
            return openai_errors.upstream_unreachable(failure.detail)
        return openai_errors.upstream_closed(None, describe(failure))

    @staticmethod
    def _error_for(fail: FailHttp, result: _AttemptResult | None) -> openai_errors.HttpError:
        """Pool mode: the decision's status and code; the upstream's 429 body when it gave one."""
        if fail.status == 429 and result is not None:
            if result.rejection is not None and result.rejection.status == 429:
                rejection = result.rejection
                return openai_errors.upstream_rejected(429, rejection.body, dict(rejection.headers))
            if result.error_event is not None:
                return openai_errors.from_error_event(result.error_event)
        retry_after = (
            str(max(1, round(fail.retry_after_s))) if fail.retry_after_s is not None else None
        )
        return openai_errors.decision_error(
            fail.status, fail.code, fail.message or fail.code, retry_after=retry_after
        )

    async def _fail(
        self, client: ClientStream, report: TurnReport, error: openai_errors.HttpError
    ) -> None:
        report.outcome, report.status = "error", error.status
        await client.send_error(error)

    async def shutdown(self) -> None:
        await self.sessions.close_all()


def _error_event_dict(event: UpstreamErrorEvent) -> dict[str, object]:
    """The event in its wire shape, which is what the policy reads reset times from."""
    return {
        "type": "error",
        "status": event.status,
        "error": dict(event.error_object),
        "headers": dict(event.headers),
    }
