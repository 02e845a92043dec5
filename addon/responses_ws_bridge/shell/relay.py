"""Relays one turn from an upstream session to the client: SSE or one JSON body.

The client sees nothing until the first upstream event arrives, so that every
failure before it can still become a retry or a plain HTTP error. After that,
events are written as they come, several in one write when several had already
arrived, and never held back to wait for more. `codex.rate_limits` frames are
not Responses events: they are handed to `on_rate_limits` and reach the
client as `x-codex-*` response headers instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from responses_ws_bridge.core import sse
from responses_ws_bridge.core.create_request import CreateRequest
from responses_ws_bridge.core.failures import AttemptFailed
from responses_ws_bridge.core.openai_errors import HttpError
from responses_ws_bridge.core.rate_limits import FRAME_TYPE, RateLimits, from_frame, to_headers
from responses_ws_bridge.core.upstream_events import (
    OUTPUT_ITEM_DONE,
    final_response,
    inspect_event,
    output_item,
    parse_error_event,
    with_output,
)
from responses_ws_bridge.shell.sink import ClientSink
from responses_ws_bridge.shell.upstream_client import UpstreamSession

RateLimitsSeen = Callable[[RateLimits], None]


@dataclass
class ClientStream:
    """What the client has been sent so far, and how to send it more."""

    sink: ClientSink
    headers: list[tuple[str, str]]
    keepalive_s: float | None
    events_sent: int = 0
    last_sequence: int | None = None
    response_id: str | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    # The serving account's latest figures, sent as x-codex-* headers.
    rate_limits: RateLimits | None = None
    # Called with the response id when the response completed, before the client gets
    # the terminal event (to publish the response's owner in a shared store): no client
    # can then ask another instance about the response before its owner is known there,
    # and a response that failed is owned by nobody.
    on_response_id: Callable[[str], Awaitable[None]] | None = None

    @property
    def has_seen_event(self) -> bool:
        return self.events_sent > 0

    def publish_response_id(self, hook: Callable[[str], Awaitable[None]] | None) -> None:
        """Set `on_response_id` for the next attempt (a retry's response is a new one)."""
        self.on_response_id = hook

    def note_response_id(self, response_id: str) -> None:
        self.response_id = response_id

    async def published(self, terminal_type: str | None) -> None:
        """Publishes a completed response's owner (see `on_response_id`)."""
        if (
            self.on_response_id is not None
            and terminal_type == "response.completed"
            and self.response_id is not None
        ):
            await self.on_response_id(self.response_id)

    async def send_error(self, error: HttpError) -> None:
        headers = [*self.headers, *error.headers]
        await self.sink.respond(error.status, headers, error.body)

    async def send_json(self, body: bytes) -> None:
        headers = [
            *self.headers,
            *self.extra_headers,
            *to_headers(self.rate_limits),
            ("content-type", "application/json"),
        ]
        await self.sink.respond(200, headers, body)

    async def start_sse(self) -> None:
        await self.sink.start(
            200,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
                *self.headers,
                *self.extra_headers,
                *to_headers(self.rate_limits),
            ],
        )

    async def fail_incomplete(self, code: int | None, reason: str) -> None:
        """The upstream broke after the client saw events: no replay, say so and end."""
        sequence = 0 if self.last_sequence is None else self.last_sequence + 1
        event = sse.stream_incomplete_event(
            close_code=code, reason=reason, response_id=self.response_id, sequence_number=sequence
        )
        text = json.dumps(event, separators=(",", ":"))
        await self.sink.write(sse.encode_event(text, "response.failed"))
        await self.sink.finish()


@dataclass(frozen=True)
class TurnDone:
    """The turn reached its terminal event and the client has all of it."""

    terminal_type: str
    response_id: str | None


async def relay_turn(
    session: UpstreamSession,
    create: CreateRequest,
    client: ClientStream,
    on_rate_limits: RateLimitsSeen | None = None,
) -> TurnDone:
    """Sends `response.create` and relays events until the terminal one.

    Raises `AttemptFailed` when the upstream ends first, or answers with an
    `error` event before anything reached the client; the caller decides what
    the client gets then (it can tell from `client.has_seen_event`).
    """
    await session.send(create.message)
    seen = on_rate_limits or _ignore
    if create.stream:
        return await _relay_sse(session, client, seen)
    return await _collect_json(session, client, seen)


def _ignore(_: RateLimits) -> None:
    pass


def _rate_limits(frame: str, seen: RateLimitsSeen) -> None:
    limits = from_frame(frame)
    if limits is not None:
        seen(limits)


async def _relay_sse(
    session: UpstreamSession, client: ClientStream, seen: RateLimitsSeen
) -> TurnDone:
    sink = client.sink
    while True:
        if client.events_sent and client.keepalive_s:
            try:
                async with asyncio.timeout(client.keepalive_s):
                    batch = await session.next_batch()
            except TimeoutError:
                # Upstream silence: a comment keeps intermediaries from timing out.
                await sink.write(sse.KEEPALIVE)
                continue
        else:
            batch = await session.next_batch()
        out: list[bytes] = []
        terminal: str | None = None
        for frame in batch:
            info = inspect_event(frame)
            if info.type == FRAME_TYPE:
                _rate_limits(frame, seen)
                continue
            if info.type == "error" and not client.events_sent and not out:
                _refuse(frame)
            out.append(sse.encode_event(frame, info.type))
            if info.sequence_number is not None:
                client.last_sequence = info.sequence_number
            if info.response_id is not None:
                client.note_response_id(info.response_id)
            if info.terminal:
                terminal = info.type
                break
        if not out:
            continue
        if not client.events_sent:
            await client.start_sse()
        client.events_sent += len(out)
        if terminal is not None:
            await client.published(terminal)
        await sink.write(out[0] if len(out) == 1 else b"".join(out))
        if terminal is not None:
            await sink.finish()
            return TurnDone(terminal, client.response_id)


async def _collect_json(
    session: UpstreamSession, client: ClientStream, seen: RateLimitsSeen
) -> TurnDone:
    """A client that did not ask to stream gets the final response object.

    Its `output` is assembled from the `response.output_item.done` items when
    the terminal event leaves it empty, as the Codex backend does.
    """
    items: list[tuple[int | None, dict[str, Any]]] = []
    while True:
        for frame in await session.next_batch():
            info = inspect_event(frame)
            if info.type == FRAME_TYPE:
                _rate_limits(frame, seen)
                continue
            if info.type == OUTPUT_ITEM_DONE:
                found = output_item(frame)
                if found is not None:
                    items.append(found)
                continue
            if info.response_id is not None:
                client.note_response_id(info.response_id)
            if not info.terminal:
                continue
            if info.type == "error":
                _refuse(frame)
                continue
            response = final_response(frame)
            body = json.dumps(with_output(response, items) if response is not None else {}).encode()
            await client.published(info.type)
            await client.send_json(body)
            assert info.type is not None
            return TurnDone(info.type, client.response_id)


def _refuse(frame: str) -> None:
    """An `error` event before the client saw anything: the attempt failed with it."""
    error = parse_error_event(frame, wall_now=time.time())
    if error is not None:
        raise AttemptFailed(error)
