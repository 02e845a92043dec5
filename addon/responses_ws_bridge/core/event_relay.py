"""Upstream frames into what the client is sent: SSE bytes, or one JSON body. Pure.

`SseRelay.take(frames)` turns one batch of frames (every frame that had
arrived) into one write: the client sees nothing until the first event, so a
failure before it can still be retried. `JsonRelay.take(frames)` collects a
non-streaming client's answer until the terminal event. Both keep what the
client has seen (events, last sequence number, response id), which is what
the ending of a broken stream and the retry decision need.

What stops a batch:

| frame                                     | SSE                    | JSON          |
|-------------------------------------------|------------------------|---------------|
| `codex.rate_limits`                       | figures, not relayed   | figures       |
| `error` before anything was sent          | refused: the attempt   | refused       |
|                                           | failed with it         |               |
| binary, not a JSON object, a forged type  | invalid: what came     | invalid       |
|                                           | before it is written   |               |
| a terminal event                          | written, the end       | the body      |
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from responses_ws_bridge.core import sse
from responses_ws_bridge.core.failures import (
    Failure,
    InvalidUpstreamEvent,
    UpstreamErrorEvent,
    UpstreamSilent,
)
from responses_ws_bridge.core.rate_limits import FRAME_TYPE, RateLimits, from_frame
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.upstream_events import (
    OUTPUT_ITEM_DONE,
    EventInfo,
    final_response,
    inspect_event,
    output_item,
    parse_error_event,
    with_output,
)

# Upstream frames whose text is the upstream's own error message: scrubbed of anything
# key-shaped too. Every other frame loses the known secrets only.
SCRUBBED_TYPES = frozenset({"error", "response.failed"})
_NOT_JSON = "not a JSON object of finite numbers"


@dataclass
class Step:
    """What one batch of frames comes to."""

    # SSE bytes for the client (b"": nothing to write); the first write starts the stream.
    out: bytes = b""
    events: int = 0
    figures: list[RateLimits] = field(default_factory=list)
    # The terminal event's type, once the batch held it.
    terminal: str | None = None
    # An `error` event before anything reached the client: the attempt failed with it.
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
    events_sent: int = 0
    last_sequence: int | None = None
    response_id: str | None = None

    def note(self, info: EventInfo) -> None:
        if info.sequence_number is not None:
            self.last_sequence = info.sequence_number
        if info.response_id is not None:
            self.response_id = info.response_id

    def refusal(self, frame: str) -> UpstreamErrorEvent | None:
        return parse_error_event(frame, wall_now=self.wall())

    def scrubbed(self, frame: str, info: EventInfo) -> str:
        # Every frame loses the known secrets (one scan); the upstream's own error texts
        # also lose anything key-shaped.
        return self.scrub(frame) if info.type in SCRUBBED_TYPES else self.scrub.known(frame)


class SseRelay(_Seen):
    def take(self, frames: Sequence[str | bytes]) -> Step:
        step = Step()
        out: list[bytes] = []
        for frame in frames:
            if isinstance(frame, bytes):
                step.invalid = "a binary frame"
                break
            info = inspect_event(frame)
            if info.type == FRAME_TYPE:
                _figures(frame, step)
                continue
            if info.type == "error" and not self.events_sent and not out:
                step.refused = self.refusal(frame)
                if step.refused is not None:
                    return step
            try:
                out.append(sse.encode_upstream_event(self.scrubbed(frame, info), info.type))
            except sse.UnencodableEvent as exc:
                step.invalid = exc.reason
                break
            self.note(info)
            if info.terminal:
                step.terminal = info.type
                break
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
        return sse.encode_event(json.dumps(event, separators=(",", ":")), "response.failed")


class JsonRelay(_Seen):
    """A client that did not ask to stream gets the final response object.

    Its `output` is assembled from the `response.output_item.done` items when
    the terminal event leaves it empty, as the Codex backend does.
    """

    def __init__(self, scrub: SecretScrubber, wall: Callable[[], float]) -> None:
        super().__init__(scrub, wall)
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
            if self._collect(frame, info, step):
                continue
            self.note(info)
            if not info.terminal:
                continue
            if info.type == "error":
                step.refused = self.refusal(frame)
                if step.refused is not None:
                    return step
                continue
            return self._answer(frame, info, step)
        return step

    def _collect(self, frame: str, info: EventInfo, step: Step) -> bool:
        """Figures and output items are taken here; True when `frame` was one."""
        if info.type == FRAME_TYPE:
            _figures(frame, step)
            return True
        if info.type == OUTPUT_ITEM_DONE:
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


def _figures(frame: str, step: Step) -> None:
    limits = from_frame(frame)
    if limits is not None:
        step.figures.append(limits)
