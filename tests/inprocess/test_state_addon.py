"""The state addon: options to a store, in memory or on a real Valkey/Redis server."""

from __future__ import annotations

import json
from pathlib import Path

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


def refresh_accounts(path: Path) -> Path:
    path.write_text(json.dumps({"accounts": [{"id": "c", "refresh_token": "rt-c-0"}]}))
    return path


def test_refresh_accounts_on_a_shared_store_need_the_secret(tmp_path: Path) -> None:
    state = PoolState()
    service = BridgeService(BridgeSettings(), state=state, sessions=SessionPool())
    addon = BridgeStateAddon(accounts=lambda: state.config)
    accounts = Accounts(state, service, require_secret=addon.require_secret)
    secret = tmp_path / "state.secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    with taddons.context(accounts, addon) as tctx:
        tctx.configure(accounts, bridge_accounts=str(refresh_accounts(tmp_path / "a.json")))
        with pytest.raises(exceptions.OptionsError, match="bridge_state_secret: accounts with"):
            tctx.configure(addon, bridge_state="redis://127.0.0.1:1")
        tctx.configure(addon, bridge_state="redis://127.0.0.1:1", bridge_state_secret=str(secret))
        assert addon.seal() is not None
        assert "0123456789" not in repr(addon.seal())
        with pytest.raises(exceptions.OptionsError, match="bridge_state_secret"):
            tctx.configure(addon, bridge_state_secret="")
        # In-memory state needs no secret.
        tctx.configure(addon, bridge_state="", bridge_state_secret="")
        assert addon.seal() is None


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("short", 0o600, "at least 16"),
        ("0123456789abcdef0123456789abcdef", 0o644, "readable by others"),
        (None, 0o600, "cannot read"),
    ],
)
def test_an_unusable_secret_file_is_refused(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    secret = tmp_path / "state.secret"
    if content is not None:
        secret.write_text(content)
        secret.chmod(mode)
    addon = BridgeStateAddon()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message) as raised:
            tctx.configure(
                addon, bridge_state="redis://127.0.0.1:1", bridge_state_secret=str(secret)
            )
        assert "0123456789abcdef" not in str(raised.value)
