"""The pooled usage answer: what Codex CLI reads its usage from, built from the pool's figures.

Codex CLI asks `GET {chatgpt_base_url}/wham/usage` (a base URL containing
`/backend-api`) or `GET {base}/api/codex/usage` for its rate-limit status
(`/status`, the usage warnings). In front of an account pool that question is
about the pool, and the bridge answers it itself from the latest figures each
account's upstream sent (`codex.rate_limits` frames, `x-codex-*` headers),
never asking an upstream and never naming an account.

| field                                  | pooled from                                          |
|----------------------------------------|------------------------------------------------------|
| `plan_type`                            | the first account's known plan (`guest`, the field's |
|                                        | own default, when no account told one)               |
| `rate_limit.{primary,secondary}_window`| over the accounts that reported that window:         |
| `.used_percent`                        | the mean, rounded (the pool's share used)            |
| `.limit_window_seconds`                | the first reporting account's window                 |
| `.reset_at`, `.reset_after_seconds`    | the earliest reset among them (when capacity next    |
|                                        | comes back), at most 7 days ahead                    |
| `rate_limit.allowed`                   | some account can take a new session                  |
| `rate_limit.limit_reached`             | none can: each is at 100 % or cooling on a usage     |
|                                        | limit (`account_pool`)                               |
| `credits`                              | `has_credits`/`unlimited`: any account's; `balance`: |
|                                        | the sum of the numeric balances                      |

A window no account reported is left out (`null`), as the backend does for
a plan without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from responses_ws_bridge.core.rate_limits import MAX_EXHAUSTION_S, Credits, RateLimits, Window

USAGE_SUFFIXES = ("/wham/usage", "/api/codex/usage")
DEFAULT_PLAN = "guest"


def is_usage_request(method: str, path: str) -> bool:
    """`GET …/wham/usage` or `GET …/api/codex/usage`, query aside."""
    return method == "GET" and path.split("?", 1)[0].rstrip("/").endswith(USAGE_SUFFIXES)


@dataclass(frozen=True)
class AccountUsage:
    """One account as the report sees it: its figures, and whether it takes new sessions."""

    limits: RateLimits | None
    usable: bool


def usage_report(accounts: Sequence[AccountUsage], *, wall_now: float) -> dict[str, Any]:
    """The `RateLimitStatusPayload` Codex CLI decodes, for the whole pool."""
    known = [a.limits for a in accounts if a.limits is not None]
    allowed = any(a.usable for a in accounts)
    plan = next((limits.plan_type for limits in known if limits.plan_type), DEFAULT_PLAN)
    return {
        "plan_type": plan,
        "rate_limit": {
            "allowed": allowed,
            "limit_reached": not allowed,
            "primary_window": _window([limits.primary for limits in known], wall_now),
            "secondary_window": _window([limits.secondary for limits in known], wall_now),
        },
        "credits": _credits([limits.credits for limits in known if limits.credits]),
    }


def _window(windows: Sequence[Window | None], wall_now: float) -> dict[str, int] | None:
    reported = [w for w in windows if w is not None]
    if not reported:
        return None
    used = round(sum(min(100.0, max(0.0, w.used_percent)) for w in reported) / len(reported))
    minutes = next((w.window_minutes for w in reported if w.window_minutes), None)
    resets = [w.reset_at for w in reported if w.reset_at is not None and w.reset_at > wall_now]
    reset_at = min(min(resets, default=wall_now), wall_now + MAX_EXHAUSTION_S)
    return {
        "used_percent": used,
        "limit_window_seconds": (minutes or 0) * 60,
        "reset_after_seconds": max(0, math.ceil(reset_at - wall_now)),
        "reset_at": math.ceil(reset_at),
    }


def _credits(credits: Sequence[Credits]) -> dict[str, Any] | None:
    if not credits:
        return None
    balances = [_number(c.balance) for c in credits]
    numeric = [b for b in balances if b is not None]
    return {
        "has_credits": any(c.has_credits for c in credits),
        "unlimited": any(c.unlimited for c in credits),
        "balance": _format(sum(numeric)) if numeric else None,
    }


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _format(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"
