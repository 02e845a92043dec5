"""Answers kept for a short while and shared by every client that asks the same.

Bounded by age (`ttl_s`) and count (`max_entries`, least recently stored
first out); time comes from the injected clock. What may be cached, and
under which key, is `forward_policy`'s; the shell makes concurrent misses
wait for the first (`shell.answer_flights`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from responses_ws_bridge.core.forward_policy import CachedAnswer

DEFAULT_TTL_S = 30.0
DEFAULT_MAX_ENTRIES = 64


class AnswerCache:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._clock = clock
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    def get(self, key: str) -> CachedAnswer | None:
        found = self._entries.get(key)
        if found is None:
            return None
        stored_at, answer = found
        if self._clock() - stored_at >= self.ttl_s:
            del self._entries[key]
            return None
        return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[key] = (self._clock(), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
