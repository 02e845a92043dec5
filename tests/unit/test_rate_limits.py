"""Codex rate-limit figures: frames, headers, buckets, headroom, exhaustion, headers out."""

from __future__ import annotations

import json

import pytest
from responses_ws_bridge.core.rate_limits import (
    MAX_EXHAUSTION_S,
    Credits,
    Family,
    RateLimits,
    Window,
    describe,
    exhausted_until,
    from_frame,
    from_headers,
    headroom,
    merge,
    to_headers,
)
from responses_ws_bridge.local.response_events import rate_limits_event

NOW = 1_800_000_000.0
RESET = int(NOW) + 3600


def limits(primary: float | None, secondary: float | None = None, **kw: object) -> RateLimits:
    def window(used: float | None, reset: float | None = RESET) -> Window | None:
        return None if used is None else Window(used, 300, reset)

    credits = kw.get("credits")
    assert credits is None or isinstance(credits, Credits)
    return RateLimits(window(primary), window(secondary), credits)


def test_frame_is_read() -> None:
    found = from_frame(json.dumps(rate_limits_event(42, reset_at=RESET, secondary_used=7)))
    assert found is not None
    assert found.primary == Window(42, 300, RESET)
    assert found.secondary is not None and found.secondary.used_percent == 7
    assert found.credits == Credits(False, False, "0")
    assert found.plan_type == "plus"


@pytest.mark.parametrize(
    ("bucket", "family"),
    [
        (None, None),
        ("codex", None),
        ("CODEX", None),
        ("gpt-5-codex-mini", "gpt_5_codex_mini"),
        ("codex_bengalfox", "codex_bengalfox"),
        ("", None),
    ],
)
def test_other_buckets_become_families_that_are_never_judged(
    bucket: str | None, family: str | None
) -> None:
    found = from_frame(rate_limits_event(100, reset_at=RESET, bucket=bucket))
    assert found is not None
    if family is None:
        assert found.primary is not None and found.others == ()
        return
    assert found.primary is None and found.credits is None
    assert [f.limit_id for f in found.others] == [family]
    # A metered bucket at 100 % does not exhaust the account.
    assert exhausted_until(found, wall_now=NOW) is None
    assert headroom(found, wall_now=NOW) == 100.0


def test_every_header_family_is_kept_and_passed_on() -> None:
    headers = {
        "x-codex-primary-used-percent": "12.5",
        "x-codex-primary-window-minutes": "300",
        "x-codex-secondary-used-percent": "40",
        "x-codex-bengalfox-primary-used-percent": "80",
        "x-codex-bengalfox-primary-reset-at": "1704074400",
        "x-codex-bengalfox-limit-name": "gpt-5.2-codex-sonic",
        "x-gpt-image-primary-used-percent": "5",
        "x-codex-credits-has-credits": "true",
        "x-codex-credits-unlimited": "false",
        "x-codex-credits-balance": "12",
        "x-codex-promo-message": "Upgrade for more",
        "x-codex-active-limit": "codex_bengalfox",
        "content-type": "application/json",
    }
    found = from_headers(headers)
    assert found is not None
    assert [f.limit_id for f in found.others] == ["codex_bengalfox", "gpt_image"]
    assert found.others[0] == Family(
        "codex_bengalfox", Window(80, None, 1704074400), None, "gpt-5.2-codex-sonic"
    )
    out = dict(to_headers(found))
    assert out == {k: v for k, v in headers.items() if k != "content-type"}
    # Only Codex's own family is judged.
    assert headroom(found, wall_now=NOW) == 60.0


def test_a_family_merges_by_its_id() -> None:
    old = RateLimits(others=(Family("a", Window(1)), Family("b", Window(2))))
    new = RateLimits(others=(Family("b", Window(3)),), messages=(("x-codex-promo-message", "hi"),))
    merged = merge(old, new)
    assert merged.others == (Family("a", Window(1)), Family("b", Window(3)))
    assert merged.messages == (("x-codex-promo-message", "hi"),)


@pytest.mark.parametrize(
    "frame",
    ['{"type":"response.created"}', "not json", '{"type":"codex.rate_limits"}', "[]"],
)
def test_frames_without_figures_are_none(frame: str) -> None:
    assert from_frame(frame) is None


def test_headers_round_trip() -> None:
    figures = RateLimits(
        Window(42.5, 300, RESET), Window(7, 10080, RESET + 1), Credits(True, False, "9.99")
    )
    headers = to_headers(figures)
    assert ("x-codex-primary-used-percent", "42.5") in headers
    assert ("x-codex-credits-has-credits", "true") in headers
    assert from_headers(headers) == figures
    assert from_headers(dict((k.upper(), v) for k, v in headers)) == figures


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"x-codex-primary-used-percent": "lots"}],
)
def test_headers_without_figures_are_none(headers: dict[str, str]) -> None:
    assert from_headers(headers) is None


def test_merge_keeps_what_only_the_old_knew() -> None:
    old = RateLimits(Window(10), Window(20), Credits(True))
    new = RateLimits(Window(30))
    assert merge(old, new) == RateLimits(Window(30), Window(20), Credits(True))
    assert merge(None, new) == new


@pytest.mark.parametrize(
    ("figures", "left"),
    [
        (None, 100.0),
        (limits(42), 58.0),
        (limits(42, 90), 10.0),
        (limits(120), 0.0),
        (RateLimits(Window(99, 300, NOW - 1)), 100.0),  # that window has reset
    ],
)
def test_headroom(figures: RateLimits | None, left: float) -> None:
    assert headroom(figures, wall_now=NOW) == left


@pytest.mark.parametrize(
    ("figures", "until"),
    [
        (None, None),
        (limits(99.9), None),
        (limits(100), RESET),
        (limits(10, 100), RESET),
        (limits(100, credits=Credits(has_credits=True)), None),
        (limits(100, credits=Credits(unlimited=True)), None),
        (limits(100, credits=Credits(has_credits=False)), RESET),
        (RateLimits(Window(100, 300, NOW - 5)), None),  # reset already
        (RateLimits(Window(100, 60, None)), NOW + 3600),  # no reset_at: one window from now
        (RateLimits(Window(100, None, None)), None),  # nothing to go by
        (RateLimits(Window(100, 300, NOW + 30 * 86400)), NOW + MAX_EXHAUSTION_S),  # clamped
    ],
)
def test_exhausted_until(figures: RateLimits | None, until: float | None) -> None:
    assert exhausted_until(figures, wall_now=NOW) == until


def test_describe() -> None:
    assert describe(None, wall_now=NOW) == "-"
    assert describe(limits(42, 7), wall_now=NOW) == "primary 42% of 300m · secondary 7% of 300m"
