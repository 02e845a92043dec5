"""An in-flight lease held for as long as one upstream attempt runs.

Acquired on entry, renewed every third of its TTL while the attempt runs,
released on exit. If the store cannot be reached the attempt goes ahead
without one (the account's load then reads low, never stuck high); a lease
lost to a long stall is simply taken again at the next renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from responses_ws_bridge.state.guarded import GuardedStore, StateUnavailable
from responses_ws_bridge.state.store import Lease

DEFAULT_LEASE_TTL_S = 60.0


@contextlib.asynccontextmanager
async def held_lease(
    store: GuardedStore, account_id: str, ttl_s: float = DEFAULT_LEASE_TTL_S
) -> AsyncIterator[Lease | None]:
    got = await store.run("acquire_lease", lambda s: s.acquire_lease(account_id, ttl_s))
    lease = None if isinstance(got, StateUnavailable) else got
    holder = _Holder(store, account_id, ttl_s, lease)
    renewer = asyncio.ensure_future(holder.renew_forever())
    try:
        yield lease
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        await holder.release()


class _Holder:
    def __init__(
        self, store: GuardedStore, account_id: str, ttl_s: float, lease: Lease | None
    ) -> None:
        self.store, self.account_id, self.ttl_s, self.lease = store, account_id, ttl_s, lease

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            await self.renew()

    async def renew(self) -> None:
        lease, ttl_s = self.lease, self.ttl_s
        got: Lease | StateUnavailable | None = None
        if lease is not None:
            got = await self.store.run("renew_lease", lambda s: s.renew_lease(lease, ttl_s))
        if got is None:
            got = await self.store.run(
                "acquire_lease", lambda s: s.acquire_lease(self.account_id, ttl_s)
            )
        if not isinstance(got, StateUnavailable):
            self.lease = got

    async def release(self) -> None:
        lease = self.lease
        if lease is not None:
            await self.store.run("release_lease", lambda s: s.release_lease(lease))
