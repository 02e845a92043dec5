"""Notices a shared store that lost its data, and re-offers what this instance knows.

A store that restarts empty forgets every binding, response owner and token
chain. Whichever instance reaches it first marks it as recovering for a grace
period (`state.redis_store`: a new salt where another was known), during
which no new hard binding and no refresh lock is granted. Every instance
looks at the store's epoch every `interval_s` (and so notices within that),
then re-offers its owners and token chains (`on_lost`), first writer winning
as always: what was known before comes back before anything new is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from responses_ws_bridge.state.guarded import GuardedStore, StateUnavailable

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5


class StoreWatch:
    def __init__(
        self,
        store: Callable[[], GuardedStore | None],
        on_lost: Callable[[], Awaitable[None]],
        *,
        on_tick: Callable[[], Awaitable[None]] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._store = store
        self._on_lost = on_lost
        # Called after every look that found the store answering (pending writes go out).
        self._on_tick = on_tick
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check(self) -> bool:
        """One look; True when the store had lost its data (and what is known was offered)."""
        store = self._store()
        if store is None:
            return False
        # Past the requests' backoff: a store back from a restart is noticed within one look.
        lost = await store.probe("check_epoch", lambda s: s.check_epoch())
        if isinstance(lost, StateUnavailable):
            return False
        if not lost:
            if self._on_tick is not None:
                await self._on_tick()
            return False
        logger.warning(
            "state store came back without its data: re-offering the owners and token "
            "chains this instance knows; new hard sessions wait for the grace period"
        )
        await self._on_lost()
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.check()  # first at once: the epoch this instance knows
            except Exception:  # a bug here must not end the watch
                logger.exception("state store watch")
            await asyncio.sleep(self.interval_s)
