"""Keeps the access tokens of ChatGPT accounts fresh: one refresh per account, across instances.

Refresh tokens are single-use and rotate: a spent one sent again can revoke
the login. So an account refreshes under its own lock, and requests that need
its token meanwhile wait for that refresh's result.

- One instance (no `bridge_state`, or no refresh-token accounts shared): the
  lock is this process's, and the rotated chain lives in memory and in the
  token state file beside the accounts file (`accounts.json` →
  `accounts.tokens.json`, written atomically, mode 0600, before the new
  token is used).
- Several instances on one store (`shell.shared_tokens`): the lock is the
  store's (set-if-absent with a lease, and a fencing number), the chain lives
  in the store sealed with `bridge_state_secret`, and every instance uses
  the store's newest generation. The state file stays each machine's durable
  copy. With the store unreachable, nothing refreshes (a refresh without the
  lock could be a second one): a request that needs a new token gets
  `state_store_unavailable`, one whose token still serves is served.

Which chain wins, when to refresh, and how long to back off are
`core.token_chain`; the token endpoint's answers are `core.token_refresh`.
A refresh has one total deadline (`shell.oauth_client`); a failed one backs
off per account, so an endpoint that is down or answers garbage costs one
refresh per backoff window, never one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.failures import STATE_STORE_UNAVAILABLE
from responses_ws_bridge.core.token_chain import (
    Adopt,
    Chain,
    FailFast,
    KeepWaiting,
    Publish,
    RefreshNow,
    TakeOver,
    UseChain,
    UseToken,
    chain_from_json,
    chain_to_json,
    choose_chain,
    fresh_enough,
    refresh_backoff,
    refresh_step,
    wait_step,
)
from responses_ws_bridge.core.token_refresh import (
    DEFAULT_MARGIN_S,
    DEFAULT_TOKEN_URL,
    Refreshed,
    RefreshOutcome,
    Refused,
    Tokens,
    jwt_expiry,
    needs_refresh,
    parse_refresh_response,
    refresh_request_body,
)
from responses_ws_bridge.shell import oauth_client
from responses_ws_bridge.shell.shared_tokens import SharedTokens, SharedView, Unreadable
from responses_ws_bridge.state.guarded import StateUnavailable

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = oauth_client.DEFAULT_DEADLINE_S
# How often an instance looks at the store's chain while its own token is fine: a new
# login or a refusal another instance recorded reaches it within this.
SYNC_S = 2.0
POLL_S = 0.05
STATE_SECRET_MISMATCH = "state_secret_mismatch"
TOKEN_REFRESH_CONTENDED = "token_refresh_contended"
# (url, body) -> (status or None when there was no answer, body)
Poster = Callable[[str, bytes], Awaitable[tuple[int | None, bytes]]]


class RefreshFailed(Exception):
    """No usable access token: `reason` is a code (never a secret); `permanent` disables."""

    def __init__(self, reason: str, *, permanent: bool, retry_after_s: float | None = None) -> None:
        super().__init__(f"token refresh failed: {reason}")
        self.reason = reason
        self.permanent = permanent
        self.retry_after_s = retry_after_s


class _Again(Exception):
    """The store moved on under a write: read it again."""


@dataclass
class _Backoff:
    retry_at: float
    failures: int
    reason: str


def state_path_for(accounts_path: str | Path) -> Path:
    """Where an accounts file's rotated tokens are kept (`a.json` -> `a.tokens.json`)."""
    path = Path(accounts_path).expanduser()
    return path.with_name(f"{path.stem}.tokens.json")


async def post_json(url: str, body: bytes) -> tuple[int | None, bytes]:
    return await oauth_client.post_json(url, body)


class TokenRefresher:
    def __init__(
        self,
        *,
        token_url: str = DEFAULT_TOKEN_URL,
        post: Poster = post_json,
        wall_clock: Callable[[], float] = time.time,
        margin_s: float = DEFAULT_MARGIN_S,
        deadline_s: float = DEFAULT_DEADLINE_S,
        jitter: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        shared: SharedTokens | None = None,
    ) -> None:
        self.token_url = token_url
        self._post = post
        self._wall_clock = wall_clock
        self.margin_s = margin_s
        self.deadline_s = deadline_s
        self._jitter = jitter
        self._sleep = sleep
        self.shared = shared
        self.state_path: Path | None = None
        self._files: dict[str, Tokens] = {}
        self._chains: dict[str, Chain] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._synced_at: dict[str, float] = {}
        self._store_down_said: set[str] = set()
        self._unreadable_said: set[str] = set()
        # Accounts refreshed while the store was out of reach: published as soon as it is back.
        self._unpublished: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self.refreshes = 0

    @property
    def lease_s(self) -> float:
        """The store lock's lease: longer than a refresh may take, deadline included."""
        return self.deadline_s * 1.5 + 1.0

    def _sharing(self) -> SharedTokens | None:
        shared = self.shared
        return shared if shared is not None and shared.active else None

    # -- loading ----------------------------------------------------------------

    def load(self, config: AccountsConfig | None, state_path: Path | None) -> dict[str, str]:
        """Takes the accounts (and their state file); returns account id -> refusal on record."""
        self.state_path = state_path
        stored = self._read_state()
        files: dict[str, Tokens] = {}
        chains: dict[str, Chain] = {}
        for account in config.accounts if config is not None else ():
            if account.refresh_token is None:
                continue
            file_tokens = files[account.id] = Tokens(account.bearer, account.refresh_token)
            local = chain_from_json(stored.get(account.id), file_tokens)
            current = self._chains.get(account.id)
            if current is not None and (local is None or current.generation >= local.generation):
                # What this process holds (a refresh since the disk was read, or a chain
                # adopted from the store) is at least as new as the disk.
                local = current
            choice = choose_chain(file_tokens, local, None)
            chains[account.id] = choice.chain
        self._files, self._chains = files, chains
        self._synced_at = {}
        return {a: c.refused for a, c in chains.items() if c.refused is not None}

    def secrets(self) -> list[str]:
        """Every live token, for redaction."""
        found: list[str] = []
        for chain in self._chains.values():
            tokens = chain.tokens
            found.extend(
                t for t in (tokens.access_token, tokens.refresh_token, tokens.id_token) if t
            )
        return found

    def expires_at(self, account_id: str) -> float | None:
        chain = self._chains.get(account_id)
        return jwt_expiry(chain.tokens.access_token) if chain is not None else None

    def refreshable_ids(self) -> list[str]:
        return list(self._files)

    # -- serving ----------------------------------------------------------------

    async def access_token(self, account: Account) -> str:
        """The account's bearer, refreshed first when it is about to expire.

        Raises `RefreshFailed` when there is no usable token.
        """
        if not account.refreshable:
            return account.bearer
        chain = self._chain(account)
        if chain.refused is None and not self._due(chain.tokens) and not self._stale(account.id):
            return chain.tokens.access_token
        async with self._lock(account.id):
            return (await self._obtain(account, rejected_tag=None)).access_token

    async def after_rejection(self, account: Account, used_tag: str) -> bool:
        """A handshake 401 with the token `used_tag` (its `fingerprint`) names.

        True when a different token is there to retry with: refreshed now, or
        by another request (or instance) meanwhile.
        """
        if not account.refreshable:
            return False
        async with self._lock(account.id):
            await self._obtain(account, rejected_tag=used_tag)
            return self._chain(account).tag != used_tag

    async def sync_all(self) -> None:
        """Bring every refresh-token account level with the store (after a load, or a store
        that lost its data): a new login in the file is published, a newer chain adopted."""
        shared = self._sharing()
        if shared is None:
            return
        for account_id in list(self._files):
            async with self._lock(account_id):
                if account_id in self._files:
                    await self._sync(account_id, shared)

    async def publish_pending(self) -> None:
        """Publish the chains refreshed while the store was out of reach (the store watch
        calls this while the store answers): before the lock's lease runs out, so that no
        other instance refreshes the token this one already spent."""
        shared = self._sharing()
        if shared is None:
            return
        for account_id in list(self._unpublished):
            async with self._lock(account_id):
                view = await self._sync(account_id, shared)
                chain = self._chains.get(account_id)
                generation = view.generation if isinstance(view, SharedView) else None
                if chain is None or (generation is not None and generation >= chain.generation):
                    self._unpublished.discard(account_id)

    async def _obtain(self, account: Account, *, rejected_tag: str | None) -> Tokens:
        shared = self._sharing()
        if shared is None:
            return await self._obtain_here(account, rejected_tag)
        for _ in range(4):
            try:
                return await self._obtain_shared(account, rejected_tag, shared)
            except _Again:
                continue
        raise RefreshFailed(TOKEN_REFRESH_CONTENDED, permanent=False, retry_after_s=1.0)

    # -- one instance -----------------------------------------------------------------

    async def _obtain_here(self, account: Account, rejected_tag: str | None) -> Tokens:
        chain = self._chain(account)
        backoff = self._backoff.get(account.id)
        step = self._step(chain, rejected_tag, backoff)
        if not isinstance(step, RefreshNow):
            return self._answer(step)
        outcome = await self._call_endpoint(account, chain)
        if isinstance(outcome, Refreshed):
            fresh = chain.rotated(outcome.tokens)
            self._keep(account.id, fresh)
            self._after_success(account.id, fresh)
            return fresh.tokens
        if outcome.permanent:
            newer = self._newer_on_disk(account, chain)
            if newer is not None:
                # Another process on this machine refreshed first: its chain, not a refusal.
                self._chains[account.id] = newer
                return newer.tokens
            self._keep(account.id, chain.refusing(outcome.reason))
            raise RefreshFailed(outcome.reason, permanent=True)
        backoff = self._failed(account.id, outcome.reason, backoff)
        return self._answer(self._step(chain, rejected_tag, backoff))

    def _step(
        self, chain: Chain, rejected_tag: str | None, backoff: _Backoff | None
    ) -> UseToken | RefreshNow | FailFast:
        return refresh_step(
            chain,
            rejected_tag=rejected_tag,
            wall_now=self._wall_clock(),
            margin_s=self.margin_s,
            retry_at=backoff.retry_at if backoff is not None else None,
            last_failure=backoff.reason if backoff is not None else None,
        )

    @staticmethod
    def _answer(step: UseToken | RefreshNow | FailFast) -> Tokens:
        if isinstance(step, UseToken):
            return step.tokens
        if isinstance(step, FailFast):
            raise RefreshFailed(
                step.reason, permanent=step.permanent, retry_after_s=step.retry_after_s
            )
        raise RuntimeError("a refresh is due")

    def _failed(self, account_id: str, reason: str, last: _Backoff | None) -> _Backoff:
        failures = (last.failures if last is not None else 0) + 1
        delay = refresh_backoff(failures, jitter=self._jitter())
        backoff = self._backoff[account_id] = _Backoff(self._wall_clock() + delay, failures, reason)
        return backoff

    def _after_success(self, account_id: str, fresh: Chain) -> _Backoff | None:
        """A refresh answered; an access token that is due at once counts as a failure."""
        if fresh_enough(fresh.tokens, wall_now=self._wall_clock(), margin_s=self.margin_s):
            self._backoff.pop(account_id, None)
            return None
        logger.warning(
            "bridge account %s: the token endpoint answered an access token that is "
            "already due; no new refresh before the backoff ends",
            account_id,
        )
        return self._failed(account_id, "expired_token_returned", self._backoff.get(account_id))

    def _newer_on_disk(self, account: Account, chain: Chain) -> Chain | None:
        on_disk = chain_from_json(self._read_state().get(account.id), self._files.get(account.id))
        if (
            on_disk is not None
            and on_disk.refused is None
            and on_disk.tokens.refresh_token != chain.tokens.refresh_token
            and on_disk.generation >= chain.generation
        ):
            return on_disk
        return None

    # -- several instances --------------------------------------------------------------

    async def _obtain_shared(
        self, account: Account, rejected_tag: str | None, shared: SharedTokens
    ) -> Tokens:
        view = await self._sync(account.id, shared)
        chain = self._chain(account)
        known = view if isinstance(view, SharedView) else None
        step = self._step(chain, rejected_tag, self._shared_backoff(account.id, known))
        if not isinstance(step, RefreshNow):
            return self._answer(step)
        if isinstance(view, Unreadable):
            raise RefreshFailed(STATE_SECRET_MISMATCH, permanent=False, retry_after_s=5.0)
        if view is None:
            self._store_down(account.id)
            raise RefreshFailed(STATE_STORE_UNAVAILABLE, permanent=False, retry_after_s=1.0)
        if view.locked:
            await self._wait(account.id, shared, view)
            raise _Again
        lock = await shared.lock(account.id, self.lease_s)
        if isinstance(lock, StateUnavailable):
            self._store_down(account.id)
            raise RefreshFailed(STATE_STORE_UNAVAILABLE, permanent=False, retry_after_s=1.0)
        if lock.fence is None:
            await self._wait(account.id, shared, view)
            raise _Again
        try:
            return await self._refresh_locked(account, shared, lock.fence, view)
        finally:
            await shared.unlock(account.id, lock.fence)

    def _shared_backoff(self, account_id: str, view: SharedView | None) -> _Backoff | None:
        local = self._backoff.get(account_id)
        record = view.record if view is not None else None
        if record is None or record.retry_at is None:
            return local
        if local is not None and local.retry_at >= record.retry_at:
            return local
        return _Backoff(record.retry_at, record.failures, record.last_failure or "")

    async def _refresh_locked(
        self, account: Account, shared: SharedTokens, fence: int, seen: SharedView
    ) -> Tokens:
        # Between the read and the lock another holder may have finished: read again.
        view = await shared.read(account.id)
        if not isinstance(view, SharedView) or view.record != seen.record:
            raise _Again  # any write (a refusal, a failure's backoff) changes the record
        chain = self._chain(account)
        outcome = await self._call_endpoint(account, chain)
        record = view.record
        if isinstance(outcome, Refreshed):
            fresh = chain.rotated(outcome.tokens)
            # On disk before use: a restart must never send the refresh token just spent.
            self._keep(account.id, fresh)
            backoff = self._after_success(account.id, fresh)
            written = await shared.write(
                account.id,
                fresh,
                base=record,
                fence=fence,
                retry_at=backoff.retry_at if backoff else None,
                failures=backoff.failures if backoff else 0,
                last_failure=backoff.reason if backoff else None,
            )
            if written is False:
                logger.warning(
                    "bridge account %s: a newer token generation is in the state store; "
                    "this refresh's result is used for this request only",
                    account.id,
                )
            elif isinstance(written, StateUnavailable):
                self._unpublished.add(account.id)
            return fresh.tokens
        if outcome.permanent:
            refused = chain.refusing(outcome.reason)
            written = await shared.write(account.id, refused, base=record, fence=fence)
            if written is False:
                raise _Again  # the store moved on: its newer chain, not a refusal
            self._keep(account.id, refused)
            await shared.disable(account.id, f"token refresh refused: {outcome.reason}")
            raise RefreshFailed(outcome.reason, permanent=True)
        backoff = self._failed(account.id, outcome.reason, self._shared_backoff(account.id, view))
        await shared.write(
            account.id,
            chain,
            base=record,
            fence=fence,
            retry_at=backoff.retry_at,
            failures=backoff.failures,
            last_failure=backoff.reason,
        )
        return self._answer(self._step(chain, None, backoff))

    async def _wait(self, account_id: str, shared: SharedTokens, seen: SharedView) -> None:
        """Another instance holds the lock: wait until it wrote, gave up, or its lease ran out."""
        deadline = self._wall_clock() + self.lease_s + 1.0
        while True:
            await self._sleep(POLL_S)
            view = await shared.read(account_id)
            if isinstance(view, StateUnavailable):
                self._store_down(account_id)
                raise RefreshFailed(STATE_STORE_UNAVAILABLE, permanent=False, retry_after_s=1.0)
            if isinstance(view, Unreadable):
                return  # the next round says why
            record = view.record
            step = wait_step(
                seen_generation=seen.generation,
                generation=view.generation,
                lock_held=view.locked,
                retry_at=record.retry_at if record is not None else None,
                last_failure=record.last_failure if record is not None else None,
                wall_now=self._wall_clock(),
                deadline=deadline,
            )
            if isinstance(step, Adopt | TakeOver):
                return
            if isinstance(step, FailFast):
                raise RefreshFailed(step.reason, permanent=False, retry_after_s=step.retry_after_s)
            assert isinstance(step, KeepWaiting)

    async def _sync(self, account_id: str, shared: SharedTokens) -> SharedView | Unreadable | None:
        """Level this instance's chain with the store's; None when the store is unavailable."""
        for _ in range(3):
            view = await shared.read(account_id)
            if isinstance(view, StateUnavailable):
                return None
            self._store_down_said.discard(account_id)
            if isinstance(view, Unreadable):
                self._unreadable(account_id)
                return view
            file_tokens = self._files.get(account_id)
            if file_tokens is None:
                return view
            choice = choose_chain(file_tokens, self._chains.get(account_id), view.chain)
            if isinstance(choice, UseChain):
                self._adopt(account_id, choice.chain)
                self._synced_at[account_id] = self._wall_clock()
                return view
            written = await shared.write(account_id, choice.chain, base=view.record, fence=None)
            if written is False:
                continue  # another instance wrote first: read again
            self._adopt(account_id, choice.chain)
            if written is True and _is_news(choice, view.chain):
                logger.info("bridge account %s: login from the accounts file in use", account_id)
                await shared.enable(account_id)
            return await self._reread(account_id, shared)
        return None

    async def _reread(self, account_id: str, shared: SharedTokens) -> SharedView | None:
        view = await shared.read(account_id)
        if not isinstance(view, SharedView):
            return None
        self._synced_at[account_id] = self._wall_clock()
        return view

    def _adopt(self, account_id: str, chain: Chain) -> None:
        current = self._chains.get(account_id)
        if current is not None and _same(current, chain):
            return
        self._keep(account_id, chain)

    def _unreadable(self, account_id: str) -> None:
        if account_id not in self._unreadable_said:
            self._unreadable_said.add(account_id)
            logger.error(
                "bridge account %s: the state store's tokens do not open with this "
                "instance's bridge_state_secret (every instance needs the same one); "
                "requests that need a new token for it fail",
                account_id,
            )

    def _store_down(self, account_id: str) -> None:
        if account_id not in self._store_down_said:
            self._store_down_said.add(account_id)
            logger.error(
                "bridge account %s: needs a token refresh, and the state store that holds "
                "the refresh lock is unavailable; its requests get 503 "
                "state_store_unavailable until the store is back (no refresh without the lock)",
                account_id,
            )

    # -- internals ----------------------------------------------------------------

    def _chain(self, account: Account) -> Chain:
        chain = self._chains.get(account.id)
        if chain is None:
            assert account.refresh_token is not None
            tokens = self._files[account.id] = Tokens(account.bearer, account.refresh_token)
            chain = self._chains[account.id] = choose_chain(tokens, None, None).chain
        return chain

    def _due(self, tokens: Tokens) -> bool:
        return needs_refresh(
            tokens.access_token,
            has_refresh_token=True,
            wall_now=self._wall_clock(),
            margin_s=self.margin_s,
        )

    def _stale(self, account_id: str) -> bool:
        if self._sharing() is None:
            return False
        synced = self._synced_at.get(account_id)
        return synced is None or self._wall_clock() - synced >= SYNC_S

    def _lock(self, account_id: str) -> asyncio.Lock:
        lock = self._locks.get(account_id)
        if lock is None:
            lock = self._locks[account_id] = asyncio.Lock()
        return lock

    async def _call_endpoint(self, account: Account, chain: Chain) -> RefreshOutcome:
        body = refresh_request_body(chain.tokens.refresh_token, account.client_id)
        self.refreshes += 1
        try:
            async with asyncio.timeout(self.deadline_s):
                status, answer = await self._post(self.token_url, body)
        except TimeoutError:
            status, answer = None, b""
            outcome: RefreshOutcome = Refused("token_refresh_timeout", permanent=False)
        else:
            outcome = parse_refresh_response(status, answer, old=chain.tokens)
        if isinstance(outcome, Refused):
            # `reason` is a code from a fixed list (`token_refresh.KNOWN_CODES`), never the
            # endpoint's own text: one that echoes the token cannot put it in the log.
            logger.warning(
                "bridge account %s: token refresh refused (%s%s)",
                account.id,
                outcome.reason,
                ", account disabled" if outcome.permanent else ", will try again after a backoff",
            )
        else:
            logger.info("bridge account %s: access token refreshed", account.id)
        return outcome

    def _keep(self, account_id: str, chain: Chain) -> None:
        """The live chain, and this machine's durable copy of it."""
        self._chains[account_id] = chain
        self._write_entry(account_id, chain_to_json(chain, wall_now=self._wall_clock()))

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
        write_private_json(self.state_path, {"version": 2, "accounts": accounts})


def _same(a: Chain, b: Chain) -> bool:
    return (a.generation, a.origin, a.refused, a.tokens.refresh_token) == (
        b.generation,
        b.origin,
        b.refused,
        b.tokens.refresh_token,
    )


def _is_news(choice: Publish, stored: Chain | None) -> bool:
    """A publish that starts a new login (or revives a refused account) everywhere."""
    chain = choice.chain
    return chain.refused is None and (
        stored is None or stored.refused is not None or stored.origin != chain.origin
    )


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
