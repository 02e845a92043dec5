"""Reading the addons' option values (mitmproxy's `--set` parses no floats)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

from mitmproxy import ctx, exceptions

MiB = 1024 * 1024

logger = logging.getLogger("responses_ws_bridge")


def one_line_at_startup[A](
    configure: Callable[[A, set[str]], None],
) -> Callable[[A, set[str]], None]:
    """A `configure` whose refusal at startup is one error line, not a traceback.

    mitmproxy shows an `OptionsError` raised while it loads a script as
    "error in script" with a traceback. At startup the refusal is logged as the
    one line it is (mitmproxy then stops: it exits on an error logged while it
    starts); later (`:set` in the console) it is raised, and mitmproxy keeps
    the previous value.
    """

    @functools.wraps(configure)
    def checked(addon: A, updated: set[str]) -> None:
        try:
            configure(addon, updated)
        except exceptions.OptionsError as exc:
            if not _starting():
                raise
            logger.error("%s", exc)

    return checked


def _starting() -> bool:
    """mitmproxy is starting: its startup error check still watches the log."""
    master = getattr(ctx, "master", None)
    check = master.addons.get("errorcheck") if master is not None else None
    handler = getattr(check, "logger", None)
    return handler is not None and handler in logging.getLogger().handlers


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
