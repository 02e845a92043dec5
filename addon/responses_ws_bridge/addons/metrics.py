"""The mitmproxy addon that serves the bridge's Prometheus metrics on `bridge_metrics`."""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.shell.metrics import BridgeMetrics, MetricsServer, parse_listen

logger = logging.getLogger(__name__)


class BridgeMetricsAddon:
    def __init__(self, metrics: BridgeMetrics | None = None) -> None:
        self.metrics = metrics or BridgeMetrics()
        self.server = MetricsServer(self.metrics.registry)
        self._listen: tuple[str, int] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_metrics",
            str,
            "",
            "host:port to serve Prometheus metrics on (e.g. 127.0.0.1:9464). Empty: off.",
        )

    def configure(self, updated: set[str]) -> None:
        if "bridge_metrics" not in updated:
            return
        try:
            listen = parse_listen(ctx.options.bridge_metrics)
        except ValueError as exc:
            raise exceptions.OptionsError(f"bridge_metrics: {exc}") from exc
        if listen == self._listen:
            return
        self.server.stop()
        self._listen = None
        if listen is None:
            return
        try:
            port = self.server.start(*listen)
        except OSError as exc:
            raise exceptions.OptionsError(
                f"bridge_metrics: cannot listen on {listen}: {exc}"
            ) from exc
        self._listen = listen
        logger.info("bridge metrics on http://%s:%d/metrics", listen[0], port)

    def done(self) -> None:
        self.server.stop()
        self._listen = None
