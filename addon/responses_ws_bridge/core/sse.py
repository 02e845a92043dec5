"""SSE framing of upstream events, the mid-stream failure event, and an SSE parser.

`encode_event` is on the hot path (one call per upstream frame); `parse_sse`
follows the WHATWG event-stream rules and serves tests and tools.
"""

from __future__ import annotations

import re
from typing import Any

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


def stream_incomplete_event(
    *, close_code: int | None, reason: str, response_id: str | None, sequence_number: int
) -> dict[str, Any]:
    """The `response.failed` a client gets when the upstream breaks mid-stream."""
    what = "connection lost" if close_code is None else f"close code {close_code}"
    if reason:
        what += f": {reason}"
    return {
        "type": "response.failed",
        "sequence_number": sequence_number,
        "response": {
            "id": response_id or "",
            "object": "response",
            "status": "failed",
            "error": {
                "code": "stream_incomplete",
                "message": f"upstream WebSocket closed before the response finished ({what})",
            },
            "incomplete_details": None,
            "output": [],
        },
    }
