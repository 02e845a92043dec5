"""What the bridge needs to know about each upstream event frame, found cheaply.

`inspect_event` runs once per upstream frame, thousands of times a second for
text deltas, so it reads the type and sequence number of compact frames with
string searches and parses JSON only for the few frames that carry the
response id or end the response, or when the fast path cannot be sure.
"""

from __future__ import annotations

import email.utils
import json
import json.scanner
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from responses_ws_bridge.core.failures import PREVIOUS_RESPONSE_NOT_FOUND, UpstreamErrorEvent
from responses_ws_bridge.core.retry_policy import retry_after_from

TERMINAL_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "error"}
)
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
    return info_of(_load_object(frame_text))


def info_of(event: dict[str, Any] | None) -> EventInfo:
    """What `inspect_event` tells of a frame, from the frame parsed (`load_event`)."""
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


# One strict decoder for every frame: `json.loads` with hooks would build a new
# decoder (and its C scanner) per call, on the path of every event.
_STRICT = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


# The decoder's own C scanner (typeshed types its argument oddly: the decoder is what it reads).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(cast(Any, _STRICT))


def load_event(frame_text: str) -> dict[str, Any] | None:
    """The frame as a JSON object; None when it is not one (or holds NaN, Infinity, 1e999)."""
    try:
        # The scanner alone, once per frame: `decode` adds two whitespace passes
        # that a compact frame does not need.
        event, end = _SCAN(frame_text, 0)
    except StopIteration:  # no value at 0 (leading whitespace, or none at all)
        end = -1
    except (ValueError, RecursionError):
        return None
    if end != len(frame_text):
        try:
            event = _STRICT.decode(frame_text)
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


OUTPUT_ITEM_DONE = "response.output_item.done"


def output_item(frame_text: str) -> tuple[int | None, dict[str, Any]] | None:
    """(output_index, item) of a `response.output_item.done` frame; None for anything else."""
    event = _load_object(frame_text)
    if event is None or event.get("type") != OUTPUT_ITEM_DONE:
        return None
    item = event.get("item")
    if not isinstance(item, dict):
        return None
    index = event.get("output_index")
    return (index if isinstance(index, int) and not isinstance(index, bool) else None), item


def with_output(
    response: dict[str, Any], items: list[tuple[int | None, dict[str, Any]]]
) -> dict[str, Any]:
    """The final response, its `output` filled from the items streamed before it.

    The Codex backend often ends with `response.completed` carrying `output: []`,
    the items having come one by one as `response.output_item.done`. A non-empty
    `output` is the upstream's own word and stays.
    """
    if response.get("output") or not items:
        return response
    # Items in output_index order; the ones without an index keep their arrival order.
    ordered = sorted(
        enumerate(items), key=lambda e: (e[1][0] if e[1][0] is not None else e[0], e[0])
    )
    return {**response, "output": [item for _, (_, item) in ordered]}


_INVALID_PREVIOUS = "invalid `previous_response_id`"


def _canonical_code(code: Any, message: str) -> Any:
    """One code for an unknown previous response, whichever of its two shapes the upstream used."""
    if (code is None or code == "invalid_request_error") and message.lower().startswith(
        _INVALID_PREVIOUS
    ):
        return PREVIOUS_RESPONSE_NOT_FOUND
    return code


def parse_error_event(
    frame_text: str, *, wall_now: float | None = None
) -> UpstreamErrorEvent | None:
    """The `error` event in any of its shapes; None for anything else.

    | shape                                      | error object        | status                 |
    |--------------------------------------------|---------------------|------------------------|
    | `{"type":"error","error":{...}}`           | `error`             | `status`/`status_code` |
    | `{"type":"error","body":{"error":{...}}}`  | `body.error`        | `status`/`status_code` |
    | `{"type":"error","code":..,"message":..}`  | the event (flat)    | `status`/`status_code` |

    A `headers` map (string, number or boolean values) comes along as
    strings. With `wall_now` (epoch seconds), a rate-limit event also gets
    the reset time its headers or body give.
    """
    event = _load_object(frame_text)
    if event is None or event.get("type") != "error":
        return None
    nested = _error_object(event)
    error = nested if nested is not None else event
    message = _str(error.get("message")) or "the upstream reported an error"
    code = _canonical_code(error.get("code"), message)
    if nested is not None:
        error_object: dict[str, Any] = dict(nested)
        error_type = _str(nested.get("type"))
        if code == PREVIOUS_RESPONSE_NOT_FOUND:
            error_object["code"] = code
            error_object["param"] = error_object.get("param") or "previous_response_id"
    else:
        # Flat shape: its "type" is the event's, not an error type.
        error_type = None
        error_object = {
            "message": message,
            "type": None,
            "code": code,
            "param": _str(event.get("param")),
        }
    header_map = header_values(event.get("headers"))
    parsed = UpstreamErrorEvent(
        status=_status(event),
        code=_str(code),
        type=error_type,
        message=message,
        param=_str(error.get("param")),
        headers=header_map,
        error_object=error_object,
    )
    if wall_now is None or not parsed.is_rate_limit:
        return parsed
    body = {**event, "error": nested} if nested is not None else event
    delay = retry_after_from(header_map, body, wall_now=wall_now)
    return replace(parsed, retry_after_s=delay)


def parse_failed_response(
    frame_text: str, *, wall_now: float | None = None
) -> UpstreamErrorEvent | None:
    """A `response.failed` event's `response.error` as an error (None: not one, or no error).

    Overload and auth errors arrive this way too, after `response.created`.
    """
    event = _load_object(frame_text)
    if event is None or event.get("type") != "response.failed":
        return None
    response = event.get("response")
    error = response.get("error") if isinstance(response, dict) else None
    if not isinstance(error, dict):
        return None
    synthetic = json.dumps({"type": "error", "error": error, "headers": event.get("headers")})
    parsed = parse_error_event(synthetic, wall_now=wall_now)
    return replace(parsed, failed_response=True) if parsed is not None else None


def _error_object(event: dict[str, Any]) -> dict[str, Any] | None:
    nested = event.get("error")
    if isinstance(nested, dict):
        return nested
    body = event.get("body")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        inner: dict[str, Any] = body["error"]
        return inner
    return None


def _status(event: dict[str, Any]) -> int | None:
    status = event.get("status", event.get("status_code"))
    if status is None and isinstance(event.get("body"), dict):
        status = event["body"].get("status")
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def header_values(headers: Any) -> dict[str, str]:
    """An event's `headers` map as strings, as an HTTP client would read them.

    Numbers keep their JSON spelling, booleans are `true`/`false`; nested
    values (which no header can carry) are left out.
    """
    if not isinstance(headers, dict):
        return {}
    out: dict[str, str] = {}
    for name, value in headers.items():
        if isinstance(value, bool):
            out[str(name)] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[str(name)] = value if isinstance(value, str) else json.dumps(value)
    return out


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
