"""Codex rate-limit figures: read from frames and headers, judged, and written as headers.

Over WebSocket the Codex backend sends `codex.rate_limits` frames (often before
`response.created`); over HTTP the same figures travel as `x-codex-*` response
headers, which is where Codex CLI reads them. `error` frames may carry the
headers too. Everything here is pure; wall-clock time (epoch seconds) is an
argument.

| question                  | answer                                                         |
|---------------------------|----------------------------------------------------------------|
| a frame of another bucket | `limit_id`/`limit_name`/`metered_limit_name` not `codex`: ignored |
| headroom                  | 100 - the highest `used_percent` of a window not yet reset     |
| exhausted                 | a window at >= 100 %, no credits to pay: until its `reset_at`  |
| exhausted, no `reset_at`  | `window_minutes` from now; neither known: not judged           |
| how long at most          | `MAX_EXHAUSTION_S` (7 days), whatever `reset_at` says          |
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

FRAME_TYPE = "codex.rate_limits"
CODEX_BUCKET = "codex"
MAX_EXHAUSTION_S = 7 * 24 * 3600.0
HEADER_PREFIX = "x-codex-"
_BUCKET_FIELDS = ("limit_id", "limit_name", "metered_limit_name")
_WINDOWS = ("primary", "secondary")


@dataclass(frozen=True)
class Window:
    """One rate-limit window: how much of it is used, how long it is, when it resets."""

    used_percent: float
    window_minutes: int | None = None
    # Epoch seconds.
    reset_at: float | None = None


@dataclass(frozen=True)
class Credits:
    has_credits: bool | None = None
    unlimited: bool | None = None
    balance: str | None = None

    @property
    def can_pay(self) -> bool:
        """Credits carry on past an exhausted window."""
        return bool(self.unlimited or self.has_credits)


@dataclass(frozen=True)
class RateLimits:
    primary: Window | None = None
    secondary: Window | None = None
    credits: Credits | None = None
    plan_type: str | None = None

    def windows(self) -> list[tuple[str, Window]]:
        return [
            (name, w) for name, w in (("primary", self.primary), ("secondary", self.secondary)) if w
        ]


# --- reading --------------------------------------------------------------------------------


def is_other_bucket(event: Mapping[str, Any]) -> bool:
    """A frame that names a bucket other than Codex's own (e.g. a metered model)."""
    for name in _BUCKET_FIELDS:
        value = event.get(name)
        if isinstance(value, str) and value and value.lower() != CODEX_BUCKET:
            return True
    return False


def from_frame(frame: str | Mapping[str, Any]) -> RateLimits | None:
    """The figures of a `codex.rate_limits` frame; None for another bucket or another frame."""
    event = _load(frame) if isinstance(frame, str) else frame
    if not isinstance(event, Mapping) or event.get("type") != FRAME_TYPE or is_other_bucket(event):
        return None
    limits = event.get("rate_limits")
    limits = limits if isinstance(limits, Mapping) else {}
    credits = event.get("credits")
    if not isinstance(credits, Mapping):
        credits = limits.get("credits")
    found = RateLimits(
        primary=_window(limits.get("primary")),
        secondary=_window(limits.get("secondary")),
        credits=_credits(credits) if isinstance(credits, Mapping) else None,
        plan_type=_text(event.get("plan_type")),
    )
    return found if found != RateLimits() else None


def from_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> RateLimits | None:
    """The figures of `x-codex-*` headers (HTTP responses, 101s, an error frame's `headers`)."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    fields = {k.lower(): v for k, v in pairs if k.lower().startswith(HEADER_PREFIX)}
    if not fields:
        return None
    windows: dict[str, Window | None] = {}
    for name in _WINDOWS:
        used = _number(fields.get(f"x-codex-{name}-used-percent"))
        if used is None:
            windows[name] = None
            continue
        minutes = _number(fields.get(f"x-codex-{name}-window-minutes"))
        windows[name] = Window(
            used,
            int(minutes) if minutes is not None else None,
            _number(fields.get(f"x-codex-{name}-reset-at")),
        )
    credits = Credits(
        _flag(fields.get("x-codex-credits-has-credits")),
        _flag(fields.get("x-codex-credits-unlimited")),
        _text(fields.get("x-codex-credits-balance")),
    )
    found = RateLimits(
        primary=windows["primary"],
        secondary=windows["secondary"],
        credits=credits if credits != Credits() else None,
        plan_type=_text(fields.get("x-codex-plan-type")),
    )
    return found if found != RateLimits() else None


def merge(old: RateLimits | None, new: RateLimits) -> RateLimits:
    """The latest figures: what `new` says, and what only `old` knew."""
    if old is None:
        return new
    return replace(
        new,
        primary=new.primary or old.primary,
        secondary=new.secondary or old.secondary,
        credits=new.credits or old.credits,
        plan_type=new.plan_type or old.plan_type,
    )


# --- judging --------------------------------------------------------------------------------


def headroom(limits: RateLimits | None, *, wall_now: float) -> float:
    """Percent left in the tightest window (100 when nothing is known or all have reset)."""
    if limits is None:
        return 100.0
    used = [w.used_percent for _, w in limits.windows() if not _has_reset(w, wall_now)]
    return max(0.0, 100.0 - max(used, default=0.0))


def exhausted_until(limits: RateLimits | None, *, wall_now: float) -> float | None:
    """Epoch seconds until which the account must not start new sessions; None: usable."""
    if limits is None or (limits.credits is not None and limits.credits.can_pay):
        return None
    until: float | None = None
    for _, window in limits.windows():
        if window.used_percent < 100 or _has_reset(window, wall_now):
            continue
        if window.reset_at is not None:
            end = window.reset_at
        elif window.window_minutes:
            end = wall_now + window.window_minutes * 60.0
        else:
            continue
        until = end if until is None else max(until, end)
    if until is None:
        return None
    return min(until, wall_now + MAX_EXHAUSTION_S)


def _has_reset(window: Window, wall_now: float) -> bool:
    return window.reset_at is not None and window.reset_at <= wall_now


# --- writing --------------------------------------------------------------------------------


def to_headers(limits: RateLimits | None) -> list[tuple[str, str]]:
    """The `x-codex-*` response headers Codex CLI reads, for the figures known."""
    if limits is None:
        return []
    out: list[tuple[str, str]] = []
    for name, window in limits.windows():
        out.append((f"x-codex-{name}-used-percent", _format(window.used_percent)))
        if window.window_minutes is not None:
            out.append((f"x-codex-{name}-window-minutes", str(window.window_minutes)))
        if window.reset_at is not None:
            out.append((f"x-codex-{name}-reset-at", _format(window.reset_at)))
    credits = limits.credits
    if credits is not None:
        if credits.has_credits is not None:
            out.append(("x-codex-credits-has-credits", _bool(credits.has_credits)))
        if credits.unlimited is not None:
            out.append(("x-codex-credits-unlimited", _bool(credits.unlimited)))
        if credits.balance is not None:
            out.append(("x-codex-credits-balance", credits.balance))
    return out


def describe(limits: RateLimits | None, *, wall_now: float) -> str:
    """`primary 42% of 300m · secondary 7% of 10080m`, for `bridge.accounts`."""
    if limits is None:
        return "-"
    parts = []
    for name, window in limits.windows():
        used = 0.0 if _has_reset(window, wall_now) else window.used_percent
        text = f"{name} {_format(used)}%"
        if window.window_minutes is not None:
            text += f" of {window.window_minutes}m"
        parts.append(text)
    if limits.credits is not None and limits.credits.can_pay:
        parts.append("credits")
    return " · ".join(parts) or "-"


# --- values ---------------------------------------------------------------------------------


def _window(value: Any) -> Window | None:
    if not isinstance(value, Mapping):
        return None
    used = _number(value.get("used_percent"))
    if used is None:
        return None
    minutes = _number(value.get("window_minutes"))
    return Window(
        used, int(minutes) if minutes is not None else None, _number(value.get("reset_at"))
    )


def _credits(value: Mapping[str, Any]) -> Credits:
    balance = value.get("balance")
    return Credits(
        _flag(value.get("has_credits")),
        _flag(value.get("unlimited")),
        str(balance)
        if isinstance(balance, str | int | float) and not isinstance(balance, bool)
        else None,
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _format(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
