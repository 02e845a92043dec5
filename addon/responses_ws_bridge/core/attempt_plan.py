"""The retry loop of one request, as explicit state: which account next, and what after a failure.

The shell asks `next_pick()` where the next attempt goes, tells `picked()`
which account the pool gave, runs the attempt, and on failure asks
`retry_for_free()` and then `decide()`. Every move of the request between
accounts happens here, and only as `retry_policy.decide` says:

| state                | event                               | then                              |
|----------------------|-------------------------------------|-----------------------------------|
| HARD, owner known    | next_pick                           | PickOwner(owner)                  |
| HARD, no owner       | picked(a)                           | owner = pinned = a; bind now      |
| SOFT/NONE            | next_pick                           | PickAny(excluded, prefer)         |
| pass-through         | next_pick                           | PickClient                        |
| any                  | free_retry says why, once per why   | free retry on the same account    |
| SOFT/NONE            | not_here(a) (a probe's 404)         | a excluded, budget kept           |
| SOFT/NONE            | all excluded, each transiently      | start_over: first failed, backoff |
| any                  | decide -> RetrySame(a)              | prefer = a; pinned = a (pool)     |
| pool                 | decide -> RetryOther(a)             | a excluded; pinned = prefer = None|
| pass-through         | decide -> RetryOther                | FailHttp: one credential only     |
| any                  | FailHttp, FailStreamIncomplete, Relay | returned: the request ends      |

HARD never reaches RetryOther (the decision table never says it), so a hard
request's `excluded` stays empty and its pin stays on the owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.failures import Failure
from responses_ws_bridge.core.retry_policy import (
    DEFAULT_RETRY_BUDGET,
    Decision,
    RetryOther,
    RetrySame,
    backoff_delay,
    decide,
    fail_http_for,
    free_retry,
    is_transient,
)


@dataclass(frozen=True)
class PickOwner:
    """Only this account may serve the next attempt."""

    account: str


@dataclass(frozen=True)
class PickAny:
    """Any usable account but the excluded ones, `prefer` first when it is usable."""

    exclude: frozenset[str]
    prefer: str | None


@dataclass(frozen=True)
class PickClient:
    """Pass-through mode: the client's own credential."""


Pick = PickOwner | PickAny | PickClient


@dataclass
class AttemptPlan:
    kind: AffinityKind
    # The account the request is tied to before it starts (None: not tied yet).
    owner: str | None
    pooled: bool
    retry_budget: int = DEFAULT_RETRY_BUDGET
    pinned: str | None = None
    prefer: str | None = None
    excluded: set[str] = field(default_factory=set)
    attempts: int = 0
    free_retries_used: set[str] = field(default_factory=set)
    # (account, transient?) of each exclusion, first failure first.
    exclusions: list[tuple[str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prefer = self.owner
        if self.kind is AffinityKind.HARD:
            self.pinned = self.owner

    def next_pick(self) -> Pick:
        if not self.pooled:
            return PickClient()
        if self.pinned is not None:
            return PickOwner(self.pinned)
        return PickAny(frozenset(self.excluded), self.prefer)

    def picked(self, account: str | None) -> bool:
        """An attempt starts on `account`; True when a hard key must be bound to it now.

        The first request of a hard key binds it before any retry: from then on
        only that account may serve it.
        """
        self.attempts += 1
        if self.kind is AffinityKind.HARD and self.owner is None and account is not None:
            self.owner = self.pinned = account
            return True
        return False

    def retry_for_free(
        self,
        failure: Failure,
        *,
        account: str | None,
        reused: bool,
        client_has_seen_event: bool,
        token_refreshed: bool = False,
        prewarm_after_created: bool = False,
    ) -> str | None:
        """Why the next attempt is free and on the same account (see `free_retry`); None: not."""
        why = free_retry(
            failure,
            reused=reused,
            client_has_seen_event=client_has_seen_event,
            token_refreshed=token_refreshed,
            prewarm_after_created=prewarm_after_created,
        )
        if why is None or why in self.free_retries_used:
            return None
        self.free_retries_used.add(why)
        self.attempts -= 1
        self.prefer = account
        self.pinned = account if self.pooled else None
        return why

    def not_here(self, account: str) -> None:
        """`account` does not have what the request names (a response another account
        produced): the next attempt asks another one, at no cost to the budget."""
        self.attempts -= 1
        self.excluded.add(account)
        self.prefer = self.pinned = None

    def start_over(self, *, jitter: float, backoff_base_s: float = 0.25) -> RetrySame | None:
        """Every account failed once, transiently, and budget remains: the first one again."""
        if (
            not self.pooled
            or self.kind is AffinityKind.HARD
            or not self.exclusions
            or not all(transient for _, transient in self.exclusions)
            or self.attempts - 1 >= self.retry_budget
        ):
            return None
        first = self.exclusions[0][0]
        self.excluded.clear()
        self.exclusions.clear()
        self.prefer = self.pinned = first
        delay = backoff_delay(self.attempts - 1, base=backoff_base_s, cap=2.0, jitter=jitter)
        return RetrySame(first, delay)

    def decide(
        self,
        failure: Failure,
        *,
        account: str | None,
        client_has_seen_event: bool,
        owner_usable: bool,
        jitter: float,
    ) -> Decision:
        """The decision table's answer for this failure, with the plan moved accordingly."""
        decision = decide(
            affinity=self.kind,
            failure=failure,
            client_has_seen_event=client_has_seen_event,
            attempts_made=self.attempts,
            retry_budget=self.retry_budget,
            account_id=account if account is not None else "client",
            owner_usable=owner_usable,
            jitter=jitter,
        )
        if isinstance(decision, RetrySame):
            self.prefer = decision.account
            self.pinned = decision.account if self.pooled else None
        elif isinstance(decision, RetryOther):
            if not self.pooled:
                return fail_http_for(self.kind, failure)
            self.excluded.add(decision.exclude)
            self.exclusions.append((decision.exclude, is_transient(failure)))
            self.prefer = self.pinned = None
        return decision
