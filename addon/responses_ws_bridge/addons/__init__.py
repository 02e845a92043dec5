"""The bridge's mitmproxy addons, one concern each, sharing one service and one pool state.

Order matters: mitmproxy runs a hook on addons in list order, so the bridge
writes a client flow's report before `Recording` redacts it, and both run
before mitmproxy's own save addon writes the flow.
"""

from __future__ import annotations

import time

from responses_ws_bridge.addons.accounts import Accounts
from responses_ws_bridge.addons.contentview import ResponsesView
from responses_ws_bridge.addons.metrics import BridgeMetricsAddon, pool_gauges
from responses_ws_bridge.addons.recording import Recording
from responses_ws_bridge.addons.responses_bridge import ResponsesBridge
from responses_ws_bridge.addons.state import BridgeStateAddon
from responses_ws_bridge.addons.upstream_connections import UpstreamConnections
from responses_ws_bridge.addons.usage import PooledUsage
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.turn_engine import Clocks
from responses_ws_bridge.shell.bridge_service import BridgeService, BridgeSettings
from responses_ws_bridge.shell.preconnect import Preconnector
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.shared_state import SharedState
from responses_ws_bridge.shell.shared_tokens import SharedTokens
from responses_ws_bridge.shell.token_refresher import TokenRefresher


def bridge_addons() -> list[object]:
    """Every addon of the bridge, wired together (what `addon/bridge.py` loads)."""
    # One clock pair for every part, so their times agree (and a test can replace them).
    clocks = Clocks(time.monotonic, time.time)
    state = PoolState(clock=clocks.monotonic)
    recording = Recording(state)
    metrics = BridgeMetricsAddon()
    store = BridgeStateAddon(on_error=metrics.state_store_error, accounts=lambda: state.config)
    shared = SharedState(store.shared_store, state, wall_clock=clocks.wall)
    chains = SharedTokens(store.shared_store, store.seal, wall_clock=clocks.wall)
    tokens = TokenRefresher(wall_clock=clocks.wall, shared=chains)
    state.live_secrets = tokens.secrets

    async def reoffer() -> None:
        await tokens.sync_all()
        await shared.reoffer()

    store.on_lost = reoffer
    store.on_tick = tokens.publish_pending
    sessions = SessionPool(clock=clocks.monotonic)
    settings = BridgeSettings()
    service = BridgeService(
        settings,
        state=state,
        sessions=sessions,
        connector=Preconnector(per_host=settings.preconnect, clock=clocks.monotonic),
        taps=recording.tap_for,
        exchange_taps=recording.exchange_tap_for,
        tokens=tokens,
        shared=shared,
        clocks=clocks,
    )
    metrics.snapshot = lambda: pool_gauges(state, sessions, shared)
    bridge = ResponsesBridge(service)
    bridge.metrics = metrics.turn_metrics
    return [
        ResponsesView(),
        Accounts(state, service, require_secret=store.require_secret),
        # After Accounts: it reads the binding options Accounts registers.
        store,
        metrics,
        UpstreamConnections(service),
        PooledUsage(state, clocks.wall),
        bridge,
        recording,
    ]
