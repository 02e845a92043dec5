"""Upstream frames into what the client is sent: SSE bytes, or one JSON body. Pure.

`SseRelay.take(frames)` turns one batch of frames (every frame that had
arrived) into one write: the client sees nothing until the first event, so a
failure before it can still be retried. `JsonRelay.take(frames)` collects a
non-streaming client's answer until the terminal event. Both keep what the
client has seen (events, last sequence number, response id), which is what
the ending of a broken stream and the retry decision need, and which events
are for this client at all (`client_events`).

What a frame does to a batch:

| frame                                      | SSE                         | JSON           |
|--------------------------------------------|-----------------------------|----------------|
| `codex.rate_limits`                        | figures, not relayed        | figures        |
| `response.metadata` & co.                  | its headers learned; relayed| headers learned|
|                                            | or dropped by client kind   |                |
| another vendor event                       | relayed or dropped by kind  | ignored        |
| `response.created` / `in_progress` /       | held (with `hold`) until    | noted          |
| `queued` before any output                 | the first output event      |                |
| `error` before anything reached the client | refused: the attempt failed | refused        |
| `response.failed` before anything reached  | refused when its error is   | refused when   |
| the client                                 | retryable, else relayed     | retryable      |
| binary, not a JSON object, a forged type   | invalid: what came before   | invalid        |
|                                            | it is written               |                |
| any other event (output)                   | written, with what was held | noted          |
| a terminal event                           | written, the end            | the body       |

Held events are written with the first output event, or when the turn's
hold window ends (`release`, the engine's timer); a refusal drops them, so a
retry is invisible to the client.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from responses_ws_bridge.core import answer_headers, sse
from responses_ws_bridge.core.client_events import (
    HELD_TYPES,
    METADATA_TYPES,
    RATE_LIMITS_TYPE,
    ClientKind,
    Disposition,
    disposition,
    is_public,
)
from responses_ws_bridge.core.error_classes import RETRYABLE
from responses_ws_bridge.core.failures import (
    Failure,
    InvalidUpstreamEvent,
    UpstreamErrorEvent,
    UpstreamSilent,
)
from responses_ws_bridge.core.rate_limits import RateLimits, from_frame
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.upstream_events import (
    OUTPUT_ITEM_DONE,
    EventInfo,
    final_response,
    info_of,
    inspect_event,
    load_event,
    output_item,
    parse_error_event,
    parse_failed_response,
    with_output,
)

# Upstream frames whose text is the upstream's own error message: scrubbed of anything
# key-shaped too. Every other frame loses the known secrets only.
SCRUBBED_TYPES = frozenset({"error", "response.failed"})
_NOT_JSON = "not a JSON object of finite numbers"
_FAILED = "response.failed"


@dataclass
class Step:
    """What one batch of frames comes to."""

    # SSE bytes for the client (b"": nothing to write); the first write starts the stream.
    out: bytes = b""
    events: int = 0
    figures: list[RateLimits] = field(default_factory=list)
    # Answer headers a metadata event told (`answer_headers`), by name.
    learned: dict[str, str] = field(default_factory=dict)
    # The terminal event's type, once the batch held it.
    terminal: str | None = None
    # An error before anything reached the client: the attempt failed with it.
    refused: UpstreamErrorEvent | None = None
    # A frame that cannot be relayed: why (the turn ends after `out`).
    invalid: str | None = None
    # JSON: the whole answer, once the terminal event came.
    body: bytes | None = None


@dataclass
class _Seen:
    """What the client has been sent (SSE) or what the answer will name (JSON)."""

    scrub: SecretScrubber
    wall: Callable[[], float]
    kind: ClientKind = ClientKind.PUBLIC
    events_sent: int = 0
    last_sequence: int | None = None
    response_id: str | None = None
    # A Responses event (not a vendor frame) came: the first-event deadline is met.
    responded: bool = False
    created: bool = False
    # An output event came (anything but the lifecycle events and the terminal).
    output_seen: bool = False

    def note(self, info: EventInfo) -> None:
        if info.sequence_number is not None:
            self.last_sequence = info.sequence_number
        if info.response_id is not None:
            self.response_id = info.response_id
        event_type = info.type or ""
        self.responded = self.responded or is_public(event_type)
        self.created = self.created or event_type == "response.created"
        if is_public(event_type) and event_type not in HELD_TYPES and not info.terminal:
            self.output_seen = True

    def refusal(self, frame: str, info: EventInfo) -> UpstreamErrorEvent | None:
        """The error a frame carries when it refuses the attempt (before any event went out)."""
        if info.type == "error":
            return parse_error_event(frame, wall_now=self.wall())
        if info.type == _FAILED:
            failed = parse_failed_response(frame, wall_now=self.wall())
            if failed is not None and failed.kind in RETRYABLE:
                return failed
        return None

    def scrubbed(self, frame: str, info: EventInfo) -> str:
        # Every frame loses the known secrets (one scan); the upstream's own error texts
        # also lose anything key-shaped.
        return self.scrub(frame) if info.type in SCRUBBED_TYPES else self.scrub.known(frame)

    def side_channel(self, frame: str, info: EventInfo, step: Step) -> bool:
        """Rate-limit figures and metadata headers are taken; True when the frame is done with."""
        if info.type == RATE_LIMITS_TYPE:
            limits = from_frame(frame)
            if limits is not None:
                step.figures.append(limits)
            return True
        if info.type is None:
            return False  # not an event at all: the relay says it cannot be relayed
        if info.type in METADATA_TYPES:
            event = load_event(frame)
            if event is not None:
                step.learned.update(answer_headers.from_metadata(event))
        return disposition(info.type, self.kind) is Disposition.DROP


class SseRelay(_Seen):
    def __init__(
        self,
        scrub: SecretScrubber,
        wall: Callable[[], float],
        kind: ClientKind = ClientKind.PUBLIC,
        *,
        hold: bool = False,
    ) -> None:
        super().__init__(scrub, wall, kind)
        # Lifecycle events kept back until the first output event (or `release`).
        self.holding = hold
        self._held: list[bytes] = []

    @property
    def has_held(self) -> bool:
        return bool(self._held)

    def take(self, frames: Sequence[str | bytes]) -> Step:
        step = Step()
        out: list[bytes] = []
        for frame in frames:
            if isinstance(frame, bytes):
                step.invalid = "a binary frame"
                break
            # Parsed once: what the relay acts on and what proves the frame well-formed.
            event = load_event(frame)
            info = info_of(event)
            if self.side_channel(frame, info, step):
                continue
            if not self.events_sent and not out:
                step.refused = self.refusal(frame, info)
                if step.refused is not None:
                    self._held.clear()
                    return step
            scrubbed = self.scrubbed(frame, info)
            if scrubbed is not frame:
                event = load_event(scrubbed)  # what goes out is judged, once cut
            try:
                encoded = sse.encode_parsed_event(scrubbed, event, info.type)
            except sse.UnencodableEvent as exc:
                step.invalid = exc.reason
                break
            self.note(info)
            self._place(encoded, info, out)
            if info.terminal:
                step.terminal = info.type
                break
        if step.terminal is not None or step.invalid is not None:
            out[:0], self._held = self._held, []
        return self._written(step, out)

    def _place(self, encoded: bytes, info: EventInfo, out: list[bytes]) -> None:
        """Held while holding and still before output; else written, with what was held."""
        if self.holding and not info.terminal and not self.output_seen:
            self._held.append(encoded)
            return
        self.holding = False
        out.extend(self._held)
        self._held = []
        out.append(encoded)

    def release(self) -> Step:
        """The hold window ended: the held events go out, and nothing more is held."""
        self.holding = False
        out, self._held = self._held, []
        return self._written(Step(), out)

    def _written(self, step: Step, out: list[bytes]) -> Step:
        step.events = len(out)
        step.out = out[0] if len(out) == 1 else b"".join(out)
        self.events_sent += step.events
        return step

    def failed_event(self, failure: Failure, close_code: int | None) -> bytes:
        """The `response.failed` that ends a stream the upstream broke off mid-way."""
        sequence = 0 if self.last_sequence is None else self.last_sequence + 1
        event: dict[str, Any]
        if isinstance(failure, UpstreamSilent):
            event = sse.stream_idle_event(
                idle_s=failure.idle_s, response_id=self.response_id, sequence_number=sequence
            )
        elif isinstance(failure, InvalidUpstreamEvent):
            event = sse.invalid_event_failed(
                reason=failure.reason, response_id=self.response_id, sequence_number=sequence
            )
        else:
            reason = getattr(failure, "reason", "")
            event = sse.stream_incomplete_event(
                close_code=close_code,
                reason=reason if isinstance(reason, str) else "",
                response_id=self.response_id,
                sequence_number=sequence,
                scrub=self.scrub,
            )
        return sse.encode_event(json.dumps(event, separators=(",", ":")), _FAILED)


class JsonRelay(_Seen):
    """A client that did not ask to stream gets the final response object.

    Its `output` is assembled from the `response.output_item.done` items when
    the terminal event leaves it empty, as the Codex backend does.
    """

    def __init__(
        self,
        scrub: SecretScrubber,
        wall: Callable[[], float],
        kind: ClientKind = ClientKind.PUBLIC,
    ) -> None:
        super().__init__(scrub, wall, kind)
        self._items: list[tuple[int | None, dict[str, Any]]] = []

    def take(self, frames: Sequence[str | bytes]) -> Step:
        step = Step()
        for frame in frames:
            if isinstance(frame, bytes):
                step.invalid = "a binary frame"
                return step
            info = inspect_event(frame)
            if info.type is None:
                step.invalid = _NOT_JSON
                return step
            if self.side_channel(frame, info, step) or self._collect(frame, info):
                continue
            self.note(info)
            if not info.terminal:
                continue
            step.refused = self.refusal(frame, info)
            if step.refused is not None:
                return step
            if info.type == "error":
                continue
            return self._answer(frame, info, step)
        return step

    def _collect(self, frame: str, info: EventInfo) -> bool:
        """Output items are taken here; True when `frame` was one."""
        if info.type == OUTPUT_ITEM_DONE:
            self.output_seen = True
            found = output_item(self.scrub.known(frame))
            if found is not None:
                self._items.append(found)
            return True
        return False

    def _answer(self, frame: str, info: EventInfo, step: Step) -> Step:
        response = final_response(self.scrubbed(frame, info))
        if response is None:
            step.invalid = _NOT_JSON
            return step
        step.body = json.dumps(with_output(response, self._items)).encode()
        step.terminal = info.type
        return step
