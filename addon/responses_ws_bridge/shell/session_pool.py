"""Idle upstream sessions kept open for the next request of the same key and account.

One response in flight per socket: a session is checked out for a turn and
comes back only after a terminal event. Sessions idle longer than the TTL are
closed by a reaper; a session that died while idle is dropped at checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from responses_ws_bridge.shell.upstream_client import UpstreamSession

PoolKey = tuple[str, str | None]  # (affinity key, account id or None in pass-through)


@dataclass
class _Idle:
    session: UpstreamSession
    since: float


class SessionPool:
    def __init__(
        self,
        *,
        idle_ttl_s: float = 120.0,
        max_idle: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_ttl_s = idle_ttl_s
        self.max_idle = max_idle
        self._clock = clock
        self._idle: OrderedDict[PoolKey, list[_Idle]] = OrderedDict()
        self._count = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    @property
    def idle_count(self) -> int:
        return self._count

    def checkout(self, key: PoolKey) -> UpstreamSession | None:
        """An open idle session for the key, most recently used first."""
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()
            self._count -= 1
            if not entries:
                del self._idle[key]
            if entry.session.is_open and self._clock() - entry.since < self.idle_ttl_s:
                return entry.session
            self._close(entry.session)
            entries = self._idle.get(key)
        return None

    def checkin(self, key: PoolKey, session: UpstreamSession) -> None:
        if self.idle_ttl_s <= 0 or not session.is_open:
            self._close(session)
            return
        # The recording of the turn ends here: an idle socket keeps none of its messages.
        session.idle()
        self._idle.setdefault(key, []).append(_Idle(session, self._clock()))
        self._idle.move_to_end(key)
        self._count += 1
        while self._count > self.max_idle:
            self._evict_oldest()
        self._ensure_reaper()

    def discard(self, session: UpstreamSession, *, code: int = 1000, reason: str = "") -> None:
        """Closes a session that will not come back (failed, or its client left)."""
        self._close(session, code, reason)

    def drop_account(self, account_id: str) -> None:
        for key in [k for k in self._idle if k[1] == account_id]:
            for entry in self._idle.pop(key):
                self._count -= 1
                self._close(entry.session, 1000, "account removed")

    def snapshot(self) -> list[tuple[PoolKey, int, float]]:
        """(key, idle sockets, idle for the longest, seconds) for `bridge.sessions`."""
        now = self._clock()
        return [
            (key, len(entries), max(now - e.since for e in entries))
            for key, entries in self._idle.items()
        ]

    def reap(self) -> None:
        now = self._clock()
        for key in list(self._idle):
            entries = self._idle[key]
            keep = [e for e in entries if e.session.is_open and now - e.since < self.idle_ttl_s]
            for entry in entries:
                if entry not in keep:
                    self._close(entry.session, 1000, "idle")
            self._count -= len(entries) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for entries in self._idle.values():
            for entry in entries:
                self._close(entry.session, 1001, "proxy shutting down")
        self._idle.clear()
        self._count = 0
        if self._closing:
            await asyncio.wait(self._closing, timeout=5)
        for task in list(self._closing):
            task.cancel()

    def _evict_oldest(self) -> None:
        key, entries = next(iter(self._idle.items()))
        entry = entries.pop(0)
        self._count -= 1
        if not entries:
            del self._idle[key]
        self._close(entry.session, 1000, "idle")

    def _close(self, session: UpstreamSession, code: int = 1000, reason: str = "") -> None:
        if not session.is_open:
            session.abort()  # already closing or closed: make sure the socket is gone
            return
        # Closing waits for the upstream's close frame; nobody should wait for it.
        task = asyncio.ensure_future(session.close(code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self) -> None:
        while self._idle:
            await asyncio.sleep(max(1.0, min(self.idle_ttl_s / 4, 30.0)))
            self.reap()
