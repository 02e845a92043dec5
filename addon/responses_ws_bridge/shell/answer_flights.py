"""The shared answer cache, with one upstream call per key however many clients ask at once.

A lookup that finds a fresh answer gets it. The first lookup that misses
leads: it fetches, then stores what it got (or None). Lookups of the same key
meanwhile wait for that store and take its answer; when the leader got
nothing to keep (or left), each of them fetches for itself.
"""

from __future__ import annotations

import asyncio

from responses_ws_bridge.core.answer_cache import AnswerCache
from responses_ws_bridge.core.forward_policy import CachedAnswer

# A waiter never waits on a stuck leader longer than this.
MAX_WAIT_S = 30.0


class AnswerFlights:
    def __init__(self, cache: AnswerCache) -> None:
        self.cache = cache
        self._leaders: dict[str, asyncio.Future[CachedAnswer | None]] = {}
        # Upstream calls made for cacheable answers (the leaders), for tests and metrics.
        self.fetches = 0

    async def lookup(self, key: str) -> CachedAnswer | None:
        """A fresh answer, or None: the caller fetches and must `store` (it leads)."""
        while True:
            found = self.cache.get(key)
            if found is not None:
                return found
            leader = self._leaders.get(key)
            if leader is None:
                self._leaders[key] = asyncio.get_running_loop().create_future()
                self.fetches += 1
                return None
            try:
                answer = await asyncio.wait_for(asyncio.shield(leader), MAX_WAIT_S)
            except TimeoutError:
                # A stuck leader: fetch without waiting any longer.
                self.fetches += 1
                return None
            if answer is not None:
                return answer
            # The leader got nothing to share: the next caller leads.

    def store(self, key: str, answer: CachedAnswer | None) -> None:
        if answer is not None:
            self.cache.put(key, answer)
        leader = self._leaders.pop(key, None)
        if leader is not None and not leader.done():
            leader.set_result(answer)
