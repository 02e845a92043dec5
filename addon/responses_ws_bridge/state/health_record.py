"""Account health records: the pool's rules applied to what the shared store holds.

Pure functions, mirrored by the shared store's scripts, so every store gives
the same answers: a cooldown is never shortened, a success ends a cooldown
but not a disablement, and the record reads as the pool's `Health`.

`change_for` is the pool's `record_failure` rule as the write it makes to the
store, and `on_pool_clock` moves a cooldown from the store's wall clock to the
pool's own clock (which need not be the wall clock).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from responses_ws_bridge.core.account_pool import HEALTHY, Cooling, Disabled, Health, HealthRules
from responses_ws_bridge.core.failures import (
    Failure,
    describe,
    is_auth_rejection,
    is_rate_limit,
    is_upstream_fault,
    retry_after_of,
)
from responses_ws_bridge.state.store import AccountHealthRecord

REPEATED_FAULTS = "repeated upstream errors"


@dataclass(frozen=True)
class Disable:
    reason: str


@dataclass(frozen=True)
class CoolDown:
    until: float
    reason: str


HealthChange = Disable | CoolDown


def change_for(failure: Failure, rules: HealthRules, now: float) -> HealthChange | None:
    """What a failed attempt writes to the account's record (None: nothing, it is neutral).

    | failure                          | change                                   |
    |----------------------------------|------------------------------------------|
    | handshake 401/403                | Disable(description)                     |
    | 429 or rate-limit error event    | CoolDown(now + retry-after or default)   |
    | handshake 5xx, upstream 1011     | None: the pool's fault rate decides, and |
    |                                  | its cooldown is shared (`faults_cooled`) |
    | anything else                    | None                                     |
    """
    if is_auth_rejection(failure):
        return Disable(describe(failure))
    if is_rate_limit(failure):
        delay = retry_after_of(failure) or rules.rate_limit_default_s
        return CoolDown(now + delay, describe(failure))
    return None


def faults_cooled(health: Health | None, failure: Failure) -> Cooling | None:
    """The pool's cooldown for too many faults, right after `failure`: for the store too."""
    if is_upstream_fault(failure) and isinstance(health, Cooling):
        return health
    return None


def on_pool_clock(health: Health, wall_now: float, pool_now: float) -> Health:
    """`health` read at wall time `wall_now`, with a cooldown's end on the pool's clock."""
    if isinstance(health, Cooling):
        return Cooling(health.until - wall_now + pool_now, health.reason)
    return health


def cooled(record: AccountHealthRecord, until: float, reason: str) -> AccountHealthRecord:
    if record.cooldown_until is not None and record.cooldown_until >= until:
        return record
    return replace(record, cooldown_until=until, cooldown_reason=reason)


def cleared(record: AccountHealthRecord) -> AccountHealthRecord:
    return replace(record, cooldown_until=None, cooldown_reason="")


def health_of(record: AccountHealthRecord, now: float) -> Health:
    """The record as the pool's health at `now` (an expired cooldown reads as healthy)."""
    if record.disabled is not None:
        return Disabled(record.disabled)
    if record.cooldown_until is not None and now < record.cooldown_until:
        return Cooling(record.cooldown_until, record.cooldown_reason)
    return HEALTHY
