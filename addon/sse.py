"""SSE framing of upstream events, and a spec-faithful SSE parser for tests and tools."""

from __future__ import annotations

import re
from typing import Any

KEEPALIVE = b": keepalive\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(frame_text: str, event_type: str | None) -> bytes:
    """`event: <type>` then the frame as `data:` lines, then a blank line."""
    if "\n" in frame_text or "\r" in frame_text:
        # An SSE parser joins data lines with "\n"; split so that it does.
        data = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(frame_text))
    else:
        data = f"data: {frame_text}\n"
    if event_type is None:
        return f"{data}\n".encode()
    return f"event: {event_type}\n{data}\n".encode()


def parse_sse(data: bytes) -> list[tuple[str | None, str]]:
    """(event type, data) pairs, following the WHATWG event-stream rules."""
    events: list[tuple[str | None, str]] = []
    event_type: str | None = None
    lines: list[str] = []
    text = data.decode("utf-8", "replace")
    for line in _LINE_BREAK.split(text):
        if line == "":
            if lines:
                events.append((event_type, "\n".join(lines)))
            event_type, lines = None, []
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            lines.append(value)
    return events


def stream_incomplete_event(
    *, close_code: int | None, reason: str, response_id: str | None, sequence_number: int
) -> dict[str, Any]:
    """The `response.failed` a client gets when the upstream breaks mid-stream."""
    if close_code is None:
        what = "connection lost"
    else:
        what = f"close code {close_code}" + (f": {reason}" if reason else "")
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
        },
    }
