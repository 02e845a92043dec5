"""Serves one bridged request end to end: choose where, open, relay, decide on failure.

This is the shell around the pure decisions: it asks `routing` for the URL,
`handshake_headers` for the headers, opens the upstream with `upstream_client`,
relays with `relay`, and maps every failure to what the client gets through
`openai_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from addon import openai_errors, routing
from addon.create_request import CreateRequest
from addon.handshake_headers import UpstreamCredential, upstream_handshake_headers
from addon.loopback import ResponseSink
from addon.relay import ClientStream, TurnRefused, relay_turn
from addon.upstream_client import (
    CLOSE_GOING_AWAY,
    ConnectFailed,
    HandshakeRejected,
    SessionTap,
    UpstreamClosed,
    UpstreamSession,
    UpstreamSettings,
    open_session,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    """Where the client meant to send the request (before the loopback detour)."""

    scheme: str
    host: str
    port: int
    path: str


@dataclass(frozen=True)
class Turn:
    """Everything decided about one client request in the `request` hook."""

    flow_id: str
    create: CreateRequest
    client_headers: tuple[tuple[str, str], ...]
    request_id: str
    destination: Destination
    # Pass-through mode: the client's own credential, placed deliberately.
    client_credential: UpstreamCredential | None


@dataclass(frozen=True)
class BridgeSettings:
    upstream_option: str = ""
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sse_keepalive_s: float | None = 15.0


@dataclass
class TurnReport:
    """What happened to a turn, for the client flow's metadata and the log."""

    outcome: str = "pending"
    status: int | None = None
    attempts: list[dict[str, object]] = field(default_factory=list)


class BridgeService:
    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.reports: dict[str, TurnReport] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def tap_for(self, turn: Turn, attempt: int) -> SessionTap | None:
        """Overridden by the recorder; no recording by default."""
        return None

    async def serve(self, turn: Turn, sink: ResponseSink) -> None:
        report = self.reports.setdefault(turn.flow_id, TurnReport())
        client = ClientStream(
            sink=sink,
            stream=turn.create.stream,
            headers=[("x-request-id", turn.request_id)],
            keepalive_s=self.settings.sse_keepalive_s,
        )
        try:
            url = routing.upstream_url(
                option=self.settings.upstream_option,
                account_upstream=None,
                scheme=turn.destination.scheme,
                host=turn.destination.host,
                port=turn.destination.port,
                path=turn.destination.path,
            )
        except ValueError as exc:
            await self._fail(client, report, openai_errors.upstream_unreachable(str(exc)))
            return
        headers = upstream_handshake_headers(
            turn.client_headers, turn.client_credential, request_id=turn.request_id
        )
        attempt: dict[str, object] = {"account": None, "url": url}
        report.attempts.append(attempt)
        try:
            session = await open_session(
                url, headers, self.settings.upstream, tap=self.tap_for(turn, len(report.attempts))
            )
        except HandshakeRejected as exc:
            attempt.update(outcome="rejected", status=exc.status)
            error = openai_errors.upstream_rejected(exc.status, exc.body, dict(exc.headers))
            await self._fail(client, report, error)
            return
        except ConnectFailed as exc:
            attempt.update(outcome="connect_failed", detail=exc.detail)
            error = (
                openai_errors.upstream_timeout(exc.detail)
                if exc.timed_out
                else openai_errors.upstream_unreachable(exc.detail)
            )
            await self._fail(client, report, error)
            return
        await self._relay(session, turn, client, report, attempt)

    async def _relay(
        self,
        session: UpstreamSession,
        turn: Turn,
        client: ClientStream,
        report: TurnReport,
        attempt: dict[str, object],
    ) -> None:
        turn_state = next(
            (v for k, v in session.response_headers if k.lower() == "x-codex-turn-state"), None
        )
        if turn_state is not None:
            client.extra_headers.append(("x-codex-turn-state", turn_state))
        finished = False
        try:
            result = await relay_turn(session, turn.create, client)
            if isinstance(result, TurnRefused):
                attempt.update(outcome="error_event", code=result.error.code)
                await self._fail(client, report, openai_errors.from_error_event(result.error))
            else:
                attempt.update(outcome="completed", terminal=result.terminal_type)
                report.outcome, report.status = result.terminal_type, 200
            finished = True
        except UpstreamClosed as exc:
            attempt.update(outcome="closed", close_code=exc.code, reason=exc.reason)
            if client.has_seen_event:
                report.outcome, report.status = "stream_incomplete", 200
                await client.fail_incomplete(exc.code, exc.reason)
            else:
                await self._fail(
                    client, report, openai_errors.upstream_closed(exc.code, exc.reason)
                )
        finally:
            if not finished:
                attempt.setdefault("outcome", "client_gone")
            self._close_later(session, finished)

    def _close_later(self, session: UpstreamSession, finished: bool) -> None:
        # Closing waits for the upstream's close frame; the client must not.
        if not session.is_open:
            return
        code = 1000 if finished else CLOSE_GOING_AWAY
        reason = "" if finished else "client went away"
        task = asyncio.ensure_future(session.close(code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _fail(
        self, client: ClientStream, report: TurnReport, error: openai_errors.HttpError
    ) -> None:
        report.outcome, report.status = "error", error.status
        await client.send_error(error)

    async def shutdown(self) -> None:
        if self._closing:
            await asyncio.wait(self._closing, timeout=5)
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
