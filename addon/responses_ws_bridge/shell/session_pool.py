"""Upstream sockets kept open between the turns of a session, for its next turn.

`SessionPool`: idle sessions kept for the next request of the same key and
account. One response in flight per socket: a session is checked out for a
turn and comes back only after a terminal event. Sessions idle longer than the
TTL are closed by a reaper; a session that died while idle is dropped at
checkout. The upstream ends a socket after 60 minutes (answering the next
`response.create` with `websocket_connection_limit_reached`), so an idle
socket older than `max_age_s` is retired instead of reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from websockets.frames import CloseCode

from responses_ws_bridge.core.affinity import SessionKey
from responses_ws_bridge.shell.upstream_client import (
    UpstreamSession,
)

logger = logging.getLogger(__name__)

DEFAULT_IDLE_TTL_S = 120.0
# Under the upstream's 60-minute socket limit, with room for a long turn.
DEFAULT_MAX_AGE_S = 3300.0


@dataclass
class _Idle:
    session: UpstreamSession
    since: float


class _SocketKeeper:
    """Sockets closed in the background, and a reaper."""

    def __init__(self) -> None:
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    def reap(self) -> None:
        raise NotImplementedError

    def _holds_any(self) -> bool:
        raise NotImplementedError

    def _reap_period_s(self) -> float:
        raise NotImplementedError

    def _close(
        self, session: UpstreamSession, code: int = CloseCode.NORMAL_CLOSURE, reason: str = ""
    ) -> None:
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
        while self._holds_any():
            await asyncio.sleep(max(1.0, min(self._reap_period_s(), 30.0)))
            self.reap()

    async def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    async def _finish_closing(self) -> None:
        if self._closing:
            await asyncio.wait(self._closing, timeout=5)
        for task in list(self._closing):
            task.cancel()


class SessionPool(_SocketKeeper):
    def __init__(
        self,
        *,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_idle: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_ttl_s = idle_ttl_s
        self.max_age_s = max_age_s
        self.max_idle = max_idle
        self._clock = clock
        self._idle: OrderedDict[SessionKey, list[_Idle]] = OrderedDict()
        self._count = 0
        super().__init__()

    @property
    def idle_count(self) -> int:
        return self._count

    def checkout(self, key: SessionKey) -> UpstreamSession | None:
        """An open idle session for the key, most recently used first."""
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()
            self._count -= 1
            if not entries:
                del self._idle[key]
            if self._keeps(entry, self._clock()):
                return entry.session
            self._close(entry.session)
            entries = self._idle.get(key)
        return None

    def checkin(self, key: SessionKey, session: UpstreamSession) -> None:
        if self.idle_ttl_s <= 0 or not session.is_open or self._too_old(session, self._clock()):
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

    def discard(
        self, session: UpstreamSession, *, code: int = CloseCode.NORMAL_CLOSURE, reason: str = ""
    ) -> None:
        """Closes a session that will not come back (failed, or its client left)."""
        self._close(session, code, reason)

    def drop_account(self, account_id: str) -> None:
        for key in [k for k in self._idle if k[1] == account_id]:
            for entry in self._idle.pop(key):
                self._count -= 1
                self._close(entry.session, CloseCode.NORMAL_CLOSURE, "account removed")

    def snapshot(self) -> list[tuple[SessionKey, int, float]]:
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
            keep = [e for e in entries if self._keeps(e, now)]
            for entry in entries:
                if entry not in keep:
                    self._close(entry.session, CloseCode.NORMAL_CLOSURE, "idle")
            self._count -= len(entries) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def close_all(self) -> None:
        await self._stop_reaper()
        for entries in self._idle.values():
            for entry in entries:
                self._close(entry.session, CloseCode.GOING_AWAY, "proxy shutting down")
        self._idle.clear()
        self._count = 0
        await self._finish_closing()

    def _holds_any(self) -> bool:
        return bool(self._idle)

    def _reap_period_s(self) -> float:
        return min(self.idle_ttl_s, self.max_age_s or self.idle_ttl_s) / 4

    def _keeps(self, entry: _Idle, now: float) -> bool:
        return (
            entry.session.is_open
            and now - entry.since < self.idle_ttl_s
            and not self._too_old(entry.session, now)
        )

    def _too_old(self, session: UpstreamSession, now: float) -> bool:
        return self.max_age_s > 0 and now - session.opened_at >= self.max_age_s

    def _evict_oldest(self) -> None:
        key, entries = next(iter(self._idle.items()))
        entry = entries.pop(0)
        self._count -= 1
        if not entries:
            del self._idle[key]
        self._close(entry.session, CloseCode.NORMAL_CLOSURE, "idle")
