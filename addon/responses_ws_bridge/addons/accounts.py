"""The accounts file and the affinity bindings: options, live reload, `bridge.accounts`.

ChatGPT accounts with a `refresh_token` keep their rotated tokens in a state
file beside the accounts file (`shell.token_refresher`), read at every load;
with a shared state store, every load is also levelled with the store's chains
(a new login in the file is published to every instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from mitmproxy import command, ctx, exceptions
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons.option_values import positive, seconds, table
from responses_ws_bridge.core.accounts import AccountsConfig, AccountsFileError
from responses_ws_bridge.core.pool_state import (
    DEFAULT_BINDING_MAX,
    DEFAULT_BINDING_TTL_S,
    PoolState,
)
from responses_ws_bridge.core.token_refresh import DEFAULT_TOKEN_URL
from responses_ws_bridge.shell.accounts_file import AccountsFile
from responses_ws_bridge.shell.bridge_service import BridgeService
from responses_ws_bridge.shell.shared_state import bound_sessions
from responses_ws_bridge.shell.token_refresher import DEFAULT_DEADLINE_S, state_path_for

logger = logging.getLogger(__name__)

POLL_S = 1.0


class Accounts:
    def __init__(
        self,
        state: PoolState,
        service: BridgeService,
        *,
        require_secret: Callable[[AccountsConfig | None], None] = lambda _: None,
    ) -> None:
        self.state = state
        self.service = service
        # Raises OptionsError when these accounts cannot share the state store as configured.
        self._require_secret = require_secret
        self._file: AccountsFile | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._syncing: set[asyncio.Task[None]] = set()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_accounts",
            str,
            "",
            "JSON file of upstream accounts (and client keys). Empty: pass-through mode, "
            "the client's own Authorization goes upstream. Edits are picked up live.",
        )
        loader.add_option(
            "bridge_binding_max",
            int,
            DEFAULT_BINDING_MAX,
            "Most affinity bindings (key → account) and response owners kept in memory.",
        )
        loader.add_option(
            "bridge_binding_ttl",
            str,
            f"{DEFAULT_BINDING_TTL_S:g}",
            "Seconds an unused affinity binding or response owner is kept.",
        )
        loader.add_option(
            "bridge_oauth_token_url",
            str,
            DEFAULT_TOKEN_URL,
            "OAuth token endpoint that refreshes the access tokens of accounts with a "
            "refresh_token (ChatGPT logins).",
        )
        loader.add_option(
            "bridge_oauth_timeout",
            str,
            f"{DEFAULT_DEADLINE_S:g}",
            "Seconds a token refresh may take in all (connect, send, answer); a refresh that "
            "fails backs off before the next one.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "bridge_oauth_token_url" in updated:
            url = opts.bridge_oauth_token_url
            if not url.startswith(("https://", "http://")):
                raise exceptions.OptionsError("bridge_oauth_token_url must be an http(s) URL")
            self.service.tokens.token_url = url
        if "bridge_oauth_timeout" in updated:
            deadline = seconds(opts, "bridge_oauth_timeout")
            if deadline <= 0:
                raise exceptions.OptionsError("bridge_oauth_timeout must be more than 0 seconds")
            self.service.tokens.deadline_s = deadline
        if updated & {"bridge_binding_max", "bridge_binding_ttl"}:
            self.state.set_binding_limits(
                positive(opts, "bridge_binding_max"),
                seconds(opts, "bridge_binding_ttl") or float("inf"),
            )
        if "bridge_accounts" in updated:
            self._open(opts.bridge_accounts)

    def _open(self, path: str) -> None:
        if not path:
            self._file = None
            self._apply(None)
            return
        accounts = AccountsFile(path)
        try:
            config = accounts.load()
        except AccountsFileError as exc:
            # mitmproxy keeps the previous value (and so the previous pool) in force.
            raise exceptions.OptionsError(f"bridge_accounts: {exc}") from exc
        self._require_secret(config)
        self._file = accounts
        self._apply(config)
        logger.info(
            "bridge accounts: %s (%s)",
            ", ".join(a.id for a in config.accounts),
            "client keys required" if config.client_keys else "no client keys",
        )

    def _apply(self, config: AccountsConfig | None) -> None:
        reload = self.state.pool is not None and config is not None
        removed = self.state.set_accounts(config)
        self.service.accounts_removed(removed)
        if self.service.shared is not None:
            kept = self.state.pool.ids if self.state.pool is not None else []
            self.service.shared.accounts_changed(kept, removed, reload=reload)
        state_path = state_path_for(self._file.path) if self._file is not None else None
        refused = self.service.tokens.load(config, state_path)
        pool = self.state.pool
        for account_id, reason in refused.items():
            # The login was refused for good before: its spent token is never sent again.
            if pool is not None:
                pool.disable(account_id, f"token refresh refused: {reason}")
        self._sync_tokens()

    def _sync_tokens(self) -> None:
        """Level the loaded chains with the shared store's, in the background."""
        try:
            task = asyncio.get_running_loop().create_task(self.service.tokens.sync_all())
        except RuntimeError:
            return  # before the event loop: the first request levels them
        self._syncing.add(task)
        task.add_done_callback(self._syncing.discard)

    async def running(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())
        self._sync_tokens()

    async def done(self) -> None:
        for task in list(self._syncing):
            task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        """Reloads the accounts file when it changes on disk, like mitmproxy's script reload."""
        while True:
            await asyncio.sleep(POLL_S)
            accounts = self._file
            if accounts is None or not accounts.changed():
                continue
            try:
                config = accounts.load()
                self._require_secret(config)
            except (AccountsFileError, exceptions.OptionsError) as exc:
                accounts.mark_seen()
                logger.error("bridge_accounts: %s; the previous accounts stay in force", exc)
                continue
            self._apply(config)
            logger.info("bridge accounts reloaded: %s", ", ".join(a.id for a in config.accounts))

    @command.command("bridge.accounts")
    def accounts_command(self) -> str:
        """Upstream accounts: health, requests in flight, sessions bound (every instance's
        with a shared store), cooldown, served, rate limits."""
        pool = self.state.pool
        if pool is None:
            return "pass-through mode: no accounts file (bridge_accounts is empty)"
        sessions = bound_sessions(self.state, self.service.shared)
        rows = [
            (
                "account",
                "health",
                "in flight",
                "sessions",
                "cooldown until",
                "served",
                "rate limits",
            )
        ]
        for row in pool.snapshot():
            until = (
                time.strftime("%H:%M:%S", time.localtime(time.time() + row.cooldown_remaining_s))
                if row.cooldown_remaining_s
                else "-"
            )
            rows.append(
                (
                    row.id,
                    row.health,
                    str(row.in_flight),
                    str(sessions.get(row.id, 0)),
                    until,
                    str(row.served),
                    row.rate_limits,
                )
            )
        return table(rows)
