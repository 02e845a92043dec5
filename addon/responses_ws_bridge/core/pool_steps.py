"""The steps every pool engine shares: asking the shell, judging a failed attempt.

The forwarded-request engine (`forward_engine`) and the WebSocket-client
engine (`ws_client_engine`) retry exactly as a bridged turn does (the turn
engine's own copy of these steps lives in `turn_engine`): a 401 refreshes
the token and earns one free retry, then `AttemptPlan.retry_for_free` and
`AttemptPlan.decide` (the `retry_policy` table) say whether the next attempt
goes to the same account, another one, or nowhere, in which case
`openai_errors.for_failure` is the client's answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from responses_ws_bridge.core import openai_errors
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.attempt_plan import AttemptPlan
from responses_ws_bridge.core.failures import (
    REFRESH_FAILED,
    ConnectFailed,
    Failure,
    HandshakeRejected,
    close_code_seen,
    describe,
    detail,
    outcome,
)
from responses_ws_bridge.core.rate_limits import RateLimits
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.retry_policy import FailHttp, RetryOther, RetrySame
from responses_ws_bridge.core.turn_commands import (
    ClientLeft,
    Disable,
    Failed,
    Log,
    NoteFigures,
    Refresh,
    RefreshRefused,
    Sleep,
)
from responses_ws_bridge.core.turn_engine import Clocks
from responses_ws_bridge.core.turns import PENDING, Attempt

Ask = Generator[Any, Any, Any]


class Left(Exception):
    """The client went away: the engine lets go of what it holds and stops."""


class PoolSteps:
    """Shared by the pool's engines; `request_id` names the request in log lines."""

    def __init__(
        self,
        *,
        request_id: str,
        scrub: SecretScrubber,
        clocks: Clocks,
        jitter: Callable[[], float],
    ) -> None:
        self.request_id = request_id
        self._scrub = scrub
        self._clocks = clocks
        self._jitter = jitter

    @staticmethod
    def _ask(command: object) -> Ask:
        reply = yield command
        if isinstance(reply, ClientLeft):
            raise Left
        return reply

    def _judge(
        self,
        plan: AttemptPlan,
        account: Account,
        attempt: Attempt,
        failure: Failure,
        *,
        seen: bool = False,
    ) -> Ask:
        """After a failed attempt: True when another one follows, else the client's error.

        `seen`: the client already had an event of this response (nothing is replayed).
        """
        if attempt.outcome == PENDING:
            attempt.outcome = self._scrub(outcome(failure))
        attempt.close_code = close_code_seen(failure)
        attempt.detail = self._scrub(attempt.detail or detail(failure))
        refreshed = False
        if not seen and isinstance(failure, HandshakeRejected) and failure.status == 401:
            refreshed = yield from self._refresh(account, attempt)
        why = plan.retry_for_free(
            failure,
            account=account.id,
            # A reused socket, or one made ahead, found dead is not the account's fault.
            reused=attempt.reused or attempt.preconnected,
            client_has_seen_event=seen,
            token_refreshed=refreshed,
        )
        if why is not None:
            yield from self._log_attempt(attempt, failure, f"free retry ({why})")
            return True
        usable = yield from self._ask(Failed(account.id, failure))
        decision = plan.decide(
            failure,
            account=account.id,
            client_has_seen_event=seen,
            owner_usable=usable,
            jitter=self._jitter(),
        )
        yield from self._log_attempt(attempt, failure, type(decision).__name__)
        if isinstance(decision, RetrySame):
            yield from self._ask(Sleep(decision.delay_s))
            return True
        if isinstance(decision, RetryOther):
            return True
        fail = decision if isinstance(decision, FailHttp) else None
        return openai_errors.for_failure(failure, fail, passthrough=False)

    def _refresh(self, account: Account, attempt: Attempt) -> Ask:
        """A 401: True when a refreshed token is there for one more try."""
        if not account.refreshable or attempt.credential_tag is None:
            return False
        got = yield from self._ask(Refresh(account, attempt.credential_tag))
        if isinstance(got, RefreshRefused):
            attempt.outcome = outcome(ConnectFailed(got.reason, cause=REFRESH_FAILED))
            attempt.detail = self._scrub(got.reason)
            yield from self._refresh_refused(account, got)
            return False
        return bool(got)

    def _refresh_refused(self, account: Account, refused: RefreshRefused) -> Ask:
        if refused.permanent:
            yield from self._ask(Disable(account.id, f"token refresh refused: {refused.reason}"))

    def _note(self, account: str | None, limits: RateLimits | None) -> Ask:
        """The upstream told the serving account's figures."""
        if limits is not None and account is not None:
            yield from self._ask(NoteFigures(account, limits))

    def _log(self, message: str) -> Ask:
        yield from self._ask(Log(f"bridge {self.request_id}: {message}"))

    def _log_attempt(self, attempt: Attempt, failure: Failure, then: str) -> Ask:
        yield from self._log(
            f"attempt {attempt.number} on {attempt.account}: "
            f"{self._scrub(describe(failure))} -> {then}"
        )
