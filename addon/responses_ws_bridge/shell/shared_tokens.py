"""Token chains in the store every instance shares: read, publish, lock, write, all sealed.

The refresher (`shell.token_refresher`) calls this when `bridge_state` names a
shared store; the decisions are `core.token_chain`. Every call is guarded
(`StateUnavailable` instead of an exception or a hang), and every chain goes
into the store sealed with `bridge_state_secret` (`state.sealing`) and comes
out opened, so nothing here ever sees a token in clear in the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from responses_ws_bridge.core.token_chain import Chain, chain_from_json, chain_to_json
from responses_ws_bridge.state.guarded import GuardedStore, StateUnavailable
from responses_ws_bridge.state.sealing import TokenSeal
from responses_ws_bridge.state.store import RefreshLock, StateStore, TokenRecord


@dataclass(frozen=True)
class Unreadable:
    """The store's record does not open with this instance's secret (or is damaged)."""

    generation: int


@dataclass(frozen=True)
class SharedView:
    """An account's chain as the store holds it (None: nothing yet), and its lock."""

    chain: Chain | None
    record: TokenRecord | None
    locked: bool

    @property
    def generation(self) -> int | None:
        return self.record.generation if self.record is not None else None


class SharedTokens:
    def __init__(
        self,
        store: Callable[[], GuardedStore | None],
        seal: Callable[[], TokenSeal | None],
        *,
        wall_clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._seal = seal
        self._wall = wall_clock

    @property
    def active(self) -> bool:
        """A shared store and a secret to seal with: the chains are shared."""
        return self._store() is not None and self._seal() is not None

    async def _run[T](
        self, operation: str, call: Callable[[StateStore], Awaitable[T]]
    ) -> T | StateUnavailable:
        store = self._store()
        if store is None:
            return StateUnavailable(operation, "no shared state store")
        return await store.run(operation, call)

    def _sealer(self) -> TokenSeal:
        seal = self._seal()
        if seal is None:
            raise RuntimeError("no bridge_state_secret to seal token chains with")
        return seal

    async def read(self, account_id: str) -> SharedView | Unreadable | StateUnavailable:
        view = await self._run("token_view", lambda s: s.token_view(account_id))
        if isinstance(view, StateUnavailable):
            return view
        record = view.record
        if record is None:
            return SharedView(None, None, view.locked)
        opened = self._sealer().open(account_id, record.generation, record.sealed)
        chain = chain_from_json(opened)
        if chain is None or chain.generation != record.generation:
            return Unreadable(record.generation)
        return SharedView(chain, record, view.locked)

    async def write(
        self,
        account_id: str,
        chain: Chain,
        *,
        base: TokenRecord | None,
        fence: int | None,
        retry_at: float | None = None,
        failures: int = 0,
        last_failure: str | None = None,
    ) -> bool | StateUnavailable:
        """Write `chain` on top of `base` (what was read), as lock holder `fence` or as a
        publish (`fence` None); False when the store holds something newer."""
        written_fence = max(fence or 0, base.fence if base is not None else 0)
        sealed = self._sealer().seal(
            account_id, chain.generation, chain_to_json(chain, wall_now=self._wall())
        )
        record = TokenRecord(
            chain.generation, written_fence, sealed, retry_at, failures, last_failure
        )
        base_generation = base.generation if base is not None else None
        return await self._run(
            "write_tokens",
            lambda s: s.write_tokens(
                account_id, record, base_generation=base_generation, fence=fence
            ),
        )

    async def lock(self, account_id: str, lease_s: float) -> RefreshLock | StateUnavailable:
        return await self._run(
            "take_refresh_lock", lambda s: s.take_refresh_lock(account_id, lease_s)
        )

    async def unlock(self, account_id: str, fence: int) -> None:
        await self._run("release_refresh_lock", lambda s: s.release_refresh_lock(account_id, fence))

    async def enable(self, account_id: str) -> None:
        """A new login from an accounts file: the account may serve again on every instance."""
        await self._run("enable", lambda s: s.enable(account_id))

    async def disable(self, account_id: str, reason: str) -> None:
        await self._run("disable", lambda s: s.disable(account_id, reason))
