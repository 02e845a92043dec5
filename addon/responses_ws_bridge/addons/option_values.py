"""Reading the addons' option values (mitmproxy's `--set` parses no floats)."""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import exceptions

MiB = 1024 * 1024


def seconds(opts: object, name: str) -> float:
    """A duration option: a string of seconds, finite and not negative."""
    raw = getattr(opts, name)
    try:
        value = float(raw)
    except ValueError:
        raise exceptions.OptionsError(f"{name}: {raw!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise exceptions.OptionsError(f"{name}: must be a finite number of seconds >= 0")
    return value


def positive(opts: object, name: str) -> int:
    value: int = getattr(opts, name)
    if value <= 0:
        raise exceptions.OptionsError(f"{name} must be positive")
    return value


def not_negative(opts: object, name: str) -> int:
    value: int = getattr(opts, name)
    if value < 0:
        raise exceptions.OptionsError(f"{name} must not be negative")
    return value


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns, for the console's command output."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
