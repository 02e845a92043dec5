"""Connections to the upstream hosts made ahead of need: TCP and TLS, never a handshake.

A WebSocket handshake carries its request's own headers (the session, the
credential, the request id), so none of it can be sent before that request
exists: a socket opened ahead would show the upstream a session that is not
the one it serves. What can be made ahead is what carries no request: the
TCP connection and the TLS session under it. `Preconnector.open` sends a
request's own upgrade on one of those when there is one ready for the host
(saving the TCP and TLS round trips), else opens a connection as usual; then
it keeps `per_host` ready for the next request to that host, in the
background.

Keys are hosts (scheme, host, port), whatever the client sends, so their
number is the number of upstream hosts in use (at most `max_hosts`). A host
no request wanted for `idle_ttl_s` keeps no connections; one older than
`max_age_s`, or that the upstream closed (servers drop connections that stay
silent), is dropped; after one failed to open, the host gets none for
`retry_after_s`. In pass-through mode this opens TCP and TLS only, to hosts
the client's own requests went to: the client's credential goes only on the
upgrades its requests send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from responses_ws_bridge.shell.upstream_client import (
    Preconnected,
    SessionTap,
    UpstreamSession,
    UpstreamSettings,
    open_session,
    preconnect,
)

logger = logging.getLogger(__name__)

DEFAULT_PRECONNECT = 1

HostKey = tuple[str, str, int]  # scheme, host, port
Opener = Callable[..., Awaitable[UpstreamSession]]
Connector = Callable[[str, UpstreamSettings], Awaitable[Preconnected]]


def host_key(url: str) -> HostKey:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "wss" else 80)
    return scheme, (parts.hostname or "").lower(), port


@dataclass
class _Host:
    url: str  # one URL on the host: where the next connections go
    settings: UpstreamSettings
    wanted: float  # when a request last opened a connection here
    ready: list[Preconnected] = field(default_factory=list)
    opening: int = 0
    failed_at: float | None = None


class Preconnector:
    def __init__(
        self,
        *,
        per_host: int = DEFAULT_PRECONNECT,
        idle_ttl_s: float = 120.0,
        max_age_s: float = 60.0,
        retry_after_s: float = 30.0,
        max_hosts: int = 64,
        opener: Opener = open_session,
        connector: Connector = preconnect,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_host = per_host
        self.idle_ttl_s = idle_ttl_s
        self.max_age_s = max_age_s
        self.retry_after_s = retry_after_s
        self.max_hosts = max_hosts
        self._open = opener
        self._connect = connector
        self._clock = clock
        self._hosts: OrderedDict[HostKey, _Host] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        # What was made ahead, and how much of it a request used.
        self.made = 0
        self.taken = 0

    @property
    def ready_count(self) -> int:
        return sum(len(host.ready) for host in self._hosts.values())

    async def open(
        self,
        url: str,
        headers: Sequence[tuple[str, str]],
        settings: UpstreamSettings,
        *,
        tap: SessionTap | None = None,
    ) -> tuple[UpstreamSession, bool]:
        """A session with the request's own handshake; True when it went out on a
        connection made ahead. Raises what `open_session` raises."""
        if self.per_host <= 0:
            return await self._open(url, headers, settings, tap=tap), False
        key = host_key(url)
        made = self._take(key)
        try:
            transport = made.take() if made is not None else None
            session = await self._open(url, headers, settings, tap=tap, transport=transport)
        finally:
            # The request's own connection first: the next one comes after, not in its way.
            self._want(key, url, settings)
        if made is not None:
            self.taken += 1
        return session, made is not None

    def _take(self, key: HostKey) -> Preconnected | None:
        host = self._hosts.get(key)
        if host is None:
            return None
        now = self._clock()
        while host.ready:
            made = host.ready.pop()
            if self._fresh(made, now):
                return made
            made.close()
        return None

    def _fresh(self, made: Preconnected, now: float) -> bool:
        return made.usable and now - made.made_at < self.max_age_s

    def _want(self, key: HostKey, url: str, settings: UpstreamSettings) -> None:
        now = self._clock()
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(url, settings, now)
            while len(self._hosts) > self.max_hosts:
                _, evicted = self._hosts.popitem(last=False)
                _close_all(evicted.ready)
        host.url, host.settings, host.wanted = url, settings, now
        self._hosts.move_to_end(key)
        self._top_up(host)

    def _top_up(self, host: _Host) -> None:
        if host.failed_at is not None and self._clock() - host.failed_at < self.retry_after_s:
            return
        for _ in range(self.per_host - len(host.ready) - host.opening):
            host.opening += 1
            task = asyncio.ensure_future(self._make(host))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _make(self, host: _Host) -> None:
        try:
            made = await self._connect(host.url, host.settings)
        except (OSError, TimeoutError) as exc:
            # Speculative: the next request finds out for itself, and counts it.
            host.failed_at = self._clock()
            logger.info("no connection made ahead to %s: %s", host.url, exc or type(exc).__name__)
            return
        finally:
            host.opening -= 1
        self.made += 1
        if host not in self._hosts.values() or len(host.ready) >= self.per_host:
            made.close()
            return
        host.failed_at = None
        made.made_at = self._clock()
        host.ready.append(made)
        self._ensure_reaper()

    def reap(self) -> None:
        """Drops what the upstream closed or what aged; hosts nobody wants keep nothing."""
        now = self._clock()
        for key in list(self._hosts):
            host = self._hosts[key]
            wanted = now - host.wanted < self.idle_ttl_s
            keep = [m for m in host.ready if wanted and self._fresh(m, now)]
            _close_all([m for m in host.ready if m not in keep])
            host.ready = keep
            if wanted:
                self._top_up(host)
            elif not host.opening:
                del self._hosts[key]

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self) -> None:
        while self._hosts:
            await asyncio.sleep(max(1.0, min(self.idle_ttl_s, self.max_age_s) / 4))
            self.reap()

    async def wait_idle(self) -> None:
        """Waits for the connections being made (tests, the benchmark)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for host in self._hosts.values():
            _close_all(host.ready)
        self._hosts.clear()


def _close_all(made: list[Preconnected]) -> None:
    for connection in made:
        connection.close()
