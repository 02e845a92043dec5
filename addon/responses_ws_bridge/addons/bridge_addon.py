"""The mitmproxy addon: picks out Responses requests and routes them to the bridge.

A bridged flow is answered by the loopback endpoint (see `loopback`): the
`request` hook parses and checks the request, registers the turn under a
one-time token and points the flow at 127.0.0.1; `responseheaders` puts the
flow's original destination back (so mitmweb shows the URL the client used)
and streams the answer; `response` keeps the streamed SSE body for display.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons import contentview
from responses_ws_bridge.core import openai_errors, routing
from responses_ws_bridge.core.accounts import AccountsFileError, client_key_ok, secrets_of
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.create_request import BadRequest, parse_create_request
from responses_ws_bridge.core.handshake_headers import UpstreamCredential, client_request_id
from responses_ws_bridge.core.redaction import redact_headers
from responses_ws_bridge.recording.recorder import HookEmitter, SessionFlowTap
from responses_ws_bridge.shell.accounts_file import AccountsFile
from responses_ws_bridge.shell.bridge_service import (
    Attempt,
    BridgeService,
    BridgeSettings,
    Destination,
    Turn,
    TurnReport,
)
from responses_ws_bridge.shell.loopback import TOKEN_HEADER, LoopbackServer
from responses_ws_bridge.shell.upstream_client import SessionTap, UpstreamSettings

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
METADATA_KEY = "responses_bridge"
ACCOUNTS_POLL_S = 1.0


@dataclass
class _Routed:
    """A flow currently detoured through the loopback endpoint."""

    token: str
    destination: Destination
    flow: http.HTTPFlow
    body: bytearray = field(default_factory=bytearray)


class _Tap:
    """Keeps a copy of the streamed body so mitmweb can show it afterwards."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    def __call__(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        return chunk


class ResponsesBridge:
    def __init__(self) -> None:
        self.loopback = LoopbackServer()
        self.service = BridgeService(BridgeSettings())
        self.max_body = 32 * MiB
        self._routed: dict[str, _Routed] = {}
        self._accounts: AccountsFile | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._emitter: HookEmitter | None = None
        self.record = True
        self.redact = True
        self.service.tap_factory = self._tap_for

    # -- options -----------------------------------------------------------

    def load(self, loader: Loader) -> None:
        # Responses events, readable in mitmweb and the console (WebSocket and SSE).
        contentview.register()
        loader.add_option(
            "bridge_upstream",
            str,
            "",
            "Upstream Responses WebSocket URL for every bridged request (ws:// or wss://). "
            "Empty: the account's upstream, else the request's own destination (https→wss).",
        )
        loader.add_option(
            "bridge_accounts",
            str,
            "",
            "JSON file of upstream accounts (and client keys). Empty: pass-through mode, "
            "the client's own Authorization goes upstream. Edits are picked up live.",
        )
        loader.add_option(
            "bridge_connect_timeout",
            str,
            "10",
            "Seconds to open an upstream WebSocket (TCP, TLS and handshake).",
        )
        loader.add_option(
            "bridge_max_message_size",
            int,
            32 * MiB,
            "Largest upstream WebSocket message accepted, in bytes (0: no limit).",
        )
        loader.add_option(
            "bridge_ping_interval",
            str,
            "20",
            "Seconds between WebSocket pings to the upstream (0: no pings).",
        )
        loader.add_option(
            "bridge_ping_timeout",
            str,
            "20",
            "Seconds to wait for a pong before the upstream counts as lost (0: wait forever).",
        )
        loader.add_option(
            "bridge_compression", bool, False, "Offer permessage-deflate to the upstream."
        )
        loader.add_option(
            "bridge_max_body",
            int,
            32 * MiB,
            "Largest Responses request body the bridge accepts, in bytes (larger: 413).",
        )
        loader.add_option(
            "bridge_sse_keepalive",
            str,
            "15",
            "Seconds of upstream silence after which an SSE comment is sent (0: never).",
        )
        loader.add_option(
            "bridge_record",
            bool,
            True,
            "Record every upstream WebSocket session as a flow (mitmweb, -w, replay).",
        )
        loader.add_option(
            "bridge_redact",
            bool,
            True,
            "Redact credentials in recorded upstream sessions (off: for local debugging only).",
        )
        loader.add_option(
            "bridge_retry_budget",
            int,
            2,
            "Retries of a request whose upstream failed before the client saw any event.",
        )
        loader.add_option(
            "bridge_session_idle_ttl",
            str,
            "120",
            "Seconds an upstream WebSocket stays open after a turn, for the next request of "
            "the same affinity key and account (0: no reuse).",
        )
        loader.add_option(
            "bridge_binding_max",
            int,
            100_000,
            "Most affinity bindings (key → account) and response owners kept in memory.",
        )
        loader.add_option(
            "bridge_binding_ttl",
            str,
            "86400",
            "Seconds an unused affinity binding or response owner is kept.",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("bridge_") for name in updated):
            return
        opts = ctx.options
        if opts.bridge_upstream:
            try:
                routing.validate_upstream_option(opts.bridge_upstream)
            except ValueError as exc:
                raise exceptions.OptionsError(f"bridge_upstream: {exc}") from exc
        connect_timeout = _seconds(opts, "bridge_connect_timeout")
        if connect_timeout == 0:
            raise exceptions.OptionsError("bridge_connect_timeout must be positive")
        for name in ("bridge_max_body", "bridge_binding_max"):
            if getattr(opts, name) <= 0:
                raise exceptions.OptionsError(f"{name} must be positive")
        for name in ("bridge_max_message_size", "bridge_retry_budget"):
            if getattr(opts, name) < 0:
                raise exceptions.OptionsError(f"{name} must not be negative")
        settings = BridgeSettings(
            upstream_option=opts.bridge_upstream,
            upstream=UpstreamSettings(
                connect_timeout=connect_timeout,
                max_message_size=opts.bridge_max_message_size or None,
                ping_interval=_seconds(opts, "bridge_ping_interval") or None,
                ping_timeout=_seconds(opts, "bridge_ping_timeout") or None,
                compression=opts.bridge_compression,
                trusted_ca=opts.ssl_verify_upstream_trusted_ca or None,
                trusted_ca_dir=opts.ssl_verify_upstream_trusted_confdir or None,
                insecure=opts.ssl_insecure,
            ),
            sse_keepalive_s=_seconds(opts, "bridge_sse_keepalive") or None,
            retry_budget=opts.bridge_retry_budget,
            session_idle_ttl_s=_seconds(opts, "bridge_session_idle_ttl"),
            binding_max=opts.bridge_binding_max,
            binding_ttl_s=_seconds(opts, "bridge_binding_ttl") or float("inf"),
        )
        if "bridge_accounts" in updated:
            self._load_accounts(opts.bridge_accounts)
        self.max_body = opts.bridge_max_body
        self.record = opts.bridge_record
        self.redact = opts.bridge_redact
        self.service.apply_settings(settings)

    def _load_accounts(self, path: str) -> None:
        if not path:
            self._accounts = None
            self.service.set_accounts(None)
            return
        accounts = AccountsFile(path)
        try:
            config = accounts.load()
        except AccountsFileError as exc:
            # mitmproxy keeps the previous value (and so the previous pool) in force.
            raise exceptions.OptionsError(f"bridge_accounts: {exc}") from exc
        self._accounts = accounts
        self.service.set_accounts(config)
        logger.info(
            "bridge accounts: %s (%s)",
            ", ".join(a.id for a in config.accounts),
            "client keys required" if config.client_keys else "no client keys",
        )

    # -- lifecycle -----------------------------------------------------------

    async def running(self) -> None:
        port = await self.loopback.start()
        self._emitter = HookEmitter(ctx.master.addons.handle_lifecycle)
        self._watcher = asyncio.ensure_future(self._watch_accounts())
        logger.info("Responses bridge ready (loopback endpoint on 127.0.0.1:%d)", port)

    async def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.service.shutdown()
        await self.loopback.stop()
        if self._emitter is not None:
            await self._emitter.drain()
        contentview.unregister()

    def _tap_for(self, turn: Turn, attempt: Attempt) -> SessionTap | None:
        if not self.record or self._emitter is None:
            return None
        accounts = self.service.accounts
        secrets = secrets_of(accounts) if accounts is not None else []
        if turn.client_credential is not None:
            secrets.append(turn.client_credential.bearer)
        return SessionFlowTap(
            url=attempt.url,
            turn=turn,
            attempt=attempt,
            find_client_flow=self._client_flow,
            emit=self._emitter,
            redact=self.redact,
            secrets=secrets,
        )

    async def _watch_accounts(self) -> None:
        """Reloads the accounts file when it changes on disk, like mitmproxy's script reload."""
        while True:
            await asyncio.sleep(ACCOUNTS_POLL_S)
            accounts = self._accounts
            if accounts is None or not accounts.changed():
                continue
            try:
                config = accounts.load()
            except AccountsFileError as exc:
                accounts.mark_seen()
                logger.error("bridge_accounts: %s; the previous accounts stay in force", exc)
                continue
            self.service.set_accounts(config)
            logger.info("bridge accounts reloaded: %s", ", ".join(a.id for a in config.accounts))

    # -- hooks -----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._wants(flow):
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            # Refuse before mitmproxy reads a body we would refuse anyway.
            self._answer(flow, openai_errors.request_too_large(int(length), self.max_body))

    def request(self, flow: http.HTTPFlow) -> None:
        if not self._wants(flow) or flow.response is not None:
            return
        if not self.loopback.running:
            self._answer(flow, openai_errors.bridge_not_ready())
            return
        accounts = self.service.accounts
        if accounts is not None and not client_key_ok(
            accounts, flow.request.headers.get("authorization")
        ):
            self._answer(flow, openai_errors.unauthorized_client_key())
            return
        body = flow.request.raw_content
        if body is None:  # streamed by mitmproxy (stream_large_bodies): too large for us
            self._answer(flow, openai_errors.request_too_large(None, self.max_body))
            return
        try:
            create = parse_create_request(
                flow.request.get_content(strict=False) or b"", max_body=self.max_body
            )
        except BadRequest as exc:
            self._answer(flow, openai_errors.bad_request(exc))
            return
        headers = tuple(flow.request.headers.items(multi=True))
        request_id = client_request_id(headers) or f"req_{uuid.uuid4().hex}"
        destination = Destination(
            flow.request.scheme, flow.request.host, flow.request.port, flow.request.path
        )
        turn = Turn(
            flow_id=flow.id,
            create=create,
            client_headers=headers,
            request_id=request_id,
            destination=destination,
            affinity=classify(headers, create.body),
            client_credential=(
                _client_credential(flow.request.headers) if self.service.pool is None else None
            ),
        )
        service = self.service
        # Known before the job starts: with an eager task factory it runs
        # (and asks for its client flow) inside register().
        routed = self._routed[flow.id] = _Routed("", destination, flow)
        token = routed.token = self.loopback.register(lambda sink: service.serve(turn, sink))
        # Detour to the loopback endpoint. `data.*` leaves the Host header as
        # the client sent it; the destination is restored in responseheaders.
        flow.request.data.scheme = b"http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = self.loopback.port
        flow.request.headers[TOKEN_HEADER] = token
        flow.metadata[METADATA_KEY] = {
            "role": "client",
            "request_id": request_id,
            "affinity": turn.affinity.kind.value,
            "key": turn.affinity.key,
        }

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.get(flow.id)
        if routed is None or flow.response is None:
            return
        self._restore(flow, routed)
        flow.response.stream = _Tap(routed.body)

    def response(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.pop(flow.id, None)
        if routed is None or flow.response is None:
            return
        flow.response.content = bytes(routed.body)
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.pop(flow.id, None)
        if routed is not None:
            self.loopback.discard(routed.token)
            self._restore(flow, routed)
            self._annotate(flow)

    def _client_flow(self, flow_id: str) -> http.HTTPFlow | None:
        routed = self._routed.get(flow_id)
        return routed.flow if routed is not None else None

    # -- commands ----------------------------------------------------------------

    @command.command("bridge.accounts")
    def accounts_command(self) -> str:
        """Upstream accounts: health, requests in flight, cooldown, requests served."""
        pool = self.service.pool
        if pool is None:
            return "pass-through mode: no accounts file (bridge_accounts is empty)"
        rows = [("account", "health", "in flight", "cooldown until", "served")]
        for row in pool.snapshot():
            until = (
                time.strftime("%H:%M:%S", time.localtime(time.time() + row.cooldown_remaining_s))
                if row.cooldown_remaining_s
                else "-"
            )
            rows.append((row.id, row.health, str(row.in_flight), until, str(row.served)))
        return _table(rows)

    @command.command("bridge.sessions")
    def sessions_command(self) -> str:
        """Affinity keys: kind, bound account, idle upstream sockets, idle for."""
        idle = {key: (count, age) for key, count, age in self.service.sessions.snapshot()}
        rows = [("key", "kind", "account", "idle sockets", "idle for")]
        now = time.monotonic()
        for entry in self.service.bindings.items():
            count, age = idle.pop((entry.key, entry.binding.account_id), (0, now - entry.last_used))
            rows.append(
                (
                    entry.key,
                    entry.binding.kind.value,
                    entry.binding.account_id,
                    str(count),
                    f"{age:.0f}s",
                )
            )
        for (key, account), (count, age) in idle.items():
            rows.append((key or "-", "-", account or "(client)", str(count), f"{age:.0f}s"))
        return _table(rows)

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _wants(flow: http.HTTPFlow) -> bool:
        return routing.is_bridged(flow.request.method, flow.request.path)

    @staticmethod
    def _answer(flow: http.HTTPFlow, error: openai_errors.HttpError) -> None:
        headers = http.Headers([(k.encode(), v.encode()) for k, v in error.headers])
        flow.response = http.Response.make(error.status, error.body, headers)

    @staticmethod
    def _restore(flow: http.HTTPFlow, routed: _Routed) -> None:
        destination = routed.destination
        flow.request.data.scheme = destination.scheme.encode()
        flow.request.data.host = destination.host
        flow.request.data.port = destination.port
        flow.request.headers.pop(TOKEN_HEADER, None)

    def _annotate(self, flow: http.HTTPFlow) -> None:
        if self.redact:
            # The client's own key must not end up in a saved flow file either.
            fields = list(flow.request.headers.items(multi=True))
            safe = redact_headers(fields, account_id="client", secrets=())
            if safe != fields:
                flow.request.headers = http.Headers(
                    [(k.encode("latin-1"), v.encode()) for k, v in safe]
                )
        report = self.service.reports.pop(flow.id, None)
        meta: dict[str, Any] = flow.metadata.setdefault(METADATA_KEY, {"role": "client"})
        if report is None:
            return
        meta.update(
            account=report.account,
            outcome=report.outcome,
            attempts=[a.as_dict() for a in report.attempts],
            upstream_flows=[a.upstream_flow for a in report.attempts if a.upstream_flow],
        )
        flow.comment = _describe(report)


def _describe(report: TurnReport) -> str:
    affinity = report.affinity
    head = f"bridged · {affinity.kind.value}"
    if affinity.key:
        head += f" {affinity.key}"
    head += f" · account {report.account or '(client credential)'} · {report.outcome}"
    return "\n".join([head, *(_describe_attempt(a) for a in report.attempts)])


def _describe_attempt(attempt: Attempt) -> str:
    parts = [f"attempt {attempt.number}: {attempt.account or '(client)'}", attempt.outcome]
    if attempt.reused:
        parts.append("reused socket")
    if attempt.close_code is not None:
        parts.append(f"close {attempt.close_code}")
    if attempt.detail:
        parts.append(attempt.detail)
    return " · ".join(parts)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _seconds(opts: object, name: str) -> float:
    """Durations are string options: mitmproxy's --set parses no floats."""
    raw = getattr(opts, name)
    try:
        value = float(raw)
    except ValueError:
        raise exceptions.OptionsError(f"{name}: {raw!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise exceptions.OptionsError(f"{name}: must be a finite number of seconds >= 0")
    return value


def _client_credential(headers: http.Headers) -> UpstreamCredential | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return UpstreamCredential(token.strip(), headers.get("chatgpt-account-id") or None)
