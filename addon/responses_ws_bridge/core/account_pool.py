"""The account pool: per-account health, in-flight counts, and which account serves next.

Health rules: a handshake 401/403 disables an account until the accounts file
changes (any `reload`); a 429 or rate-limit error event cools it down until
the upstream's reset time (default 60 s, never more than 7 days); upstream
faults (handshake 5xx, close 1011) give a short cooldown when they are a large
share of the account's recent attempts: at least half of the faults and
successes of the last 60 s, once there are at least 5 of them. A rate, not a
count: under load a few faults among many successes are noise, and cooling an
account for them moved its traffic onto the others until every account was
cooling. A success ends a cooldown early. Failures that say nothing about the
account (a lost connection, a hand-off close 1000, the socket age limit)
change nothing. Rate-limit figures (`core.rate_limits`) are kept per account:
an account with an exhausted window is not chosen for new sessions until that
window resets. Selection: the preferred account when usable, else the usable
account `spread` ranks first (most rate-limit headroom, then fewest requests
in flight, fewest bound sessions, least recently chosen; its table says why).
Time comes from the injected clocks only (`wall_clock`, epoch seconds, for
the upstream's reset times).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.error_classes import USAGE_LIMIT_CODE
from responses_ws_bridge.core.failures import (
    Failure,
    describe,
    is_account_neutral,
    is_auth_rejection,
    is_rate_limit,
    is_refresh_failure,
    is_upstream_fault,
    is_usage_limit,
    retry_after_of,
)
from responses_ws_bridge.core.rate_limits import (
    RateLimits,
    exhausted_until,
    headroom,
    merge,
)
from responses_ws_bridge.core.rate_limits import describe as describe_limits
from responses_ws_bridge.core.retry_policy import FailHttp, fail_http_for
from responses_ws_bridge.core.upstream_events import MAX_RESET_S

# --- health ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Healthy:
    pass


@dataclass(frozen=True)
class Cooling:
    until: float
    reason: str
    # A usage limit (a rate-limit error or an exhausted window), not a fault.
    usage: bool = False


@dataclass(frozen=True)
class Disabled:
    reason: str


Health = Healthy | Cooling | Disabled
HEALTHY = Healthy()


@dataclass(frozen=True)
class HealthRules:
    rate_limit_default_s: float = 60.0
    # Faults cool an account when they are at least `fault_rate` of the faults and
    # successes within `fault_window_s`, counted once there are `fault_min_samples`.
    fault_window_s: float = 60.0
    fault_min_samples: int = 5
    fault_rate: float = 0.5
    fault_cooldown_s: float = 10.0
    max_cooldown_s: float = MAX_RESET_S


# Per account, the most recent outcomes kept for the fault rate.
_MAX_SAMPLES = 1024


# --- choices --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chosen:
    account: Account


@dataclass(frozen=True)
class AllCoolingDown:
    """Every candidate is cooling down; the earliest is back at `until` (pool clock).

    `owner` is set when the only candidate was a hard session's owner;
    `usage_limited` when every candidate is out on a usage limit.
    """

    until: float
    retry_after_s: int
    owner: str | None = None
    usage_limited: bool = False


@dataclass(frozen=True)
class NoneUsable:
    """Nothing can serve. `owner` is set when a hard owner is what is missing.

    reason: "disabled" (every account disabled), "excluded" (the accounts not
    disabled were tried and failed for this request), "removed" (the owner is
    no longer in the file).
    """

    reason: str
    owner: str | None = None


Choice = Chosen | AllCoolingDown | NoneUsable


@dataclass(frozen=True)
class Candidate:
    """A usable account as `spread` sees it."""

    id: str
    # Percent left in its tightest rate-limit window; 100 while no figures are known.
    headroom: float
    in_flight: int
    bound_sessions: int
    # The pool's count of choices when it was last chosen; 0: never.
    last_chosen: int


def spread(candidates: Iterable[Candidate]) -> Candidate | None:
    """Where a request goes that no usable owner or preference claims (a new session above all).

    Each criterion decides only when every one above it ties:

    | order | criterion           | wins            | why                                         |
    |-------|---------------------|-----------------|---------------------------------------------|
    | 1     | rate-limit headroom | most            | the upstream's own figures, once known      |
    |       |                     |                 | (none known counts as 100% left)            |
    | 2     | requests in flight  | fewest          | the load right now                          |
    | 3     | bound sessions      | fewest          | the load to come: a hard session never      |
    |       |                     |                 | moves, and between turns nothing is in      |
    |       |                     |                 | flight, so this is what spreads sessions    |
    | 4     | last chosen         | longest ago,    | equal counts and unbound requests take      |
    |       |                     | never first     | turns instead of all going to one account   |
    | 5     | place in the file   | first           | a deterministic last word                   |

    Requests in flight and bound sessions are every instance's when a shared
    store answers, this process's otherwise. `candidates` come in file order.
    """
    # min keeps the first of equal ranks: row 5.
    return min(
        candidates,
        key=lambda c: (-c.headroom, c.in_flight, c.bound_sessions, c.last_chosen),
        default=None,
    )


def fail_http_for_choice(
    choice: AllCoolingDown | NoneUsable,
    *,
    affinity: AffinityKind,
    last_failure: Failure | None = None,
) -> FailHttp:
    """The client's HTTP error when no account was chosen.

    Every candidate out on a usage limit (a window at 100 %, or cooling after
    a `usage_limit_reached`): 429 `usage_limit_reached` with the earliest reset,
    which Codex CLI shows as its usage message rather than retrying. Every
    account cooling otherwise: 429 with Retry-After. When the accounts left
    were all tried and failed for this request, or the last one was disabled by
    this request's refused token refresh, the last failure speaks (its 429, its
    `token_refresh_failed`, or a 502). A missing hard owner: 502
    owner_unavailable. Otherwise 503.
    """
    if isinstance(choice, AllCoolingDown) and choice.usage_limited:
        whose = f"this session's account ({choice.owner})" if choice.owner else "every account"
        return FailHttp(
            429,
            USAGE_LIMIT_CODE,
            retry_after_s=float(choice.retry_after_s),
            message=f"the usage limit of {whose} has been reached; try again after the reset",
        )
    if isinstance(choice, AllCoolingDown) and choice.owner is not None:
        return FailHttp(
            429,
            "owner_cooling_down",
            retry_after_s=float(choice.retry_after_s),
            message=f"the account that owns this session ({choice.owner}) is cooling down; "
            "it is never moved to another account",
        )
    if isinstance(choice, AllCoolingDown):
        return FailHttp(
            429,
            "all_accounts_cooling_down",
            retry_after_s=float(choice.retry_after_s),
            message="every upstream account is cooling down",
        )
    if last_failure is not None and (
        choice.owner is not None or choice.reason == "excluded" or is_refresh_failure(last_failure)
    ):
        return fail_http_for(affinity, last_failure)
    if choice.owner is not None:
        return FailHttp(
            502,
            "owner_unavailable",
            message=f"the account that owns this session is {choice.reason}",
        )
    return FailHttp(503, "no_account", message="no upstream account is usable")


# --- the pool -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRow:
    """One line of the `bridge.accounts` command; never holds a secret."""

    id: str
    health: str
    in_flight: int
    cooldown_until: float | None
    cooldown_remaining_s: float | None
    served: int
    rate_limits: str = "-"


@dataclass
class _State:
    account: Account
    in_flight: int = 0
    served: int = 0
    health: Health = HEALTHY
    # (time, was a fault) per attempt outcome, oldest first.
    samples: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))
    rate_limits: RateLimits | None = None
    # Pool clock: no new sessions before this (an exhausted rate-limit window).
    exhausted_until: float | None = None
    # `AccountPool._choices` when `choose` last gave this account; 0: never.
    last_chosen: int = 0


def _same_credential(a: Account, b: Account) -> bool:
    return (a.bearer, a.chatgpt_account_id, a.upstream) == (
        b.bearer,
        b.chatgpt_account_id,
        b.upstream,
    )


class AccountPool:
    def __init__(
        self,
        config: AccountsConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rules: HealthRules | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self.rules = rules or HealthRules()
        self._states: dict[str, _State] = {a.id: _State(a) for a in config.accounts}
        # Choices made so far: a sequence rather than a time, so no two are ever equal.
        self._choices = 0

    @property
    def ids(self) -> list[str]:
        """Account ids in file order."""
        return list(self._states)

    def account(self, account_id: str) -> Account | None:
        state = self._states.get(account_id)
        return state.account if state else None

    def is_current(self, account: Account) -> bool:
        """Whether `account` is still in the file with the same credential.

        A turn that started before a reload asks this when it ends: a removed
        (or re-keyed) account gets no new bindings and its socket is closed.
        """
        state = self._states.get(account.id)
        return state is not None and _same_credential(state.account, account)

    def reload(self, config: AccountsConfig) -> list[str]:
        """Take a new accounts file; returns the ids that are gone.

        Accounts that stay keep their state, except that a disabled one is
        enabled again (the file changed) and a changed credential starts
        afresh. In-flight counts always survive: those requests are still
        running and will release.
        """
        old = self._states
        self._states = {}
        for account in config.accounts:
            state = old.get(account.id)
            if state is None:
                state = _State(account)
            elif not _same_credential(state.account, account):
                state = _State(account, in_flight=state.in_flight)
            else:
                state.account = account
                if isinstance(state.health, Disabled):
                    state.health = HEALTHY
            self._states[account.id] = state
        return [account_id for account_id in old if account_id not in self._states]

    # in-flight accounting; ids removed meanwhile are ignored

    def acquire(self, account_id: str) -> None:
        state = self._states.get(account_id)
        if state is not None:
            state.in_flight += 1

    def release(self, account_id: str) -> None:
        state = self._states.get(account_id)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    # health

    def health(self, account_id: str) -> Health | None:
        """The account's health now (an expired cooldown reads as healthy); None if unknown."""
        state = self._states.get(account_id)
        if state is None:
            return None
        return self._current(state, self._clock())

    def is_usable(self, account_id: str) -> bool:
        return isinstance(self.health(account_id), Healthy)

    def record_success(self, account_id: str) -> None:
        """A response reached its terminal event on this account."""
        state = self._states.get(account_id)
        if state is None:
            return
        state.served += 1
        self._sample(state, self._clock(), fault=False)
        # A disabled account stays so until the file changes, even if an older socket
        # still works; a cooldown ends early since the account evidently serves again.
        if isinstance(state.health, Cooling):
            state.health = HEALTHY

    def record_failure(self, account_id: str, failure: Failure) -> Health | None:
        """Apply the health rules to a failed attempt; returns the account's new health."""
        state = self._states.get(account_id)
        if state is None:
            return None
        now = self._clock()
        current = self._current(state, now)
        if isinstance(current, Disabled) or is_account_neutral(failure):
            return current
        if is_auth_rejection(failure):
            state.health = Disabled(describe(failure))
        elif is_rate_limit(failure):
            given = retry_after_of(failure)
            delay = given if given is not None and given > 0 else self.rules.rate_limit_default_s
            # An upstream's reset time is its word only up to the longest window there is.
            delay = min(delay, self.rules.max_cooldown_s)
            usage = is_usage_limit(failure)
            self._cool(state, current, now + delay, describe(failure), usage=usage)
        elif is_upstream_fault(failure):
            self._sample(state, now, fault=True)
            if self._fault_rate_exceeded(state):
                state.samples.clear()
                self._cool(
                    state, current, now + self.rules.fault_cooldown_s, "repeated upstream errors"
                )
        return self._current(state, now)

    def disable(self, account_id: str, reason: str) -> None:
        """Out of service until the accounts file changes (e.g. its login was revoked)."""
        state = self._states.get(account_id)
        if state is not None:
            state.health = Disabled(reason)

    # rate limits

    def record_rate_limits(self, account_id: str, limits: RateLimits) -> None:
        """The upstream's latest figures for the account (merged into what was known)."""
        state = self._states.get(account_id)
        if state is None:
            return
        state.rate_limits = merge(state.rate_limits, limits)
        wall_now = self._wall_clock()
        until = exhausted_until(state.rate_limits, wall_now=wall_now)
        state.exhausted_until = None if until is None else self._clock() + (until - wall_now)

    def rate_limits(self, account_id: str) -> RateLimits | None:
        state = self._states.get(account_id)
        return state.rate_limits if state is not None else None

    def _exhausted(self, state: _State, now: float) -> bool:
        if state.exhausted_until is not None and now >= state.exhausted_until:
            state.exhausted_until = None
        return state.exhausted_until is not None

    def adopt(self, account_id: str, health: Health) -> None:
        """Take the health another instance recorded (from the shared state store)."""
        state = self._states.get(account_id)
        if state is not None:
            state.health = health

    def _sample(self, state: _State, now: float, *, fault: bool) -> None:
        samples = state.samples
        samples.append((now, fault))
        while samples and now - samples[0][0] > self.rules.fault_window_s:
            samples.popleft()

    def _fault_rate_exceeded(self, state: _State) -> bool:
        total = len(state.samples)
        if total < self.rules.fault_min_samples:
            return False
        faults = sum(1 for _, fault in state.samples if fault)
        return faults >= self.rules.fault_rate * total

    def _cool(
        self, state: _State, current: Health, until: float, reason: str, *, usage: bool = False
    ) -> None:
        # A longer cooldown already running is not shortened by a shorter one.
        if isinstance(current, Cooling) and current.until >= until:
            return
        state.health = Cooling(until, reason, usage)

    @staticmethod
    def _current(state: _State, now: float) -> Health:
        if isinstance(state.health, Cooling) and now >= state.health.until:
            state.health = HEALTHY
        return state.health

    # selection

    def choose(
        self,
        *,
        exclude: Collection[str] = (),
        prefer: str | None = None,
        load: Mapping[str, int] | None = None,
        sessions: Mapping[str, int] | None = None,
    ) -> Choice:
        """An account for a SOFT/NONE request or a new HARD one (owners go through
        `choose_owner`): `prefer` when usable, else the one `spread` ranks first.

        `load`: requests in flight per account across every instance (the shared
        store's leases), used instead of this instance's own counts when given.
        `sessions`: bound sessions per account (missing: none).
        """
        now = self._clock()
        if prefer is not None and prefer not in exclude:
            state = self._states.get(prefer)
            if (
                state is not None
                and isinstance(self._current(state, now), Healthy)
                and not self._exhausted(state, now)
            ):
                return self._chosen(state)
        candidates, cooling_until, all_usage = self._candidates(exclude, now, load, sessions or {})
        best = spread(candidates)
        if best is not None:
            return self._chosen(self._states[best.id])
        if cooling_until is not None:
            return replace(self._all_cooling(cooling_until, now), usage_limited=all_usage)
        # When accounts were excluded (tried and failed for this request), the last
        # failure is the better answer for the client than a bare "no account".
        tried = any(account_id in self._states for account_id in exclude)
        return NoneUsable("excluded" if tried else "disabled")

    def _candidates(
        self,
        exclude: Collection[str],
        now: float,
        load: Mapping[str, int] | None,
        sessions: Mapping[str, int],
    ) -> tuple[list[Candidate], float | None, bool]:
        """The usable accounts not excluded, in file order; the earliest end of a
        cooldown among the others (None: none cooling); whether every one cooling is
        out on a usage limit."""
        candidates: list[Candidate] = []
        cooling_until: float | None = None
        all_usage = True
        wall_now = self._wall_clock()
        for account_id, state in self._states.items():
            if account_id in exclude:
                continue
            health = self._current(state, now)
            if isinstance(health, Healthy) and self._exhausted(state, now):
                assert state.exhausted_until is not None
                health = Cooling(state.exhausted_until, "rate limit window exhausted", True)
            if isinstance(health, Healthy):
                in_flight = state.in_flight if load is None else load.get(account_id, 0)
                candidates.append(
                    Candidate(
                        account_id,
                        headroom(state.rate_limits, wall_now=wall_now),
                        in_flight,
                        sessions.get(account_id, 0),
                        state.last_chosen,
                    )
                )
            elif isinstance(health, Cooling):
                all_usage = all_usage and health.usage
                cooling_until = (
                    health.until if cooling_until is None else min(cooling_until, health.until)
                )
        return candidates, cooling_until, all_usage

    def _chosen(self, state: _State) -> Chosen:
        self._choices += 1
        state.last_chosen = self._choices
        return Chosen(state.account)

    def choose_owner(self, owner: str) -> Choice:
        """The hard owner if it can serve; never another account."""
        state = self._states.get(owner)
        if state is None:
            return NoneUsable("removed", owner=owner)
        now = self._clock()
        health = self._current(state, now)
        if isinstance(health, Cooling):
            wait = max(1, math.ceil(health.until - now))
            return AllCoolingDown(health.until, wait, owner, usage_limited=health.usage)
        if isinstance(health, Disabled):
            return NoneUsable("disabled", owner=owner)
        return Chosen(state.account)

    @staticmethod
    def _all_cooling(until: float, now: float) -> AllCoolingDown:
        return AllCoolingDown(until, max(1, math.ceil(until - now)))

    # operator view

    def snapshot(self) -> list[AccountRow]:
        now = self._clock()
        wall_now = self._wall_clock()
        rows = []
        for account_id, state in self._states.items():
            health = self._current(state, now)
            until: float | None = None
            match health:
                case Healthy() if self._exhausted(state, now):
                    until = state.exhausted_until
                    label = "exhausted: rate limit window at 100%"
                case Healthy():
                    label = "healthy"
                case Cooling(until=until, reason=reason):
                    label = f"cooling: {reason}"
                case Disabled(reason=reason):
                    label = f"disabled: {reason}"
            rows.append(
                AccountRow(
                    id=account_id,
                    health=label,
                    in_flight=state.in_flight,
                    cooldown_until=until,
                    cooldown_remaining_s=None if until is None else until - now,
                    served=state.served,
                    rate_limits=describe_limits(state.rate_limits, wall_now=wall_now),
                )
            )
        return rows
