"""Helpers for state-store tests: a settable clock and a bounded asyncio runner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(main: Callable[[], Coroutine[Any, Any, None]], timeout_s: float = 20.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await main()

    asyncio.run(bounded())
