"""Calls to the state store that cannot hang or raise: a typed `StateUnavailable` instead.

Each call gets a short timeout. A failure (timeout, connection refused or
lost, any error from the client library) opens an outage in `store_health`;
until the backoff says to probe again, calls return `StateUnavailable` at
once. The log hears of an outage once when it starts and once when it ends,
never per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from responses_ws_bridge.state import store_health
from responses_ws_bridge.state.store import StateStore
from responses_ws_bridge.state.store_health import Backoff, Log, StoreHealth

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class StateUnavailable:
    """The store could not answer; `reason` says why (no secret, no key)."""

    operation: str
    reason: str


class GuardedStore:
    def __init__(
        self,
        store: StateStore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        on_error: Callable[[str, str], None] | None = None,
        label: str = "state store",
        errors: tuple[type[Exception], ...] = (OSError,),
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.backoff = backoff or Backoff()
        self.health: StoreHealth = store_health.CONNECTED
        self._clock = clock
        self._jitter = jitter
        # (operation, error kind) for each failed call, e.g. for a metrics counter.
        self._on_error = on_error
        self._label = label
        # What counts as the store failing (the client library's errors); anything
        # else is a bug and propagates.
        self._errors = errors
        self._close_errors: tuple[type[Exception], ...] = (*errors, TimeoutError)
        # Set once this process closes the store: a call that fails then failed because
        # of that close, which says nothing about the server (no count, no log line).
        self._closing = False

    @property
    def available(self) -> bool:
        return isinstance(self.health, store_health.Connected)

    async def run[T](
        self, operation: str, call: Callable[[StateStore], Awaitable[T]]
    ) -> T | StateUnavailable:
        """`call(store)` within the timeout, or why not."""
        if not store_health.may_try(self.health, self._clock()):
            assert isinstance(self.health, store_health.Failing)
            return StateUnavailable(operation, self.health.reason)
        return await self._call(operation, call, count_failure=True)

    async def probe[T](
        self, operation: str, call: Callable[[StateStore], Awaitable[T]]
    ) -> T | StateUnavailable:
        """`run` past the backoff, for one watcher that looks often: its success ends an
        outage for every request at once, its failure changes nothing (requests keep their
        own backoff, and no error is counted twice a second)."""
        return await self._call(operation, call, count_failure=False)

    async def _call[T](
        self, operation: str, call: Callable[[StateStore], Awaitable[T]], *, count_failure: bool
    ) -> T | StateUnavailable:
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await call(self.store)
        except TimeoutError:
            reason = f"no answer within {self.timeout_s:g}s"
            if not count_failure or self._closing:
                return StateUnavailable(operation, reason)
            return self._failed(operation, "timeout", reason)
        except self._errors as exc:
            if not count_failure or self._closing:
                return StateUnavailable(operation, _describe(exc))
            return self._failed(operation, type(exc).__name__, _describe(exc))
        self.health, log = store_health.on_success(self.health)
        if log is Log.BACK:
            logger.warning("%s is reachable again", self._label)
        return result

    def _failed(self, operation: str, kind: str, reason: str) -> StateUnavailable:
        if self._on_error is not None:
            self._on_error(operation, kind)
        self.health, log = store_health.on_failure(
            self.health,
            now=self._clock(),
            reason=reason,
            backoff=self.backoff,
            jitter=self._jitter(),
        )
        if log is Log.UNAVAILABLE:
            logger.error(
                "%s unavailable (%s); requests without affinity use local state, "
                "hard-affinity requests only owners this instance knows",
                self._label,
                reason,
            )
        return StateUnavailable(operation, reason)

    async def close(self) -> None:
        self._closing = True
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.store.close()
        # A dead connection may fail to close; nothing is left to do then.
        except self._close_errors as exc:
            logger.debug("%s close: %s", self._label, _describe(exc))


def _describe(exc: BaseException) -> str:
    # Client errors carry host:port and the server's message, never the URL's password.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
