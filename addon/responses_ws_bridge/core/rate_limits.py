"""Codex rate-limit figures: read from frames and headers, judged, and written as headers.

Over WebSocket the Codex backend sends `codex.rate_limits` frames (often before
`response.created`); over HTTP the same figures travel as `x-codex-*` response
headers, which is where Codex CLI reads them. `error` frames may carry the
headers too. Everything here is pure; wall-clock time (epoch seconds) is an
argument.

Header families, each kept and each passed on to the client as it came:

| family                  | headers                                                    | judged |
|-------------------------|------------------------------------------------------------|--------|
| Codex's own             | `x-codex-{primary,secondary}-{used-percent,window-minutes, | yes    |
|                         | reset-at}`                                                 |        |
| another limit (a        | `x-<limit>-primary-*`, `x-<limit>-secondary-*`,            | no     |
| metered model's bucket) | `x-<limit>-limit-name` (`<limit>`: `codex-bengalfox`, ...) |        |
| credits                 | `x-codex-credits-{has-credits,unlimited,balance}`          | yes    |
| messages                | `x-codex-promo-message`, `x-codex-active-limit`            | no     |

A `codex.rate_limits` frame naming another bucket (`limit_name` or
`metered_limit_name` not `codex`) becomes that bucket's family
(`codex_bengalfox` -> `x-codex-bengalfox-*`), as Codex CLI maps them.

| question                  | answer                                                         |
|---------------------------|----------------------------------------------------------------|
| another bucket's figures  | kept and passed on; never steer the account's choice           |
| headroom                  | 100 - the highest `used_percent` of a window not yet reset     |
| exhausted                 | a window at >= 100 %, no credits to pay: until its `reset_at`  |
| exhausted, no `reset_at`  | `window_minutes` from now; neither known: not judged           |
| how long at most          | `MAX_EXHAUSTION_S` (7 days), whatever `reset_at` says          |
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

FRAME_TYPE = "codex.rate_limits"
CODEX_BUCKET = "codex"
MAX_EXHAUSTION_S = 7 * 24 * 3600.0
_BUCKET_FIELDS = ("limit_id", "limit_name", "metered_limit_name")
_WINDOWS = ("primary", "secondary")
# `x-<limit>-primary-used-percent` names a family (as Codex CLI discovers them).
_FAMILY_HEADER = re.compile(r"x-([a-z0-9][a-z0-9-]*)-primary-used-percent")
# Passed on as they came; nothing here reads them.
MESSAGE_HEADERS = ("x-codex-promo-message", "x-codex-active-limit")


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
class Family:
    """The figures of a limit other than Codex's own (`limit_id` like `codex_bengalfox`)."""

    limit_id: str
    primary: Window | None = None
    secondary: Window | None = None
    limit_name: str | None = None

    @property
    def prefix(self) -> str:
        return "x-" + self.limit_id.replace("_", "-")


@dataclass(frozen=True)
class RateLimits:
    primary: Window | None = None
    secondary: Window | None = None
    credits: Credits | None = None
    plan_type: str | None = None
    # Other limits' families, by limit id; kept and passed on, never judged.
    others: tuple[Family, ...] = ()
    # `x-codex-promo-message`, `x-codex-active-limit`, as the upstream sent them.
    messages: tuple[tuple[str, str], ...] = ()

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
    """The figures of a `codex.rate_limits` frame (another bucket's as a family); None: none."""
    event = _load(frame) if isinstance(frame, str) else frame
    if not isinstance(event, Mapping) or event.get("type") != FRAME_TYPE:
        return None
    limits = event.get("rate_limits")
    limits = limits if isinstance(limits, Mapping) else {}
    primary, secondary = _window(limits.get("primary")), _window(limits.get("secondary"))
    if is_other_bucket(event):
        if primary is None and secondary is None:
            return None
        return RateLimits(others=(Family(_bucket_id(event), primary, secondary),))
    credits = event.get("credits")
    if not isinstance(credits, Mapping):
        credits = limits.get("credits")
    found = RateLimits(
        primary=primary,
        secondary=secondary,
        credits=_credits(credits) if isinstance(credits, Mapping) else None,
        plan_type=_text(event.get("plan_type")),
    )
    return found if found != RateLimits() else None


def _bucket_id(event: Mapping[str, Any]) -> str:
    """Codex CLI's limit id for a frame's bucket: lower case, `-` as `_`."""
    for name in ("metered_limit_name", "limit_name", "limit_id"):
        value = event.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip().lower().replace("-", "_")
    return CODEX_BUCKET


def from_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> RateLimits | None:
    """The figures of every family in `x-*` headers (HTTP responses, 101s, error frames)."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    fields = {k.lower(): v for k, v in pairs if k.lower().startswith("x-")}
    if not fields:
        return None
    credits = Credits(
        _flag(fields.get("x-codex-credits-has-credits")),
        _flag(fields.get("x-codex-credits-unlimited")),
        _text(fields.get("x-codex-credits-balance")),
    )
    others = tuple(
        family
        for family in (_family(fields, limit_id) for limit_id in _family_ids(fields))
        if family.primary is not None or family.secondary is not None
    )
    found = RateLimits(
        primary=_header_window(fields, "x-codex", "primary"),
        secondary=_header_window(fields, "x-codex", "secondary"),
        credits=credits if credits != Credits() else None,
        plan_type=_text(fields.get("x-codex-plan-type")),
        others=others,
        messages=tuple((n, fields[n]) for n in MESSAGE_HEADERS if _text(fields.get(n))),
    )
    return found if found != RateLimits() else None


def _family_ids(fields: Mapping[str, str]) -> list[str]:
    found = (_FAMILY_HEADER.fullmatch(name) for name in fields)
    ids = {m.group(1).replace("-", "_") for m in found if m is not None}
    ids.discard(CODEX_BUCKET)
    return sorted(ids)


def _family(fields: Mapping[str, str], limit_id: str) -> Family:
    prefix = "x-" + limit_id.replace("_", "-")
    return Family(
        limit_id,
        _header_window(fields, prefix, "primary"),
        _header_window(fields, prefix, "secondary"),
        _text((fields.get(f"{prefix}-limit-name") or "").strip()),
    )


def _header_window(fields: Mapping[str, str], prefix: str, name: str) -> Window | None:
    used = _number(fields.get(f"{prefix}-{name}-used-percent"))
    if used is None:
        return None
    minutes = _number(fields.get(f"{prefix}-{name}-window-minutes"))
    return Window(
        used,
        int(minutes) if minutes is not None else None,
        _number(fields.get(f"{prefix}-{name}-reset-at")),
    )


def merge(old: RateLimits | None, new: RateLimits) -> RateLimits:
    """The latest figures: what `new` says, and what only `old` knew (family by family)."""
    if old is None:
        return new
    others = {f.limit_id: f for f in old.others} | {f.limit_id: f for f in new.others}
    messages = dict(old.messages) | dict(new.messages)
    return replace(
        new,
        primary=new.primary or old.primary,
        secondary=new.secondary or old.secondary,
        credits=new.credits or old.credits,
        plan_type=new.plan_type or old.plan_type,
        others=tuple(others[k] for k in sorted(others)),
        messages=tuple(messages.items()),
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
    """The response headers Codex CLI reads, every family of the figures known."""
    if limits is None:
        return []
    out: list[tuple[str, str]] = []
    for name, window in limits.windows():
        out += _window_headers("x-codex", name, window)
    for family in limits.others:
        for name, found in (("primary", family.primary), ("secondary", family.secondary)):
            if found is not None:
                out += _window_headers(family.prefix, name, found)
        if family.limit_name is not None:
            out.append((f"{family.prefix}-limit-name", family.limit_name))
    out += _credit_headers(limits.credits)
    out += limits.messages
    return out


def _window_headers(prefix: str, name: str, window: Window) -> list[tuple[str, str]]:
    out = [(f"{prefix}-{name}-used-percent", _format(window.used_percent))]
    if window.window_minutes is not None:
        out.append((f"{prefix}-{name}-window-minutes", str(window.window_minutes)))
    if window.reset_at is not None:
        out.append((f"{prefix}-{name}-reset-at", _format(window.reset_at)))
    return out


def _credit_headers(credits: Credits | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
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
