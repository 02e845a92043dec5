"""Running a coroutine function to completion within a time bound."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


def run_bounded(body: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    """`body()` on a new event loop, cancelled after `timeout_s`; its result."""

    async def main() -> Any:
        async with asyncio.timeout(timeout_s):
            return await body()

    return asyncio.run(main())
