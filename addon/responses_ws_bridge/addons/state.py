"""The mitmproxy addon that owns the bridge's state store: `bridge_state`, `bridge_state_namespace`.

Empty `bridge_state`: in-memory state, as one instance always had. A URL:
the shared Redis/Valkey store (the `redis` extra), one client pool for the
process, closed in `done`. Either way `store` is a `GuardedStore`, so callers
get `StateUnavailable` instead of an exception or a hang; `shared_store()` is
it only when it is shared, which is when the bridge consults it. Binding TTLs
and bounds follow the accounts addon's `bridge_binding_max` / `bridge_binding_ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons.option_values import one_line_at_startup, positive, seconds
from responses_ws_bridge.state.config import StateConfig, parse_state_config
from responses_ws_bridge.state.guarded import GuardedStore
from responses_ws_bridge.state.memory import MemoryStateStore
from responses_ws_bridge.state.store import BindingLimits, StateStore

logger = logging.getLogger(__name__)

BINDING_OPTIONS = frozenset({"bridge_binding_max", "bridge_binding_ttl"})


class BridgeStateAddon:
    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        self.config = parse_state_config("")
        self.limits = BindingLimits()
        self._on_error = on_error
        self.store = self._open(self.config, self.limits)
        self._closing: set[asyncio.Future[None]] = set()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_state",
            str,
            "",
            "Shared state for several bridge instances: redis://, rediss:// or unix:// URL of "
            "a Redis/Valkey server (needs the 'redis' extra). Empty: in-memory state.",
        )
        loader.add_option(
            "bridge_state_namespace",
            str,
            "",
            "Key prefix in the shared store, so pools can share a server. Empty: the URL "
            "path's name (redis://host/0/NAME), else 'bridge'.",
        )

    @one_line_at_startup
    def configure(self, updated: set[str]) -> None:
        config, limits = self.config, self.limits
        if {"bridge_state", "bridge_state_namespace"} & updated:
            try:
                config = parse_state_config(
                    ctx.options.bridge_state, ctx.options.bridge_state_namespace
                )
            except ValueError as exc:
                raise exceptions.OptionsError(f"bridge_state: {exc}") from exc
        if BINDING_OPTIONS & updated and all(hasattr(ctx.options, o) for o in BINDING_OPTIONS):
            ttl = seconds(ctx.options, "bridge_binding_ttl") or float("inf")
            limits = BindingLimits(ttl, ttl, ttl, positive(ctx.options, "bridge_binding_max"))
        if (config, limits) != (self.config, self.limits):
            self._replace(config, limits)

    def shared_store(self) -> GuardedStore | None:
        """The store when it is shared with other instances; None in in-memory mode."""
        return self.store if self.config.shared else None

    def set_limits(self, limits: BindingLimits) -> None:
        """The binding TTLs and bound (the bridge's `bridge_binding_*` options)."""
        if limits != self.limits:
            self._replace(self.config, limits)

    def _replace(self, config: StateConfig, limits: BindingLimits) -> None:
        store = self._open(config, limits)
        old, self.store, self.config, self.limits = self.store, store, config, limits
        logger.info("bridge state: %s (namespace %s)", config.display_url(), config.namespace)
        self._close_later(old)

    def _open(self, config: StateConfig, limits: BindingLimits) -> GuardedStore:
        if config.url is None:
            return GuardedStore(MemoryStateStore(limits), on_error=self._on_error)
        try:
            from responses_ws_bridge.state import redis_store
        except ImportError as exc:
            raise exceptions.OptionsError(
                "bridge_state: the redis client is not installed (pip install '.[redis]')"
            ) from exc
        shared: StateStore = redis_store.RedisStateStore(
            redis_store.connect(config.url), config.namespace, limits
        )
        return GuardedStore(
            shared,
            on_error=self._on_error,
            errors=redis_store.CLIENT_ERRORS,
            label=f"state store {config.display_url()}",
        )

    def _close_later(self, old: GuardedStore) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # before the event loop: nothing was connected yet
        task = loop.create_task(old.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def done(self) -> None:
        await self.store.close()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task
