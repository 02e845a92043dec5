"""SSE framing of upstream events, the mid-stream failure event, and an SSE parser.

`encode_event` is on the hot path (one call per upstream frame); `parse_sse`
follows the WHATWG event-stream rules and serves tests and tools.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from responses_ws_bridge.core.handshake_headers import redact_secrets
from responses_ws_bridge.core.upstream_events import load_event

KEEPALIVE = b": keepalive\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(frame_text: str, event_type: str | None) -> bytes:
    """`event: <type>` (when given), the frame as `data:` lines, then a blank line.

    Raises ValueError for an event type with a line break, which would forge
    fields of its own.
    """
    if "\n" in frame_text or "\r" in frame_text:
        # One data line per line, so that a parser's "\n"-join gives the text back.
        data = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(frame_text))
    else:
        data = f"data: {frame_text}\n"
    if event_type is None:
        return f"{data}\n".encode()
    if "\n" in event_type or "\r" in event_type:
        raise ValueError(f"SSE event type {event_type!r} contains a line break")
    return f"event: {event_type}\n{data}\n".encode()


def parse_sse(data: bytes) -> list[tuple[str | None, str]]:
    """The (event type, data) pairs of a complete event stream.

    An event without an `event:` field (or with an empty one) has type None,
    where a browser would say "message". `id:`/`retry:` are ignored, and so is
    an event left unterminated at the end, as the spec says.
    """
    text = data.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_BREAK.split(text)
    # What follows the last line break is an unfinished line, not an empty one.
    lines.pop()
    events: list[tuple[str | None, str]] = []
    event_type = ""
    data_lines: list[str] = []
    for line in lines:
        if not line:
            if data_lines:
                events.append((event_type or None, "\n".join(data_lines)))
            event_type, data_lines = "", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                event_type = value
            elif name == "data":
                data_lines.append(value)
    return events


class UnencodableEvent(ValueError):
    """An upstream frame a client could not read back as the event it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_upstream_event(frame: str | bytes, event_type: str | None) -> bytes:
    """The SSE bytes of one upstream frame, once it is known to be a well-formed event.

    Raises UnencodableEvent for a binary frame, text that is not a JSON object
    (or holds NaN, Infinity or a number too large for a double, which would
    come back out as the non-JSON `Infinity`), an event without a string
    `type`, a type with a line break or control character (it would forge SSE
    fields), or a type other than `event_type` (what the relay acted on).
    """
    if not isinstance(frame, str):
        raise UnencodableEvent("a binary frame")
    return encode_parsed_event(frame, load_event(frame), event_type)


def encode_parsed_event(frame: str, event: dict[str, Any] | None, event_type: str | None) -> bytes:
    """`encode_upstream_event` for a frame already parsed: `event` is its `load_event`."""
    if event is None:
        raise UnencodableEvent("not a JSON object of finite numbers")
    parsed_type = event.get("type")
    if not isinstance(parsed_type, str) or not parsed_type:
        raise UnencodableEvent("an event without a type")
    if not parsed_type.isprintable():
        raise UnencodableEvent("an event type with a line break or control character")
    if event_type is not None and parsed_type != event_type:
        raise UnencodableEvent("an event whose type is ambiguous")
    return encode_event(frame, parsed_type)


def invalid_event_failed(
    *, reason: str, response_id: str | None, sequence_number: int
) -> dict[str, Any]:
    """The `response.failed` that ends a stream when an upstream event cannot be relayed."""
    return _failed(
        "invalid_upstream_event",
        f"the upstream sent an event that cannot be relayed ({redact_secrets(reason)})",
        response_id=response_id,
        sequence_number=sequence_number,
    )


def stream_incomplete_event(
    *,
    close_code: int | None,
    reason: str,
    response_id: str | None,
    sequence_number: int,
    scrub: Callable[[str], str] = redact_secrets,
) -> dict[str, Any]:
    """The `response.failed` a client gets when the upstream breaks mid-stream.

    `reason` is the upstream's (a close reason): `scrub` cuts known secrets out
    of it; pass the accounts' SecretScrubber.
    """
    what = "connection lost" if close_code is None else f"close code {close_code}"
    if reason:
        what += f": {scrub(reason)}"
    return _failed(
        "stream_incomplete",
        f"upstream WebSocket closed before the response finished ({what})",
        response_id=response_id,
        sequence_number=sequence_number,
    )


def error_as_failed(body: bytes, status: int) -> bytes:
    """The `response.failed` that carries an HTTP error answer once the stream has begun.

    A keepalive may have sent the response head before the request failed
    (Codex CLI's path, long upstream queues): the error the client would have
    had as an HTTP answer ends its stream instead, with the same error object.
    """
    error: dict[str, Any] = {"code": None, "message": f"HTTP {status}"}
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
    event = {
        "type": "response.failed",
        "sequence_number": 0,
        "response": {
            "id": "",
            "object": "response",
            "status": "failed",
            "error": error,
            "incomplete_details": None,
            "output": [],
        },
    }
    return encode_event(json.dumps(event, separators=(",", ":")), "response.failed")


def stream_idle_event(
    *, idle_s: float, response_id: str | None, sequence_number: int
) -> dict[str, Any]:
    """The `response.failed` when the upstream went silent mid-stream for too long."""
    return _failed(
        "stream_incomplete",
        f"the upstream sent no event for {idle_s:g} s (bridge_stream_idle_timeout)",
        response_id=response_id,
        sequence_number=sequence_number,
    )


def _failed(
    code: str, message: str, *, response_id: str | None, sequence_number: int
) -> dict[str, Any]:
    return {
        "type": "response.failed",
        "sequence_number": sequence_number,
        "response": {
            "id": response_id or "",
            "object": "response",
            "status": "failed",
            "error": {"code": code, "message": message},
            "incomplete_details": None,
            "output": [],
        },
    }
