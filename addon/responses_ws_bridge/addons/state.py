"""The mitmproxy addon that owns the bridge's state store: `bridge_state`, `bridge_state_namespace`.

Empty `bridge_state`: in-memory state, as one instance always had. A URL:
the shared Redis/Valkey store (the `redis` extra), one client pool for the
process, closed in `done`. Either way `store` is a `GuardedStore`, so callers
get `StateUnavailable` instead of an exception or a hang; `shared_store()` is
it only when it is shared, which is when the bridge consults it. Binding TTLs
and bounds follow the accounts addon's `bridge_binding_max` / `bridge_binding_ttl`.

`bridge_state_secret` names the file whose secret seals the token chains of
refresh-token accounts in the shared store (`state.sealing`): every instance
reads the same one, and a shared store with such accounts and no secret is a
start-up error, since no instance could then refresh without risking a second
refresh of one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons.option_values import positive, seconds
from responses_ws_bridge.core.accounts import AccountsConfig
from responses_ws_bridge.shell.store_watch import StoreWatch
from responses_ws_bridge.state.config import StateConfig, parse_state_config
from responses_ws_bridge.state.guarded import GuardedStore
from responses_ws_bridge.state.memory import MemoryStateStore
from responses_ws_bridge.state.sealing import SecretFileError, TokenSeal, read_secret_file
from responses_ws_bridge.state.store import BindingLimits, StateStore

logger = logging.getLogger(__name__)

BINDING_OPTIONS = frozenset({"bridge_binding_max", "bridge_binding_ttl"})
STATE_OPTIONS = frozenset({"bridge_state", "bridge_state_namespace", "bridge_state_secret"})


class BridgeStateAddon:
    def __init__(
        self,
        on_error: Callable[[str, str], None] | None = None,
        *,
        accounts: Callable[[], AccountsConfig | None] = lambda: None,
    ) -> None:
        self.config = parse_state_config("")
        self.limits = BindingLimits()
        self._on_error = on_error
        # The accounts in force, to tell whether refresh-token accounts need the secret.
        self._accounts = accounts
        self._seal: TokenSeal | None = None
        self.store = self._open(self.config, self.limits)
        self._closing: set[asyncio.Future[None]] = set()
        # What re-offers this instance's owners and token chains to a store that lost them.
        self.on_lost: Callable[[], Awaitable[None]] = _nothing
        # What goes out whenever the store answers (writes that found it out of reach).
        self.on_tick: Callable[[], Awaitable[None]] = _nothing
        self.watch = StoreWatch(
            self.shared_store, lambda: self.on_lost(), on_tick=lambda: self.on_tick()
        )

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
        loader.add_option(
            "bridge_state_secret",
            str,
            "",
            "File holding the secret (16+ random bytes, mode 600) that seals the rotated tokens "
            "of refresh_token accounts in the shared store; the same file on every instance. "
            "Needed with bridge_state and refresh_token accounts.",
        )

    def configure(self, updated: set[str]) -> None:
        config, limits = self.config, self.limits
        if STATE_OPTIONS & updated:
            try:
                config = parse_state_config(
                    ctx.options.bridge_state, ctx.options.bridge_state_namespace
                )
            except ValueError as exc:
                raise exceptions.OptionsError(f"bridge_state: {exc}") from exc
            seal = self._read_seal(ctx.options.bridge_state_secret, config)
            check_secret(self._accounts(), config, seal)
            self._seal = seal
        if BINDING_OPTIONS & updated and all(hasattr(ctx.options, o) for o in BINDING_OPTIONS):
            ttl = seconds(ctx.options, "bridge_binding_ttl") or float("inf")
            limits = BindingLimits(ttl, ttl, ttl, positive(ctx.options, "bridge_binding_max"))
        if (config, limits) != (self.config, self.limits):
            self._replace(config, limits)

    def shared_store(self) -> GuardedStore | None:
        """The store when it is shared with other instances; None in in-memory mode."""
        return self.store if self.config.shared else None

    def seal(self) -> TokenSeal | None:
        """What seals token chains in the shared store; None without one (or a secret)."""
        return self._seal if self.config.shared else None

    @staticmethod
    def _read_seal(path: str, config: StateConfig) -> TokenSeal | None:
        if not path:
            return None
        try:
            return TokenSeal(read_secret_file(path), config.namespace)
        except SecretFileError as exc:
            raise exceptions.OptionsError(f"bridge_state_secret: {exc}") from exc

    def require_secret(self, accounts: AccountsConfig | None) -> None:
        """OptionsError when these accounts would share the store without a secret."""
        check_secret(accounts, self.config, self._seal)

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

    async def running(self) -> None:
        self.watch.start()

    async def done(self) -> None:
        await self.watch.stop()
        await self.store.close()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task


def check_secret(
    accounts: AccountsConfig | None, config: StateConfig, seal: TokenSeal | None
) -> None:
    """OptionsError when refresh-token accounts would share a store without a secret."""
    refreshing = accounts is not None and any(a.refreshable for a in accounts.accounts)
    if config.shared and refreshing and seal is None:
        raise exceptions.OptionsError(
            "bridge_state_secret: accounts with a refresh_token on a shared state store need "
            "a secret file (the same on every instance) to seal their rotated tokens in the "
            "store, e.g. `openssl rand -base64 32 > state.secret; chmod 600 state.secret`"
        )


async def _nothing() -> None:
    return None
