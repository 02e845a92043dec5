"""`make run`'s log: one line per request, nothing per connection.

Loaded by `scripts/run_local.py` next to `addon/bridge.py` (`-s` this file),
with `flow_detail=0`: mitmproxy's own per-connection lines (client connect,
server disconnect, "Streaming response from") are left out, and a request the
bridge does not answer itself (in pass-through mode, `GET /v1/models` passed
on to the upstream) gets a line of its own, like the bridge's for the rest.
Warnings and errors are shown as always, and say which they are in words
(`warning:`, `error:`), since a piped log has no colours.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.core import routing
from responses_ws_bridge.recording.session_flows import METADATA_KEY

logger = logging.getLogger(__name__)

# mitmproxy's connection handler logs every connection's life at info level.
CONNECTION_LOGGER = "mitmproxy.proxy.server"


def _level_in_words(record: logging.LogRecord) -> logging.LogRecord:
    if record.levelno < logging.WARNING:
        return record
    marked = copy.copy(record)
    word = "error" if record.levelno >= logging.ERROR else "warning"
    marked.msg, marked.args = f"{word}: {record.getMessage()}", None
    return marked


class RunLog:
    def load(self, loader: Loader) -> None:
        # Before the listener opens: no line for the first connection either.
        logging.getLogger(CONNECTION_LOGGER).setLevel(logging.WARNING)

        for handler in logging.getLogger().handlers:
            if _level_in_words not in handler.filters:
                handler.addFilter(_level_in_words)

    async def done(self) -> None:
        """Lets the clients still connected go before mitmproxy cancels their tasks.

        A client task cancelled at exit makes Python 3.12.1's asyncio print a
        traceback (`StreamReaderProtocol` asks the cancelled task for its
        exception): closing the connections first ends those tasks normally.
        """
        proxyserver = ctx.master.addons.get("proxyserver")
        handlers = list(proxyserver.connections.values()) if proxyserver is not None else []
        for handler in handlers:
            io = handler.transports.get(handler.client)
            if io is not None and io.writer is not None and not io.writer.is_closing():
                io.writer.close()
        for _ in range(20):
            if not proxyserver or not proxyserver.connections:
                return
            await asyncio.sleep(0.05)

    def response(self, flow: http.HTTPFlow) -> None:
        self._line(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._line(flow)

    @staticmethod
    def _line(flow: http.HTTPFlow) -> None:
        bridge = ctx.master.addons.get("responsesbridge")
        if bridge is not None and bridge.answers(flow):
            return  # the bridge's own line
        if bridge is None and routing.is_bridged(flow.request.method, flow.request.path):
            return
        if flow.metadata.get(METADATA_KEY, {}).get("role") == "upstream":
            return  # a recorded upstream session, not a request
        path = flow.request.path.partition("?")[0]
        took = f"{max(time.time() - flow.request.timestamp_start, 0.0) * 1000:.0f} ms"
        if flow.response is not None:
            result = str(flow.response.status_code)
        else:
            result = flow.error.msg if flow.error is not None else "no answer"
        logger.info("%s %s: %s · passed on · %s", flow.request.method, path, result, took)


addons = [RunLog()]
