"""Keeps the access tokens of ChatGPT accounts fresh, one refresh at a time per account.

Refresh tokens are single-use and rotate: a spent one sent again can revoke
the login. So each account refreshes under its own lock (concurrent requests
wait for the one refresh and use its result), and the rotated pair is written
to the token state file (atomically: a temporary file, fsync, `os.replace`,
mode 0600) before the new access token is used. At load, the state file's
pair wins over the accounts file's as long as the accounts file still holds
the refresh token that pair descends from (`token_refresh.tokens_to_use`).

The state file sits next to the accounts file: `accounts.json` keeps its
rotated tokens in `accounts.tokens.json`. The decisions are
`core.token_refresh`; this module only does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.token_refresh import (
    DEFAULT_MARGIN_S,
    DEFAULT_TOKEN_URL,
    Refreshed,
    RefreshOutcome,
    Refused,
    Tokens,
    fingerprint,
    jwt_expiry,
    needs_refresh,
    parse_refresh_response,
    refresh_request_body,
    stored_entry,
    tokens_to_use,
)

logger = logging.getLogger(__name__)

REFRESH_TIMEOUT_S = 30.0
# (url, body) -> (status or None when there was no answer, body)
Poster = Callable[[str, bytes], Awaitable[tuple[int | None, bytes]]]


class RefreshFailed(Exception):
    """No usable access token: `reason` is a code (never a secret); `permanent` disables."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(f"token refresh failed: {reason}")
        self.reason = reason
        self.permanent = permanent


def state_path_for(accounts_path: str | Path) -> Path:
    """Where an accounts file's rotated tokens are kept (`a.json` -> `a.tokens.json`)."""
    path = Path(accounts_path).expanduser()
    return path.with_name(f"{path.stem}.tokens.json")


async def post_json(url: str, body: bytes) -> tuple[int | None, bytes]:
    """POSTs JSON with the standard library (TLS verified), never through an environment proxy."""

    def post() -> tuple[int | None, bytes]:
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=REFRESH_TIMEOUT_S) as response:
                return int(response.status), bytes(response.read(1024 * 1024))
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read(1024 * 1024))
        except (OSError, ValueError):
            return None, b""

    return await asyncio.to_thread(post)


class TokenRefresher:
    def __init__(
        self,
        *,
        token_url: str = DEFAULT_TOKEN_URL,
        post: Poster = post_json,
        wall_clock: Callable[[], float] = time.time,
        margin_s: float = DEFAULT_MARGIN_S,
    ) -> None:
        self.token_url = token_url
        self._post = post
        self._wall_clock = wall_clock
        self.margin_s = margin_s
        self.state_path: Path | None = None
        self._live: dict[str, Tokens] = {}
        self._origin: dict[str, str] = {}
        self._refused: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.refreshes = 0

    # -- loading ----------------------------------------------------------------

    def load(self, config: AccountsConfig | None, state_path: Path | None) -> dict[str, str]:
        """Takes the accounts (and their state file); returns account id -> refusal on record."""
        self.state_path = state_path
        stored = self._read_state()
        live: dict[str, Tokens] = {}
        origin: dict[str, str] = {}
        refused: dict[str, str] = {}
        for account in config.accounts if config is not None else ():
            if account.refresh_token is None:
                continue
            file_tokens = Tokens(account.bearer, account.refresh_token)
            entry = stored.get(account.id)
            tag = fingerprint(account.refresh_token)
            origin[account.id] = tag
            if isinstance(entry, dict) and entry.get("origin") == tag and entry.get("refused"):
                refused[account.id] = str(entry["refused"])
            # A refresh in progress keeps its result: it is newer than anything on disk.
            current = self._live.get(account.id)
            if current is not None and self._origin.get(account.id) == tag:
                live[account.id] = current
            else:
                live[account.id] = tokens_to_use(file_tokens, entry)
        self._live, self._origin, self._refused = live, origin, refused
        return dict(refused)

    def secrets(self) -> list[str]:
        """Every live token, for redaction."""
        found: list[str] = []
        for tokens in self._live.values():
            found.extend(
                t for t in (tokens.access_token, tokens.refresh_token, tokens.id_token) if t
            )
        return found

    def expires_at(self, account_id: str) -> float | None:
        tokens = self._live.get(account_id)
        return jwt_expiry(tokens.access_token) if tokens is not None else None

    # -- serving ----------------------------------------------------------------

    async def access_token(self, account: Account) -> str:
        """The account's bearer, refreshed first when it is about to expire.

        Raises `RefreshFailed` when there is no usable token.
        """
        if not account.refreshable:
            return account.bearer
        tokens = self._tokens(account)
        if not self._due(tokens):
            return tokens.access_token
        async with self._lock(account.id):
            tokens = self._tokens(account)
            if not self._due(tokens):
                return tokens.access_token  # another request refreshed meanwhile
            try:
                return (await self._refresh(account, tokens)).access_token
            except RefreshFailed as exc:
                # Not expired yet (only inside the margin): the old token still serves.
                exp = jwt_expiry(tokens.access_token)
                if not exc.permanent and exp is not None and exp > self._wall_clock():
                    return tokens.access_token
                raise

    async def after_rejection(self, account: Account, used_tag: str) -> bool:
        """A handshake 401 with the token `used_tag` (its `fingerprint`) names.

        True when a different token is there to retry with: refreshed now, or
        by another request meanwhile.
        """
        if not account.refreshable:
            return False
        async with self._lock(account.id):
            tokens = self._tokens(account)
            if fingerprint(tokens.access_token) != used_tag:
                return True
            await self._refresh(account, tokens)
            return True

    # -- internals ----------------------------------------------------------------

    def _tokens(self, account: Account) -> Tokens:
        refused = self._refused.get(account.id)
        if refused is not None:
            raise RefreshFailed(refused, permanent=True)
        tokens = self._live.get(account.id)
        if tokens is None:
            assert account.refresh_token is not None
            tokens = self._live[account.id] = Tokens(account.bearer, account.refresh_token)
            self._origin[account.id] = fingerprint(account.refresh_token)
        return tokens

    def _due(self, tokens: Tokens) -> bool:
        return needs_refresh(
            tokens.access_token,
            has_refresh_token=True,
            wall_now=self._wall_clock(),
            margin_s=self.margin_s,
        )

    def _lock(self, account_id: str) -> asyncio.Lock:
        lock = self._locks.get(account_id)
        if lock is None:
            lock = self._locks[account_id] = asyncio.Lock()
        return lock

    async def _refresh(self, account: Account, tokens: Tokens) -> Tokens:
        body = refresh_request_body(tokens.refresh_token, account.client_id)
        self.refreshes += 1
        status, answer = await self._post(self.token_url, body)
        outcome: RefreshOutcome = parse_refresh_response(status, answer, old=tokens)
        origin = self._origin.get(account.id) or fingerprint(tokens.refresh_token)
        if isinstance(outcome, Refused):
            logger.warning(
                "bridge account %s: token refresh refused (%s%s)",
                account.id,
                outcome.reason,
                ", account disabled" if outcome.permanent else ", will try again",
            )
            if outcome.permanent:
                self._refused[account.id] = outcome.reason
                self._write_entry(account.id, {"origin": origin, "refused": outcome.reason})
            raise RefreshFailed(outcome.reason, permanent=outcome.permanent)
        assert isinstance(outcome, Refreshed)
        fresh = outcome.tokens
        # On disk before use: a restart must never send the refresh token just spent.
        self._write_entry(
            account.id, stored_entry(fresh, origin=origin, wall_now=self._wall_clock())
        )
        self._live[account.id] = fresh
        logger.info("bridge account %s: access token refreshed", account.id)
        return fresh

    def _read_state(self) -> dict[str, Any]:
        if self.state_path is None:
            return {}
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            # Never quote the file: it holds secrets.
            logger.error(
                "bridge: cannot read %s (%s); using the accounts file's tokens",
                self.state_path,
                type(exc).__name__,
            )
            return {}
        accounts = data.get("accounts") if isinstance(data, dict) else None
        return accounts if isinstance(accounts, dict) else {}

    def _write_entry(self, account_id: str, entry: dict[str, Any]) -> None:
        if self.state_path is None:
            return
        accounts = self._read_state()
        accounts[account_id] = entry
        write_private_json(self.state_path, {"version": 1, "accounts": accounts})


def write_private_json(path: Path, data: Any) -> None:
    """Replaces `path` atomically with `data`, readable by the owner only, synced to disk."""
    text = json.dumps(data, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
