"""What a turn reads and writes about its accounts: one interface, two implementations.

`TurnState` is how the service carries out a turn engine's state commands
(owner, choice, binding, load, health, figures, response owners).
`LocalTurnState` keeps all of it in this process (`PoolState`);
`SharedTurnState` does the same and mirrors it through the Redis/Valkey store
shared with other instances (`SharedState`), with that store's answers taking
precedence. The service picks one per turn, and nothing else asks which.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from responses_ws_bridge.core.account_pool import AccountPool, Choice
from responses_ws_bridge.core.affinity import Affinity
from responses_ws_bridge.core.attempt_plan import PickAny, PickOwner
from responses_ws_bridge.core.failures import Failure
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.rate_limits import RateLimits
from responses_ws_bridge.core.turn_commands import FailClosed, Owned, OwnerDecision, Unbound
from responses_ws_bridge.shell.shared_state import SharedState


class TurnState(Protocol):
    """One turn's view of the accounts (made per turn: it holds the turn's lease)."""

    async def owner(self, affinity: Affinity) -> OwnerDecision: ...

    async def choose(
        self, pick: PickOwner | PickAny, affinity: Affinity, *, claim: bool
    ) -> Choice | FailClosed: ...

    def bind(self, affinity: Affinity, account_id: str) -> None: ...

    async def hold(self, account_id: str) -> None: ...

    async def unhold(self, account_id: str) -> None: ...

    def figures(self, account_id: str, limits: RateLimits | None) -> RateLimits | None: ...

    async def failed(self, account_id: str, failure: Failure) -> bool: ...

    async def disable(self, account_id: str, reason: str) -> None: ...

    async def publish_owner(self, account_id: str, response_id: str) -> None: ...

    async def served(
        self, affinity: Affinity, account_id: str, response_id: str | None
    ) -> None: ...


class LocalTurnState:
    """This process's memory only (no `bridge_state`, or pass-through mode)."""

    def __init__(self, state: PoolState) -> None:
        self.state = state

    @property
    def pool(self) -> AccountPool:
        pool = self.state.pool
        if pool is None:
            raise RuntimeError("pass-through mode has no account pool")
        return pool

    async def owner(self, affinity: Affinity) -> OwnerDecision:
        owner = self.state.owner(affinity)
        return Owned(owner, from_store=False) if owner is not None else Unbound()

    async def choose(
        self, pick: PickOwner | PickAny, affinity: Affinity, *, claim: bool
    ) -> Choice | FailClosed:
        if isinstance(pick, PickOwner):
            return self.pool.choose_owner(pick.account)
        return self.pool.choose(
            exclude=pick.exclude, prefer=pick.prefer, sessions=self.state.bound_sessions()
        )

    def bind(self, affinity: Affinity, account_id: str) -> None:
        self.state.bind(affinity, account_id)

    async def hold(self, account_id: str) -> None:
        self.pool.acquire(account_id)

    async def unhold(self, account_id: str) -> None:
        self.pool.release(account_id)

    def figures(self, account_id: str, limits: RateLimits | None) -> RateLimits | None:
        """Notes `limits` (if any); the account's figures as the pool now holds them."""
        if limits is not None:
            self.pool.record_rate_limits(account_id, limits)
        return self.pool.rate_limits(account_id)

    async def failed(self, account_id: str, failure: Failure) -> bool:
        self.pool.record_failure(account_id, failure)
        return self.pool.is_usable(account_id)

    async def disable(self, account_id: str, reason: str) -> None:
        self.pool.disable(account_id, reason)

    async def publish_owner(self, account_id: str, response_id: str) -> None:
        """Nothing to publish: `served` records the owner in this process."""

    async def served(self, affinity: Affinity, account_id: str, response_id: str | None) -> None:
        self.state.served(affinity, account_id, response_id)


class SharedTurnState(LocalTurnState):
    """This process's memory, mirrored through the store every instance shares."""

    def __init__(self, state: PoolState, shared: SharedState) -> None:
        super().__init__(state)
        self.shared = shared
        self._lease = contextlib.AsyncExitStack()

    async def owner(self, affinity: Affinity) -> OwnerDecision:
        return await self.shared.owner(affinity)

    async def choose(
        self, pick: PickOwner | PickAny, affinity: Affinity, *, claim: bool
    ) -> Choice | FailClosed:
        return await self.shared.choose(self.pool, pick, affinity, claim=claim)

    async def hold(self, account_id: str) -> None:
        # An in-flight lease every instance counts, while the attempt runs.
        await self._lease.enter_async_context(self.shared.lease(account_id))
        await super().hold(account_id)

    async def unhold(self, account_id: str) -> None:
        await super().unhold(account_id)
        await self._lease.aclose()

    async def failed(self, account_id: str, failure: Failure) -> bool:
        self.pool.record_failure(account_id, failure)
        await self.shared.failed(self.pool, account_id, failure)
        return self.pool.is_usable(account_id)

    async def disable(self, account_id: str, reason: str) -> None:
        # Every instance disables it (a login refused for good), until an accounts file changes.
        await super().disable(account_id, reason)
        await self.shared.disable(account_id, reason)

    async def publish_owner(self, account_id: str, response_id: str) -> None:
        await self.shared.response_owner_publisher(account_id)(response_id)

    async def served(self, affinity: Affinity, account_id: str, response_id: str | None) -> None:
        await super().served(affinity, account_id, response_id)
        await self.shared.served(affinity, account_id)
