"""Recording: every upstream WebSocket session as a flow, and client flows kept free of secrets.

The service asks `tap_for` for a tap per new upstream connection; the taps
feed the flows through mitmproxy's hooks via one `HookEmitter`. Every client
flow (bridged, answered by the bridge itself, or passed through) gets its
credentials redacted in `response` and `error`: after mitmproxy has sent the
request on, and before its own save addon and `-v` output see the flow.
"""

from __future__ import annotations

from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy.addonmanager import AddonManager, Loader, safecall, traverse

from responses_ws_bridge.core.forward_commands import Fetch
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.redaction import redact_headers
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.recording.recorder import ExchangeFlowTap, HookEmitter, SessionFlowTap
from responses_ws_bridge.recording.session_flows import METADATA_KEY
from responses_ws_bridge.shell.http_forward import ExchangeTap
from responses_ws_bridge.shell.upstream_client import SessionTap


class Recording:
    def __init__(self, state: PoolState) -> None:
        self.state = state
        self.record = True
        self.redact = True
        self._emitter: HookEmitter | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_record",
            bool,
            True,
            "Record every upstream WebSocket session (and every request the pool forwards) "
            "as a flow (mitmweb, -w, replay).",
        )
        loader.add_option(
            "bridge_redact",
            bool,
            True,
            "Redact credentials in recorded upstream sessions (off: for local debugging only).",
        )

    def configure(self, updated: set[str]) -> None:
        self.record = ctx.options.bridge_record
        self.redact = ctx.options.bridge_redact

    async def running(self) -> None:
        manager = ctx.master.addons
        self._emitter = HookEmitter(lambda hook: trigger_listeners(manager, hook))

    async def done(self) -> None:
        if self._emitter is not None:
            await self._emitter.drain()

    def tap_for(self, turn: Turn, attempt: Attempt) -> SessionTap | None:
        """A tap recording a new upstream connection of `turn` (None: recording is off)."""
        if not self.record or self._emitter is None:
            return None
        secrets = self.state.secrets()
        if turn.client_credential is not None:
            secrets.append(turn.client_credential.bearer)
        return SessionFlowTap(
            turn=turn, attempt=attempt, emit=self._emitter, redact=self.redact, secrets=secrets
        )

    def exchange_tap_for(self, turn: Turn, attempt: Attempt, fetch: Fetch) -> ExchangeTap | None:
        """A tap recording one forwarded HTTP exchange of `turn` (None: recording is off)."""
        if not self.record or self._emitter is None:
            return None
        return ExchangeFlowTap(
            turn=turn,
            attempt=attempt,
            url=fetch.url,
            method=fetch.method,
            headers=fetch.headers,
            body=fetch.body,
            emit=self._emitter,
            redact=self.redact,
            secrets=self.state.secrets(),
        )

    # -- client flows ----------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact_client_flow(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact_client_flow(flow)

    def _redact_client_flow(self, flow: http.HTTPFlow) -> None:
        if not self.redact or flow.metadata.get(METADATA_KEY, {}).get("role") == "upstream":
            return
        # The client's own key must not end up in a saved flow file either.
        fields = list(flow.request.headers.items(multi=True))
        safe = redact_headers(fields, account_id="client", secrets=())
        if safe != fields:
            flow.request.headers = http.Headers(
                [(k.encode("latin-1"), v.encode()) for k, v in safe]
            )


async def trigger_listeners(manager: AddonManager, hook: hooks.Hook) -> None:
    """`manager.trigger_event(hook)`, passing over the addons that lack the hook.

    mitmproxy's own pass costs a few microseconds for every addon (about 35
    under mitmdump), whether it has the hook or not; a recorded turn runs
    seven hooks, some of which (`update`, `websocket_start`) no addon of
    mitmdump has. Each addon that has it is invoked as mitmproxy invokes it:
    in chain order, its errors logged, `AddonHalt` ending the pass.
    """
    name = hook.name
    for addon in manager.chain:
        if not any(callable(getattr(a, name, None)) for a in traverse([addon])):
            continue
        try:
            with safecall():
                await manager.invoke_addon(addon, hook)
        except exceptions.AddonHalt:
            return
