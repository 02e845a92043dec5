"""Whether the shared store is reachable, and when to try it again: a pure state machine.

| state      | event   | next state                                         | log          |
|------------|---------|----------------------------------------------------|--------------|
| Connected  | success | Connected                                          | -            |
| Connected  | failure | Failing(since=now, failures=1, retry at now+base)  | "unavailable"|
| Failing    | failure | Failing(failures+1, retry at now+backoff(failures))| -            |
| Failing    | success | Connected                                          | "back"       |

While failing, `may_try(now)` is False until the retry time: calls are
answered `StateUnavailable` at once instead of each waiting for a timeout,
and one call per backoff period probes the store. Backoff doubles from
`base_s` up to `max_s`; `jitter` in [0, 1) spreads instances by up to
`jitter_fraction` of the delay. Time and jitter are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    jitter_fraction: float = 0.2

    def delay(self, failures: int, jitter: float) -> float:
        """Seconds before the next probe after `failures` consecutive failures (>= 1)."""
        raw = min(self.max_s, self.base_s * self.factor ** (failures - 1))
        return raw * (1.0 + self.jitter_fraction * jitter)


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Failing:
    since: float
    failures: int
    retry_at: float
    reason: str


StoreHealth = Connected | Failing
CONNECTED = Connected()


class Log(StrEnum):
    """What a transition tells the log: once per outage, once per recovery."""

    NOTHING = "nothing"
    UNAVAILABLE = "unavailable"
    BACK = "back"


def on_success(state: StoreHealth) -> tuple[StoreHealth, Log]:
    return CONNECTED, (Log.BACK if isinstance(state, Failing) else Log.NOTHING)


def on_failure(
    state: StoreHealth, *, now: float, reason: str, backoff: Backoff, jitter: float
) -> tuple[StoreHealth, Log]:
    if isinstance(state, Failing):
        failures = state.failures + 1
        retry_at = now + backoff.delay(failures, jitter)
        return Failing(state.since, failures, retry_at, reason), Log.NOTHING
    return Failing(now, 1, now + backoff.delay(1, jitter), reason), Log.UNAVAILABLE


def may_try(state: StoreHealth, now: float) -> bool:
    return isinstance(state, Connected) or now >= state.retry_at
