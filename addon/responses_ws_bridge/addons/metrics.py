"""The mitmproxy addon that serves the bridge's Prometheus metrics on `bridge_metrics`.

`prometheus_client` (the `metrics` extra) is imported only when the option is
set, so the default install runs without it. `metrics` is None until then;
the bridge asks for it at each request (`turn_metrics`) and the state addon
at each store error (`state_store_error`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons.option_values import one_line_at_startup
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.shared_state import SharedState, bound_sessions
from responses_ws_bridge.shell.turn_metrics import TurnMetrics

if TYPE_CHECKING:
    from responses_ws_bridge.shell.metrics import BridgeMetrics, GaugeSnapshot, MetricsServer

logger = logging.getLogger(__name__)

USED_PERCENT = ".used_percent"


class BridgeMetricsAddon:
    def __init__(
        self,
        metrics: BridgeMetrics | None = None,
        *,
        snapshot: Callable[[], GaugeSnapshot] | None = None,
    ) -> None:
        self.metrics = metrics
        # The gauges' source, read at scrape time (set by whoever wires the bridge).
        self.snapshot = snapshot
        self._server: MetricsServer | None = None
        self._listen: tuple[str, int] | None = None

    @property
    def port(self) -> int | None:
        return self._server.port if self._server is not None else None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_metrics",
            str,
            "",
            "host:port to serve Prometheus metrics on (e.g. 127.0.0.1:9464; needs the "
            "'metrics' extra). Empty: off.",
        )

    @one_line_at_startup
    def configure(self, updated: set[str]) -> None:
        if "bridge_metrics" not in updated:
            return
        value = ctx.options.bridge_metrics
        if not value.strip():
            self._stop()
            return
        try:
            from responses_ws_bridge.shell import metrics as prometheus
        except ImportError as exc:
            raise exceptions.OptionsError(
                "bridge_metrics: prometheus_client is not installed (pip install '.[metrics]')"
            ) from exc
        try:
            listen = prometheus.parse_listen(value)
        except ValueError as exc:
            raise exceptions.OptionsError(f"bridge_metrics: {exc}") from exc
        if listen == self._listen:
            return
        self._stop()
        if self.metrics is None:
            self.metrics = prometheus.BridgeMetrics(self.snapshot)
        server = prometheus.MetricsServer(self.metrics.registry)
        assert listen is not None
        try:
            port = server.start(*listen)
        except OSError as exc:
            where = f"{listen[0]}:{listen[1]}"
            raise exceptions.OptionsError(
                f"bridge_metrics: cannot listen on {where} ({exc.strerror or exc}); "
                "give another host:port, e.g. --set bridge_metrics=127.0.0.1:9465"
            ) from exc
        self._server, self._listen = server, listen
        logger.info("bridge metrics on http://%s:%d/metrics", listen[0], port)

    def turn_metrics(self) -> TurnMetrics | None:
        """Where finished turns are counted; None while metrics are off."""
        return self.metrics if self._server is not None else None

    def state_store_error(self, operation: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.state_store_error(operation, kind)

    def _stop(self) -> None:
        server, self._server, self._listen = self._server, None, None
        if server is not None:
            server.stop()

    def done(self) -> None:
        self._stop()


def pool_gauges(
    state: PoolState, sessions: SessionPool, shared: SharedState | None
) -> GaugeSnapshot:
    """Accounts and idle sessions as the gauges show them at scrape time.

    With a shared store, in-flight counts and bound sessions are every
    instance's (the latest counts read) and rate limits the latest figures any
    instance saw.
    """
    from responses_ws_bridge.shell.metrics import AccountGauges, GaugeSnapshot

    sharing = shared is not None and shared.active
    accounts: list[AccountGauges] = []
    bound = bound_sessions(state, shared)
    if state.pool is not None:
        for row in state.pool.snapshot():
            in_flight = row.in_flight
            windows: dict[str, float] = {}
            if sharing and shared is not None:
                in_flight = shared.load.get(row.id, in_flight)
                record = shared.records.get(row.id)
                figures = record.rate_limits if record is not None else {}
                windows = {
                    name.removesuffix(USED_PERCENT): value
                    for name, value in figures.items()
                    if name.endswith(USED_PERCENT)
                }
            health = row.health.split(":", 1)[0]
            accounts.append(AccountGauges(row.id, health, in_flight, windows, bound.get(row.id, 0)))
    idle = sum(count for _, count, _ in sessions.snapshot())
    return GaugeSnapshot(tuple(accounts), idle, shared.reachable if shared is not None else None)
