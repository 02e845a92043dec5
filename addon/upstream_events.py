"""What the bridge needs to know about each upstream event frame, cheaply."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TERMINAL_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "error"}
)
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "usage_limit_reached", "insufficient_quota"})
# Frames worth a full parse: they carry the response id or the error.
_PARSED_TYPES = TERMINAL_TYPES | {"response.created", "response.in_progress"}
_TYPE_PREFIX = '{"type":"'


@dataclass(frozen=True, slots=True)
class EventInfo:
    type: str | None
    sequence_number: int | None
    response_id: str | None
    terminal: bool


_INVALID = EventInfo(None, None, None, False)


def inspect_event(frame_text: str) -> EventInfo:
    # Fast path: compact frames that start with the type, the usual shape.
    if frame_text.startswith(_TYPE_PREFIX):
        end = frame_text.find('"', len(_TYPE_PREFIX))
        event_type = frame_text[len(_TYPE_PREFIX) : end] if end > 0 else None
        if event_type is not None and "\\" not in event_type and event_type not in _PARSED_TYPES:
            return EventInfo(event_type, _sequence_number(frame_text), None, False)
    try:
        event = json.loads(frame_text)
    except ValueError:
        return _INVALID
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return _INVALID
    event_type = event["type"]
    seq = event.get("sequence_number")
    response = event.get("response")
    rid = response.get("id") if isinstance(response, dict) else None
    return EventInfo(
        event_type,
        seq if isinstance(seq, int) else None,
        rid if isinstance(rid, str) and rid else None,
        event_type in TERMINAL_TYPES,
    )


def _sequence_number(frame_text: str) -> int | None:
    at = frame_text.find('"sequence_number":')
    if at < 0:
        return None
    start = at + len('"sequence_number":')
    end = start
    while end < len(frame_text) and frame_text[end].isdigit():
        end += 1
    return int(frame_text[start:end]) if end > start else None


def final_response(frame_text: str) -> dict[str, Any] | None:
    try:
        event = json.loads(frame_text)
    except ValueError:
        return None
    response = event.get("response") if isinstance(event, dict) else None
    return response if isinstance(response, dict) else None


@dataclass(frozen=True)
class UpstreamErrorEvent:
    status: int | None
    code: str | None
    type: str | None
    message: str
    param: str | None
    headers: Mapping[str, str]
    raw: Mapping[str, Any]

    @property
    def is_rate_limit(self) -> bool:
        return self.code in RATE_LIMIT_CODES


def parse_error_event(frame_text: str) -> UpstreamErrorEvent | None:
    try:
        event = json.loads(frame_text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "error":
        return None
    error = event.get("error")
    if not isinstance(error, dict):
        error = event  # flat shape: {"type":"error","code":..,"message":..}
    status = event.get("status", event.get("status_code"))
    headers = event.get("headers")
    return UpstreamErrorEvent(
        status=status if isinstance(status, int) else None,
        code=_str(error.get("code")),
        type=_str(error.get("type")) if error is not event else None,
        message=_str(error.get("message")) or "upstream error",
        param=_str(error.get("param")),
        headers={str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {},
        raw=event,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
