"""The pooled usage answer, field by field (`core.usage_report`)."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.rate_limits import Credits, RateLimits, Window
from responses_ws_bridge.core.usage_report import (
    AccountUsage,
    is_usage_request,
    usage_report,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("method", "path", "answered"),
    [
        ("GET", "/backend-api/wham/usage", True),
        ("GET", "/backend-api/wham/usage?x=1", True),
        ("GET", "/api/codex/usage", True),
        ("GET", "/v1/api/codex/usage/", True),
        ("POST", "/backend-api/wham/usage", False),
        ("GET", "/backend-api/wham/tasks/list", False),
        ("GET", "/v1/models", False),
    ],
)
def test_the_paths_codex_reads_usage_from(method: str, path: str, answered: bool) -> None:
    assert is_usage_request(method, path) is answered


def test_windows_are_pooled() -> None:
    a = RateLimits(Window(100, 300, NOW + 600), Window(40, 10080, NOW + 86400), plan_type="pro")
    b = RateLimits(Window(50, 300, NOW + 60), credits=Credits(True, False, "2.5"))
    report = usage_report(
        [AccountUsage(a, False), AccountUsage(b, True), AccountUsage(None, True)], wall_now=NOW
    )
    assert report["plan_type"] == "pro"
    assert report["rate_limit"] == {
        "allowed": True,
        "limit_reached": False,
        "primary_window": {
            "used_percent": 75,
            "limit_window_seconds": 18000,
            "reset_after_seconds": 60,
            "reset_at": int(NOW) + 60,
        },
        "secondary_window": {
            "used_percent": 40,
            "limit_window_seconds": 604800,
            "reset_after_seconds": 86400,
            "reset_at": int(NOW) + 86400,
        },
    }
    assert report["credits"] == {"has_credits": True, "unlimited": False, "balance": "2.5"}


def test_a_pool_with_no_account_left_has_its_limit_reached() -> None:
    far = RateLimits(Window(100, 300, NOW + 30 * 86400))
    report = usage_report([AccountUsage(far, False), AccountUsage(far, False)], wall_now=NOW)
    assert report["rate_limit"]["limit_reached"] is True
    assert report["rate_limit"]["allowed"] is False
    # Reset times are clamped to 7 days (and so fit Codex CLI's 32-bit fields).
    assert report["rate_limit"]["primary_window"]["reset_after_seconds"] == 7 * 86400


def test_nothing_known_is_left_out() -> None:
    report = usage_report([AccountUsage(None, True)], wall_now=NOW)
    assert report == {
        "plan_type": "guest",
        "rate_limit": {
            "allowed": True,
            "limit_reached": False,
            "primary_window": None,
            "secondary_window": None,
        },
        "credits": None,
    }
