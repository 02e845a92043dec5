"""Upstream sockets kept open ahead of need: idle sessions for reuse, and warm spares.

`SessionPool`: idle sessions kept for the next request of the same key and
account. One response in flight per socket: a session is checked out for a
turn and comes back only after a terminal event. Sessions idle longer than the
TTL are closed by a reaper; a session that died while idle is dropped at
checkout. The upstream ends a socket after 60 minutes (answering the next
`response.create` with `websocket_connection_limit_reached`), so an idle
socket older than `max_age_s` is retired instead of reused.

`WarmSpares`: per account, pre-opened sockets (handshake done) for a request
that finds no idle session, replaced as soon as one is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from websockets.frames import CloseCode

from responses_ws_bridge.core.affinity import SessionKey
from responses_ws_bridge.core.failures import AttemptFailed
from responses_ws_bridge.core.spare_headers import SpareHeaders, spare_headers
from responses_ws_bridge.shell.upstream_client import (
    SessionTap,
    UpstreamSession,
    UpstreamSettings,
    open_session,
)

logger = logging.getLogger(__name__)

DEFAULT_IDLE_TTL_S = 120.0
DEFAULT_WARM_SPARES = 1
# Under the upstream's 60-minute socket limit, with room for a long turn.
DEFAULT_MAX_AGE_S = 3300.0


@dataclass
class _Idle:
    session: UpstreamSession
    since: float


class _SocketKeeper:
    """What the idle pool and the spares share: sockets closed in the background, a reaper."""

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


# -- warm spares ---------------------------------------------------------------------

SpareKey = tuple[str | None, str, SpareHeaders]  # (account id, upstream URL, spare handshake)
Opener = Callable[..., Awaitable[UpstreamSession]]


@dataclass
class _Spare:
    session: UpstreamSession
    opened: float


@dataclass
class _SpareSlot:
    """The spares of one (account, URL, handshake), and how to open more."""

    settings: UpstreamSettings
    ready: list[_Spare]
    wanted: float  # when a request last opened a socket for this key
    opening: int = 0
    failed_at: float | None = None


class WarmSpares(_SocketKeeper):
    """Pre-opened upstream sockets, so a request with no idle session still finds one open.

    After a request for an account opens (or takes) a socket, `per_key` spares
    with the account-level handshake (`core.spare_headers`) are kept ready for
    the next request whose handshake matches; taking one opens its replacement
    at once, in the background. A key no request wanted for `idle_ttl_s` loses
    its spares (a quiet account holds no sockets); a spare older than
    `max_age_s` (upstreams limit a socket's life) is replaced, one found closed
    dropped; after a spare failed to open, its key gets none for `retry_after_s`.
    Spares are opened without a recording tap: the request that takes one
    gets its recording from there on (`UpstreamSession.adopt`).
    """

    def __init__(
        self,
        *,
        per_key: int = DEFAULT_WARM_SPARES,
        idle_ttl_s: float = 120.0,
        max_age_s: float = 900.0,
        retry_after_s: float = 30.0,
        max_keys: int = 64,
        opener: Opener = open_session,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = per_key
        self.idle_ttl_s = idle_ttl_s
        self.max_age_s = max_age_s
        self.retry_after_s = retry_after_s
        self.max_keys = max_keys
        self._open = opener
        self._clock = clock
        self._slots: OrderedDict[SpareKey, _SpareSlot] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        super().__init__()
        self.taken = 0
        self.opened = 0

    @property
    def ready_count(self) -> int:
        return sum(len(slot.ready) for slot in self._slots.values())

    async def open(
        self,
        url: str,
        headers: Sequence[tuple[str, str]],
        settings: UpstreamSettings,
        *,
        account: str | None,
        tap: SessionTap | None = None,
    ) -> tuple[UpstreamSession, bool]:
        """A session for a request that found no idle one; True when it is a warm spare.

        Raises what `open_session` raises when a new connection must be opened.
        """
        spare = spare_headers(headers)
        if self.per_key <= 0 or spare is None:
            return await self._open(url, headers, settings, tap=tap), False
        key: SpareKey = (account, url, spare)
        session = self.take(key)
        if session is not None:
            session.adopt(tap)
            self.taken += 1
            self._refill(key, settings)
            return session, True
        # Open the request's own socket first: the spare comes after, not in its way.
        session = await self._open(url, headers, settings, tap=tap)
        self._refill(key, settings)
        return session, False

    def take(self, key: SpareKey) -> UpstreamSession | None:
        """A usable spare for the key, newest first; stale ones are closed on the way."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        now = self._clock()
        while slot.ready:
            spare = slot.ready.pop()
            if spare.session.is_open and now - spare.opened < self.max_age_s:
                return spare.session
            self._close(spare.session, CloseCode.NORMAL_CLOSURE, "spare expired")
        return None

    def drop_account(self, account_id: str) -> None:
        for key in [k for k in self._slots if k[0] == account_id]:
            for spare in self._slots.pop(key).ready:
                self._close(spare.session, CloseCode.NORMAL_CLOSURE, "account removed")

    def reap(self) -> None:
        now = self._clock()
        for key in list(self._slots):
            slot = self._slots[key]
            wanted = now - slot.wanted < self.idle_ttl_s
            keep = [
                s
                for s in slot.ready
                if wanted and s.session.is_open and now - s.opened < self.max_age_s
            ]
            for spare in slot.ready:
                if spare not in keep:
                    self._close(
                        spare.session,
                        CloseCode.NORMAL_CLOSURE,
                        "idle" if not wanted else "spare expired",
                    )
            slot.ready = keep
            if wanted:
                self._top_up(key, slot)
            elif not slot.opening:
                del self._slots[key]

    async def close_all(self) -> None:
        await self._stop_reaper()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for slot in self._slots.values():
            for spare in slot.ready:
                self._close(spare.session, CloseCode.GOING_AWAY, "proxy shutting down")
        self._slots.clear()
        await self._finish_closing()

    def _holds_any(self) -> bool:
        return bool(self._slots)

    def _reap_period_s(self) -> float:
        return min(self.idle_ttl_s, self.max_age_s) / 4

    async def wait_idle(self) -> None:
        """Waits for the spares being opened (tests, the benchmark)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _refill(self, key: SpareKey, settings: UpstreamSettings) -> None:
        now = self._clock()
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _SpareSlot(settings, [], now)
            while len(self._slots) > self.max_keys:
                _, evicted = self._slots.popitem(last=False)
                for spare in evicted.ready:
                    self._close(spare.session, CloseCode.NORMAL_CLOSURE, "idle")
        slot.settings, slot.wanted = settings, now
        self._slots.move_to_end(key)
        self._top_up(key, slot)

    def _top_up(self, key: SpareKey, slot: _SpareSlot) -> None:
        if slot.failed_at is not None and self._clock() - slot.failed_at < self.retry_after_s:
            return
        for _ in range(self.per_key - len(slot.ready) - slot.opening):
            slot.opening += 1
            task = asyncio.ensure_future(self._open_spare(key, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_spare(self, key: SpareKey, slot: _SpareSlot) -> None:
        account, url, headers = key
        try:
            session = await self._open(url, list(headers), slot.settings, tap=None)
        except AttemptFailed as exc:
            # Speculative: the next request finds out for itself, and counts it.
            slot.failed_at = self._clock()
            logger.info("warm spare for %s at %s not opened: %s", account or "(client)", url, exc)
            return
        finally:
            slot.opening -= 1
        self.opened += 1
        if self._slots.get(key) is not slot or len(slot.ready) >= self.per_key:
            self._close(session, CloseCode.NORMAL_CLOSURE, "spare not needed")
            return
        slot.failed_at = None
        slot.ready.append(_Spare(session, self._clock()))
        self._ensure_reaper()
