"""Options of the bridge's upstream WebSocket connections: timeouts, pings, sizes, TLS, preconnects.

TLS follows mitmproxy's own options for its upstream connections
(`ssl_verify_upstream_trusted_ca`, `ssl_verify_upstream_trusted_confdir`,
`ssl_insecure`), so one setting covers both.
"""

from __future__ import annotations

import dataclasses

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons.option_values import not_negative, one_line_at_startup, seconds
from responses_ws_bridge.shell.bridge_service import BridgeService
from responses_ws_bridge.shell.preconnect import DEFAULT_PRECONNECT
from responses_ws_bridge.shell.upstream_client import UpstreamSettings

_DEFAULTS = UpstreamSettings()
OPTIONS = (
    "bridge_connect_timeout",
    "bridge_max_message_size",
    "bridge_ping_interval",
    "bridge_ping_timeout",
    "bridge_compression",
    "bridge_preconnect",
    "ssl_verify_upstream_trusted_ca",
    "ssl_verify_upstream_trusted_confdir",
    "ssl_insecure",
)


def _duration(value: float | None) -> str:
    return "0" if value is None else f"{value:g}"


class UpstreamConnections:
    def __init__(self, service: BridgeService) -> None:
        self.service = service

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_connect_timeout",
            str,
            _duration(_DEFAULTS.connect_timeout),
            "Seconds to open an upstream WebSocket (TCP, TLS and handshake).",
        )
        loader.add_option(
            "bridge_max_message_size",
            int,
            _DEFAULTS.max_message_size or 0,
            "Largest upstream WebSocket message accepted, in bytes (0: no limit).",
        )
        loader.add_option(
            "bridge_ping_interval",
            str,
            _duration(_DEFAULTS.ping_interval),
            "Seconds between WebSocket pings to the upstream (0: no pings).",
        )
        loader.add_option(
            "bridge_ping_timeout",
            str,
            _duration(_DEFAULTS.ping_timeout),
            "Seconds to wait for a pong before the upstream counts as lost (0: wait forever).",
        )
        loader.add_option(
            "bridge_compression",
            bool,
            _DEFAULTS.compression,
            "Offer permessage-deflate to the upstream.",
        )
        loader.add_option(
            "bridge_preconnect",
            int,
            DEFAULT_PRECONNECT,
            "TCP/TLS connections kept ready per upstream host for new sessions, on which a "
            "request sends its own WebSocket upgrade; never a handshake ahead (0: none).",
        )

    @one_line_at_startup
    def configure(self, updated: set[str]) -> None:
        if not updated.intersection(OPTIONS):
            return
        opts = ctx.options
        connect_timeout = seconds(opts, "bridge_connect_timeout")
        if connect_timeout == 0:
            raise exceptions.OptionsError("bridge_connect_timeout must be positive")
        upstream = dataclasses.replace(
            self.service.settings.upstream,
            connect_timeout=connect_timeout,
            max_message_size=not_negative(opts, "bridge_max_message_size") or None,
            ping_interval=seconds(opts, "bridge_ping_interval") or None,
            ping_timeout=seconds(opts, "bridge_ping_timeout") or None,
            compression=opts.bridge_compression,
            trusted_ca=opts.ssl_verify_upstream_trusted_ca or None,
            trusted_ca_dir=opts.ssl_verify_upstream_trusted_confdir or None,
            insecure=opts.ssl_insecure,
        )
        settings = dataclasses.replace(
            self.service.settings,
            upstream=upstream,
            preconnect=not_negative(opts, "bridge_preconnect"),
        )
        self.service.apply_settings(settings)
