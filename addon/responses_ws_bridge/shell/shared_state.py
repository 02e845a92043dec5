"""What a request reads from and writes to the state store shared with other bridge instances.

`BridgeService` calls this at a few points of `serve`, and only when
`bridge_state` names a shared store: find the owner, choose an account with
every instance's health, load and bound sessions (claiming a new hard key
atomically), hold a lease while an attempt runs, and record the outcome. The
store is read at call time (the state addon replaces it when its options
change) and every call is guarded: an unreachable store answers
`StateUnavailable`, and `fallback` decides what the request may do then. What
this instance already knows (`PoolState`'s bindings, response owners and
bound-session counts) stays the local memory a request may fall back on.

Times in the store are wall-clock; the pool keeps its own clock, so a cooldown
is converted on its way in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from responses_ws_bridge.core.account_pool import (
    AccountPool,
    Choice,
    Chosen,
    Cooling,
    Disabled,
    Health,
)
from responses_ws_bridge.core.affinity import Affinity, AffinityKind, counted_key
from responses_ws_bridge.core.attempt_plan import PickAny, PickOwner
from responses_ws_bridge.core.bindings import Binding, bindings_for
from responses_ws_bridge.core.failures import Failure, is_auth_rejection
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.state import health_record
from responses_ws_bridge.state.fallback import (
    FailClosed,
    Owned,
    OwnerDecision,
    Unbound,
    bind_decision,
    owner_decision,
    stored_owner,
)
from responses_ws_bridge.state.guarded import GuardedStore, StateUnavailable
from responses_ws_bridge.state.health_record import CoolDown, Disable
from responses_ws_bridge.state.leases import DEFAULT_LEASE_TTL_S, held_lease
from responses_ws_bridge.state.store import AccountHealthRecord, StateStore

logger = logging.getLogger(__name__)

RECOVERING = "the state store lost its data and is recovering: instances re-offer what they know"


def bound_sessions(state: PoolState, shared: SharedState | None) -> dict[str, int]:
    """Sessions per account as an operator sees them: every instance's (as last read)
    with a shared store, this process's otherwise."""
    if shared is not None and shared.active:
        return shared.bound_sessions()
    return state.bound_sessions()


class SharedState:
    def __init__(
        self,
        store: Callable[[], GuardedStore | None],
        state: PoolState,
        *,
        wall_clock: Callable[[], float] = time.time,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> None:
        # None: in-memory mode, nothing is shared and the service does not call in.
        self._store = store
        self.state = state
        self._wall = wall_clock
        self.lease_ttl_s = lease_ttl_s
        # The latest figures read from the store, for the metrics gauges.
        self.records: dict[str, AccountHealthRecord] = {}
        self.load: dict[str, int] = {}
        # None until the store has answered (and while it does not): this process's count.
        self.sessions: dict[str, int] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        return self._store() is not None

    def _guarded(self) -> GuardedStore:
        store = self._store()
        if store is None:
            raise RuntimeError("no shared state store is configured")
        return store

    async def _run[T](
        self, operation: str, call: Callable[[StateStore], Awaitable[T]]
    ) -> T | StateUnavailable:
        return await self._guarded().run(operation, call)

    # -- before the first attempt ------------------------------------------------------

    async def owner(self, affinity: Affinity) -> OwnerDecision:
        """Who owns this request, from the store and what this instance remembers."""
        if affinity.kind is AffinityKind.NONE:
            return Unbound()
        local = self.state.owner(affinity)
        found = await self._run("lookup", lambda s: s.lookup(affinity.owner_hint, affinity.keys))
        stored = found if isinstance(found, StateUnavailable) else stored_owner(affinity, found)
        decision = owner_decision(affinity.kind, stored, local)
        if affinity.kind is AffinityKind.HARD and isinstance(decision, Unbound) and decision.prefer:
            # The store lost the key (restarted empty) but this instance knows the owner:
            # offer it, and let whichever instance wrote first keep the key.
            claimed = await self.claim(affinity, decision.prefer)
            return claimed if isinstance(claimed, Owned) else Owned(decision.prefer, False)
        return decision

    # -- each attempt ---------------------------------------------------------------------

    async def choose(
        self, pool: AccountPool, pick: PickOwner | PickAny, affinity: Affinity, *, claim: bool
    ) -> Choice | FailClosed:
        """The pool's choice with every instance's health, load and bound sessions.

        `claim`: a new hard key; the account chosen is bound in the store, and
        when another instance bound it first, that instance's account serves.
        """
        if isinstance(pick, PickOwner):
            await self.refresh(pool)
            return pool.choose_owner(pick.account)
        # Bound sessions only here: an owner's turn (most turns) needs no count.
        load, sessions = await asyncio.gather(self.refresh(pool), self.read_sessions(pool.ids))
        choice = pool.choose(exclude=pick.exclude, prefer=pick.prefer, load=load, sessions=sessions)
        if not (claim and affinity.kind is AffinityKind.HARD and isinstance(choice, Chosen)):
            return choice
        claimed = await self.claim(affinity, choice.account.id, new=True)
        if isinstance(claimed, FailClosed):
            return claimed
        if claimed.account_id != choice.account.id:
            logger.info("bridge: another instance bound this key first; serving on its account")
            return pool.choose_owner(claimed.account_id)
        return choice

    async def claim(
        self, affinity: Affinity, account_id: str, *, new: bool = False
    ) -> Owned | FailClosed:
        """Bind the primary key to `account_id` unless it is bound: the first writer wins.

        `new`: an owner nobody knew before (not one this instance re-offers), which a
        store recovering from the loss of its data does not take yet.
        """
        assert affinity.key is not None
        key = affinity.key
        binding = Binding(account_id, affinity.kind, key == counted_key(affinity))
        if new:
            got = await self._run("bind", lambda s: s.bind_new(key, binding))
        else:
            got = await self._run("bind", lambda s: s.bind(key, binding))
        if got is None:
            got = StateUnavailable("bind", RECOVERING)
        stored = got if isinstance(got, StateUnavailable) else got.account_id
        return bind_decision(affinity.kind, stored, account_id)

    async def refresh(self, pool: AccountPool) -> dict[str, int] | None:
        """Adopt the store's health of every account; returns the in-flight counts (None: down)."""
        ids = pool.ids
        health, load = await asyncio.gather(
            self._run("health", lambda s: s.health(ids)),
            self._run("in_flight", lambda s: s.in_flight(ids)),
        )
        if not isinstance(health, StateUnavailable):
            self.records = health
            wall, local = self._wall(), self.state.clock()
            for account_id, record in health.items():
                read = health_record.health_of(record, wall)
                pool.adopt(account_id, health_record.on_pool_clock(read, wall, local))
        if isinstance(load, StateUnavailable):
            return None
        self.load = load
        return load

    async def read_sessions(self, ids: Sequence[str]) -> dict[str, int]:
        """Sessions bound to each account: every instance's, or this process's own while
        the store does not answer."""
        counts = await self._run("bound_sessions", lambda s: s.bound_sessions(ids))
        self.sessions = None if isinstance(counts, StateUnavailable) else counts
        return self.bound_sessions()

    def bound_sessions(self) -> dict[str, int]:
        """Sessions per account as last read from the store, else this process's own."""
        return self.sessions if self.sessions is not None else self.state.bound_sessions()

    @contextlib.asynccontextmanager
    async def lease(self, account_id: str) -> AsyncIterator[None]:
        """Counts as in flight on `account_id` for every instance while the attempt runs."""
        async with held_lease(self._guarded(), account_id, self.lease_ttl_s):
            yield

    def response_owner_publisher(self, account_id: str) -> Callable[[str], Awaitable[None]]:
        """What the relay calls with the response id as soon as it is known."""

        async def publish(response_id: str) -> None:
            await self._run(
                "set_response_owner", lambda s: s.set_response_owner(response_id, account_id)
            )

        return publish

    # -- after an attempt -----------------------------------------------------------------

    async def served(self, affinity: Affinity, account_id: str) -> None:
        """A turn completed: its keys belong to `account_id` (its response was published
        on the way), and the account is evidently healthy again."""
        pool = self.state.pool
        if pool is None or pool.account(account_id) is None:
            return
        calls: list[Awaitable[object]] = [
            self._bind(key, binding) for key, binding in bindings_for(affinity, account_id)
        ]
        record = self.records.get(account_id)
        if record is None or record.cooldown_until is not None:
            calls.append(self._run("clear_failures", lambda s: s.clear_failures(account_id)))
        await asyncio.gather(*calls)

    async def _bind(self, key: str, binding: Binding) -> None:
        if binding.kind is AffinityKind.SOFT:
            # A soft key follows the account that served it last.
            await self._run("rebind", lambda s: s.rebind(key, binding))
        else:
            await self._run("bind", lambda s: s.bind(key, binding))

    async def failed(self, pool: AccountPool, account_id: str, failure: Failure) -> None:
        """Mirror the pool's health rule into the store, and adopt what the store holds then
        (another instance's cooldown may be longer)."""
        if isinstance(pool.health(account_id), Disabled) and not is_auth_rejection(failure):
            return  # disabled before this failure: nothing more to count
        change = health_record.change_for(failure, pool.rules, self._wall())
        health: Health | None = None
        if isinstance(change, Disable):
            got = await self._run("disable", lambda s: s.disable(account_id, change.reason))
            health = None if isinstance(got, StateUnavailable) else Disabled(change.reason)
        elif isinstance(change, CoolDown):
            health = await self._cool_down(account_id, change.until, change.reason)
        elif (cooling := health_record.faults_cooled(pool.health(account_id), failure)) is not None:
            # The pool's fault rate cooled it: every instance keeps away as long.
            until = cooling.until - self.state.clock() + self._wall()
            health = await self._cool_down(account_id, until, cooling.reason)
        if health is not None:
            pool.adopt(
                account_id, health_record.on_pool_clock(health, self._wall(), self.state.clock())
            )

    async def disable(self, account_id: str, reason: str) -> None:
        """Out of service on every instance until an accounts file changes."""
        await self._run("disable", lambda s: s.disable(account_id, reason))

    async def _cool_down(self, account_id: str, until: float, reason: str) -> Health | None:
        got = await self._run("cool_down", lambda s: s.cool_down(account_id, until, reason))
        if isinstance(got, StateUnavailable):
            return None
        # The cooldown in force may be another instance's, longer than this one.
        return Cooling(got, reason)

    async def rate_limits(self, account_id: str, figures: Mapping[str, float]) -> None:
        """The latest rate-limit figures the upstream sent for `account_id`, flat
        (`{"primary.used_percent": 42.0}`), for every instance and the metrics."""
        await self._run("set_rate_limits", lambda s: s.set_rate_limits(account_id, figures))

    # -- a store that lost its data ---------------------------------------------------------

    async def reoffer(self) -> int:
        """Offer every owner this instance knows to a store that lost its data (first writer
        wins, as always); returns how many. Runs while the store recovers, when new hard
        bindings wait, so that what was bound before comes back before anything new."""
        calls: list[Callable[[StateStore], Awaitable[object]]] = [
            *(
                functools.partial(_bind_row, row.key, row.binding)
                for row in self.state.bindings.items()
            ),
            *(
                functools.partial(_owner_row, row.key, row.binding.account_id)
                for row in self.state.response_owners.items()
            ),
        ]
        for offered, call in enumerate(calls):
            if isinstance(await self._run("reoffer", call), StateUnavailable):
                return offered
        return len(calls)

    # -- the accounts file ------------------------------------------------------------------

    def accounts_changed(
        self, kept: Sequence[str], removed: Sequence[str], *, reload: bool
    ) -> None:
        """A new accounts file: removed accounts lose their bindings everywhere; on a reload
        (not the first load) a disabled account may serve again, as in the pool."""
        if not self.active or not (removed or reload):
            return
        enabled = list(kept) if reload else []

        async def apply() -> None:
            for account_id in removed:
                await self._forget(account_id)
            for account_id in enabled:
                await self._enable(account_id)

        try:
            task = asyncio.get_running_loop().create_task(apply())
        except RuntimeError:
            return  # no event loop yet: the first load, nothing shared to undo
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _forget(self, account_id: str) -> None:
        await self._run("forget_account", lambda s: s.forget_account(account_id))

    async def _enable(self, account_id: str) -> None:
        await self._run("enable", lambda s: s.enable(account_id))

    async def settle(self) -> None:
        """Wait for background writes (accounts changes) to finish."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def _bind_row(key: str, binding: Binding, store: StateStore) -> object:
    return await store.bind(key, binding)


async def _owner_row(response_id: str, account_id: str, store: StateStore) -> object:
    await store.set_response_owner(response_id, account_id)
    return None
