"""What the bridge needs to know about each upstream event frame, found cheaply.

`inspect_event` runs once per upstream frame, thousands of times a second for
text deltas, so it reads the type and sequence number of compact frames with
string searches and parses JSON only for the few frames that carry the
response id or end the response, or when the fast path cannot be sure.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TERMINAL_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "error"}
)
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "usage_limit_reached", "insufficient_quota"})
# Frames worth a full parse: they carry the response id, the final response or the error.
_PARSED_TYPES = TERMINAL_TYPES | {"response.created", "response.queued", "response.in_progress"}
_TYPE_PREFIX = '{"type":"'
_SEQ_KEY = '"sequence_number"'
_UNSURE = -1  # sequence numbers are never negative


@dataclass(frozen=True, slots=True)
class EventInfo:
    type: str | None
    sequence_number: int | None
    response_id: str | None
    terminal: bool


_INVALID = EventInfo(None, None, None, False)


def inspect_event(frame_text: str) -> EventInfo:
    """Type, sequence number, response id and terminality of one upstream frame."""
    # Fast path: a compact frame whose first key is "type", the upstream's usual shape.
    if frame_text.startswith(_TYPE_PREFIX) and frame_text.endswith("}"):
        end = frame_text.find('"', len(_TYPE_PREFIX))
        event_type = frame_text[len(_TYPE_PREFIX) : end]
        if (
            end > 0
            and event_type not in _PARSED_TYPES
            and "\\" not in event_type
            and event_type.isprintable()
        ):
            seq = _fast_sequence_number(frame_text)
            if seq != _UNSURE:
                return EventInfo(event_type, seq, None, False)
    return _inspect_parsed(frame_text)


def _fast_sequence_number(text: str) -> int | None:
    """The sequence number, None when there is none, or _UNSURE."""
    at = text.find(_SEQ_KEY)
    if at < 0:
        return None
    pos = at + len(_SEQ_KEY)
    # A second occurrence could be a nested key: let the JSON parser decide.
    if text.find(_SEQ_KEY, pos) >= 0:
        return _UNSURE
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    if pos >= n or text[pos] != ":":
        return _UNSURE  # a string value "sequence_number", not the key
    pos += 1
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    start = pos
    while pos < n and "0" <= text[pos] <= "9":
        pos += 1
    if pos == start or pos >= n or text[pos] not in ",} \t\r\n":
        return _UNSURE  # not a plain integer: null, negative, fraction, exponent
    return int(text[start:pos])


def _inspect_parsed(frame_text: str) -> EventInfo:
    event = _load_object(frame_text)
    if event is None or not isinstance(event.get("type"), str):
        return _INVALID
    event_type: str = event["type"]
    seq = event.get("sequence_number")
    response = event.get("response")
    rid = response.get("id") if isinstance(response, dict) else None
    return EventInfo(
        event_type,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        rid if isinstance(rid, str) and rid else None,
        event_type in TERMINAL_TYPES,
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e999 parses as inf, which would go back out as the non-JSON "Infinity".
        raise ValueError(f"{text} is not a finite number")
    return value


def load_event(frame_text: str) -> dict[str, Any] | None:
    """The frame as a JSON object; None when it is not one (or holds NaN, Infinity, 1e999)."""
    try:
        event = json.loads(frame_text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


_load_object = load_event


def final_response(frame_text: str) -> dict[str, Any] | None:
    """The `response` object of a terminal response.* event (for non-streaming clients)."""
    event = _load_object(frame_text)
    if event is None:
        return None
    event_type = event.get("type")
    if event_type not in TERMINAL_TYPES or event_type == "error":
        return None
    response = event.get("response")
    return response if isinstance(response, dict) else None


@dataclass(frozen=True)
class UpstreamErrorEvent:
    status: int | None
    code: str | None
    type: str | None
    message: str
    param: str | None
    headers: Mapping[str, str]
    # The upstream's error object as sent, so that a client gets all of it.
    error_object: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_rate_limit(self) -> bool:
        return self.code in RATE_LIMIT_CODES


def parse_error_event(frame_text: str) -> UpstreamErrorEvent | None:
    """The `error` event, nested (`{"error": {...}}`) or flat; None for anything else."""
    event = _load_object(frame_text)
    if event is None or event.get("type") != "error":
        return None
    nested = event.get("error")
    error = nested if isinstance(nested, dict) else event
    status = event.get("status", event.get("status_code"))
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    headers = event.get("headers")
    code = error.get("code")
    message = _str(error.get("message")) or "the upstream reported an error"
    if isinstance(nested, dict):
        error_object: dict[str, Any] = dict(nested)
        error_type = _str(nested.get("type"))
    else:
        # Flat shape: its "type" is the event's, not an error type.
        error_type = None
        error_object = {
            "message": message,
            "type": None,
            "code": code,
            "param": _str(event.get("param")),
        }
    return UpstreamErrorEvent(
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        code=_str(code),
        type=error_type,
        message=message,
        param=_str(error.get("param")),
        headers={str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {},
        error_object=error_object,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --- reset times an upstream chose ----------------------------------------------------------

# The longest rate-limit window there is (a spent weekly quota); anything later is clamped.
MAX_RESET_S = 7 * 24 * 3600.0
DEFAULT_RETRY_AFTER_S = 60.0


def clamp_reset_s(seconds: float | None) -> float | None:
    """An upstream's delay in seconds, at most MAX_RESET_S; None when unusable or not given."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_RESET_S)


def retry_after_header(
    value: str | None, *, fallback_s: float | None = None, wall_now: float | None = None
) -> str | None:
    """The Retry-After a client gets: whole seconds, at least 1, at most MAX_RESET_S.

    `value` is the upstream's header (seconds or an HTTP date, the latter used
    only when `wall_now`, epoch seconds, is given); `fallback_s` is used when
    it is missing or unusable.
    """
    seconds: float | None = None
    if value is not None:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if wall_now is not None:
                try:
                    seconds = email.utils.parsedate_to_datetime(text).timestamp() - wall_now
                except (TypeError, ValueError, IndexError, OverflowError):
                    seconds = None
        seconds = clamp_reset_s(seconds)
    if seconds is None:
        seconds = clamp_reset_s(fallback_s)
    if seconds is None:
        return None
    return str(max(1, math.ceil(seconds)))
