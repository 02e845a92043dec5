"""The state addon: options to a store, in memory or on a real Valkey/Redis server."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from responses_ws_bridge.addons.accounts import Accounts
from responses_ws_bridge.addons.state import BridgeStateAddon
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.shell.bridge_service import BridgeService, BridgeSettings
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.state.memory import MemoryStateStore
from responses_ws_bridge.state.redis_store import RedisStateStore
from responses_ws_bridge.state.store import BindingLimits

from tests.support.state import run


def test_default_is_memory() -> None:
    addon = BridgeStateAddon()
    with taddons.context(addon):
        assert isinstance(addon.store.store, MemoryStateStore)
        assert not addon.config.shared


def test_url_selects_the_shared_store(state_server: StateServer) -> None:
    addon = BridgeStateAddon()

    async def main() -> None:
        with taddons.context(addon) as tctx:
            tctx.configure(addon, bridge_state=f"{state_server.url}/0/team-a")
            shared = addon.store.store
            assert isinstance(shared, RedisStateStore)
            assert shared.namespace == "team-a"
            got = await addon.store.run("bind", lambda s: s.bind("session:x", Binding("a")))
            assert got == Binding("a", AffinityKind.HARD)
            tctx.configure(addon, bridge_state_namespace="team-b")
            assert isinstance(addon.store.store, RedisStateStore)
            assert addon.store.store.namespace == "team-b"
            addon.set_limits(BindingLimits(hard_ttl_s=5))
            assert addon.store.store.limits.hard_ttl_s == 5
            await addon.done()

    run(main)


def test_bad_url_is_refused() -> None:
    addon = BridgeStateAddon()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="bridge_state"):
            tctx.configure(addon, bridge_state="http://localhost:6379")
        assert isinstance(addon.store.store, MemoryStateStore)


def test_binding_limits_follow_the_accounts_options() -> None:
    state = PoolState()
    service = BridgeService(BridgeSettings(), state=state, sessions=SessionPool())
    accounts, addon = Accounts(state, service), BridgeStateAddon()
    with taddons.context(accounts, addon) as tctx:
        tctx.configure(addon, bridge_binding_ttl="5", bridge_binding_max=7)
        assert addon.limits == BindingLimits(5.0, 5.0, 5.0, 7)
        tctx.configure(addon, bridge_binding_ttl="0")
        assert addon.limits.hard_ttl_s == float("inf")
        assert addon.shared_store() is None
