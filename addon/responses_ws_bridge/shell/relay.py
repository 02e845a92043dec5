"""Relays one turn from an upstream session to the client: SSE or one JSON body.

The client sees nothing until the first upstream event arrives, so that every
failure before it can still become a retry or a plain HTTP error. After that,
events are written as they come, several in one write when several had already
arrived, and never held back to wait for more. `codex.rate_limits` frames are
not Responses events: they are handed to `on_rate_limits` and reach the
client as `x-codex-*` response headers instead.

Two things end a turn here that the upstream did not end: a frame no client
could read back as the event it is (`InvalidUpstreamEvent`), and no frame at
all for `idle_timeout_s` (`UpstreamSilent`; separate from the keepalive
comment, which only tells intermediaries the stream is alive). Both are
raised as attempt failures once what came before them reached the client.
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
from responses_ws_bridge.core.failures import (
    AttemptFailed,
    Failure,
    InvalidUpstreamEvent,
    UpstreamSilent,
)
from responses_ws_bridge.core.openai_errors import HttpError
from responses_ws_bridge.core.rate_limits import FRAME_TYPE, RateLimits, from_frame, to_headers
from responses_ws_bridge.core.redaction import NO_SECRETS, SecretScrubber
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
# Upstream frames whose text is the upstream's own error message: scrubbed before relaying.
_SCRUBBED_TYPES = frozenset({"error", "response.failed"})


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
    # Cuts known secrets out of upstream-chosen text before the client gets it.
    scrub: SecretScrubber = NO_SECRETS

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
        """An HTTP error instead of the stream; upstream text in it is scrubbed first."""
        error = self.scrub.error(error)
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
        event = sse.stream_incomplete_event(
            close_code=code,
            reason=reason,
            response_id=self.response_id,
            sequence_number=self._next_sequence(),
            scrub=self.scrub,
        )
        await self._end_with(event)

    async def fail_after_events(self, failure: Failure, close_code: int | None) -> None:
        """The `response.failed` that ends a stream the upstream broke off mid-way."""
        sequence = self._next_sequence()
        if isinstance(failure, UpstreamSilent):
            await self._end_with(
                sse.stream_idle_event(
                    idle_s=failure.idle_s, response_id=self.response_id, sequence_number=sequence
                )
            )
        elif isinstance(failure, InvalidUpstreamEvent):
            await self._end_with(
                sse.invalid_event_failed(
                    reason=failure.reason, response_id=self.response_id, sequence_number=sequence
                )
            )
        else:
            reason = getattr(failure, "reason", "")
            await self.fail_incomplete(close_code, reason if isinstance(reason, str) else "")

    def _next_sequence(self) -> int:
        return 0 if self.last_sequence is None else self.last_sequence + 1

    async def _end_with(self, event: dict[str, Any]) -> None:
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
    *,
    idle_timeout_s: float | None = None,
) -> TurnDone:
    """Sends `response.create` and relays events until the terminal one.

    Raises `AttemptFailed` when the upstream ends first, sends a frame that
    cannot be relayed, stays silent for `idle_timeout_s` (None: forever), or
    answers with an `error` event before anything reached the client; the
    caller decides what the client gets then (it can tell from
    `client.has_seen_event`).
    """
    await session.send(create.message)
    seen = on_rate_limits or _ignore
    upstream = _Silence(session, idle_timeout_s or None)
    if create.stream:
        return await _relay_sse(upstream, client, seen)
    return await _collect_json(upstream, client, seen)


class _Silence:
    """The session's frames, with a deadline: `idle_s` after the last frame."""

    def __init__(self, session: UpstreamSession, idle_s: float | None) -> None:
        self._session = session
        self.idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()

    async def next_batch(self, keepalive_s: float | None = None) -> list[str | bytes] | None:
        """The next frames; None when `keepalive_s` passed first (a keepalive is due).

        Raises `AttemptFailed(UpstreamSilent)` once `idle_s` passed without a frame.
        """
        idle_left = None if self.idle_s is None else self.idle_s - (self._loop.time() - self._last)
        if idle_left is not None and idle_left <= 0:
            raise AttemptFailed(UpstreamSilent(self.idle_s or 0.0))
        waits = [w for w in (keepalive_s, idle_left) if w is not None]
        if not waits:
            batch = await self._session.next_batch()
        else:
            wait = min(waits)
            try:
                async with asyncio.timeout(wait):
                    batch = await self._session.next_batch()
            except TimeoutError:
                if idle_left is not None and idle_left <= wait:
                    raise AttemptFailed(UpstreamSilent(self.idle_s or 0.0)) from None
                return None
        self._last = self._loop.time()
        return batch


def _ignore(_: RateLimits) -> None:
    pass


def _rate_limits(frame: str, seen: RateLimitsSeen) -> None:
    limits = from_frame(frame)
    if limits is not None:
        seen(limits)


async def _relay_sse(upstream: _Silence, client: ClientStream, seen: RateLimitsSeen) -> TurnDone:
    sink = client.sink
    while True:
        keepalive = client.keepalive_s if client.events_sent else None
        batch = await upstream.next_batch(keepalive or None)
        if batch is None:
            # Upstream silence: a comment keeps intermediaries from timing out.
            await sink.write(sse.KEEPALIVE)
            continue
        out: list[bytes] = []
        terminal: str | None = None
        invalid: str | None = None
        for frame in batch:
            if isinstance(frame, bytes):
                invalid = "a binary frame"
                break
            info = inspect_event(frame)
            if info.type == FRAME_TYPE:
                _rate_limits(frame, seen)
                continue
            if info.type == "error" and not client.events_sent and not out:
                _refuse(frame)
            if info.type in _SCRUBBED_TYPES:
                frame = client.scrub(frame)
            try:
                out.append(sse.encode_upstream_event(frame, info.type))
            except sse.UnencodableEvent as exc:
                invalid = exc.reason
                break
            if info.sequence_number is not None:
                client.last_sequence = info.sequence_number
            if info.response_id is not None:
                client.note_response_id(info.response_id)
            if info.terminal:
                terminal = info.type
                break
        if out:
            if not client.events_sent:
                await client.start_sse()
            client.events_sent += len(out)
            if terminal is not None:
                await client.published(terminal)
            await sink.write(out[0] if len(out) == 1 else b"".join(out))
        if invalid is not None:
            # What came before it is the client's; the turn ends here, never with a cut.
            raise AttemptFailed(InvalidUpstreamEvent(invalid))
        if terminal is not None:
            await sink.finish()
            return TurnDone(terminal, client.response_id)


async def _collect_json(upstream: _Silence, client: ClientStream, seen: RateLimitsSeen) -> TurnDone:
    """A client that did not ask to stream gets the final response object.

    Its `output` is assembled from the `response.output_item.done` items when
    the terminal event leaves it empty, as the Codex backend does.
    """
    items: list[tuple[int | None, dict[str, Any]]] = []
    while True:
        batch = await upstream.next_batch()
        for frame in batch or ():
            if isinstance(frame, bytes):
                raise AttemptFailed(InvalidUpstreamEvent("a binary frame"))
            info = inspect_event(frame)
            if info.type is None:
                raise AttemptFailed(InvalidUpstreamEvent("not a JSON object of finite numbers"))
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
            response = final_response(
                client.scrub(frame) if info.type in _SCRUBBED_TYPES else frame
            )
            if response is None:
                raise AttemptFailed(InvalidUpstreamEvent("not a JSON object of finite numbers"))
            body = json.dumps(with_output(response, items)).encode()
            await client.published(info.type)
            await client.send_json(body)
            assert info.type is not None
            return TurnDone(info.type, client.response_id)


def _refuse(frame: str) -> None:
    """An `error` event before the client saw anything: the attempt failed with it."""
    error = parse_error_event(frame, wall_now=time.time())
    if error is not None:
        raise AttemptFailed(error)
