"""The server events of one Responses turn, as plain dicts (no I/O).

Shapes follow the OpenAI Responses streaming API (`ResponsesServerEvent` in
openai-python) and what the real server sent to Codex CLI 0.169.0 (see
`captures/`): a text turn, a function-call turn, and the empty answer to a
`generate: false` prewarm. Also the WebSocket `error` event, OpenAI-style HTTP
error bodies, the compact JSON encoding used on the wire, and the workload a
request may pick from a local upstream.

Workloads (benchmarks): a request's `metadata` (the Responses API's string
map) may carry `local_deltas` (number of `response.output_text.delta` events),
`local_pace_ms` (milliseconds between events, decimals allowed) and
`local_stamp` ("1": stamp every event with `x_sent_ns`). Both local upstreams
(`local.upstream`, WebSocket, and the benchmark's `scripts/harness/local_sse_upstream.py`,
HTTP SSE) honour them, so one upstream process serves every workload;
`workload_metadata` writes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

# Builds the turn's response object: (status, output items, output tokens).
_ResponseFn = Callable[[str, Sequence[Mapping[str, Any]], int], dict[str, Any]]

DEFAULT_TEXT = "Hello from the local upstream."
DEFAULT_MODEL = "gpt-5-codex"

# Request fields the real server echoes into the response object, with the
# value it reports when the request leaves them out.
_ECHOED_DEFAULTS: dict[str, Any] = {
    "background": False,
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": None,
    "service_tier": "auto",
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}


@dataclass(frozen=True)
class FunctionCall:
    """A function call the turn answers with instead of text."""

    name: str
    arguments: str = "{}"


@dataclass(frozen=True)
class TurnSpec:
    """What one turn says.

    `deltas`: None splits `text` into word-ish pieces; an int gives exactly that
    many `response.output_text.delta` events (the text is grouped, or repeated
    to fit; 0 means an empty text). `model`: None reports the request's model.
    `function_call`: answer with this call whatever the request asks.
    `stamp_ns`: the server adds `x_sent_ns` (`time.time_ns()` at send time) to
    every event, for latency measurements; this module never reads a clock.
    `ignore_generate`: answer a `generate: false` prewarm with a full turn too
    (captures/websocket-prewarm-answered-with-text.json). `completed_output`:
    see the field.
    """

    text: str = DEFAULT_TEXT
    deltas: int | None = None
    model: str | None = None
    function_call: FunctionCall | None = None
    stamp_ns: bool = False
    ignore_generate: bool = False
    # False: `response.completed` carries `output: []`, as the Codex backend often
    # sends it; the items came as `response.output_item.done` only.
    completed_output: bool = True
    # "incomplete": the turn ends with `response.incomplete` instead.
    terminal: str = "completed"

    def __post_init__(self) -> None:
        if self.deltas is not None and self.deltas < 0:
            raise ValueError(f"deltas must be >= 0, got {self.deltas}")


def split_text(text: str, deltas: int | None) -> list[str]:
    """The delta pieces of a turn; their concatenation is the turn's text."""
    pieces = re.findall(r"^\s+|\S+\s*", text)
    if deltas is None:
        return pieces
    if deltas == 0:
        return []
    if len(pieces) < deltas:
        # Repeat the text's own words (or a filler) until there are enough.
        source = pieces or ["lorem "]
        index = 0
        while len(pieces) < deltas:
            word = source[index % len(source)]
            if pieces and not pieces[-1][-1:].isspace():
                pieces[-1] += " "
            pieces.append(word)
            index += 1
        return pieces
    # Group neighbouring pieces into `deltas` runs of near-equal size.
    size, extra = divmod(len(pieces), deltas)
    grouped: list[str] = []
    start = 0
    for n in range(deltas):
        end = start + size + (1 if n < extra else 0)
        grouped.append("".join(pieces[start:end]))
        start = end
    return grouped


def function_call_for(request: Mapping[str, Any], spec: TurnSpec) -> FunctionCall | None:
    """The function the turn calls: the spec's, or the one `tool_choice` demands."""
    if spec.function_call is not None:
        return spec.function_call
    choice = request.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") == "function" and choice.get("name"):
        return FunctionCall(str(choice["name"]))
    if choice == "required":
        for tool in request.get("tools") or ():
            if isinstance(tool, Mapping) and tool.get("type") == "function" and tool.get("name"):
                return FunctionCall(str(tool["name"]))
    return None


def is_prewarm(request: Mapping[str, Any]) -> bool:
    """`generate: false`: the server answers with an empty completed response."""
    return request.get("generate") is False


def response_object(
    request: Mapping[str, Any],
    *,
    response_id: str,
    created_at: int,
    status: str,
    model: str | None = None,
    output: Sequence[Mapping[str, Any]] = (),
    usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A `Response` object as the server reports it for `request`."""
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": created_at if status == "completed" else None,
        "error": None,
        "incomplete_details": None,
        "model": model or request.get("model") or DEFAULT_MODEL,
        "output": [dict(item) for item in output],
        "usage": dict(usage) if usage is not None else None,
    }
    for name, default in _ECHOED_DEFAULTS.items():
        value = request.get(name)
        response[name] = value if value is not None else default
    return response


def usage_for(request: Mapping[str, Any], output_tokens: int) -> dict[str, Any]:
    """Token counts: about four characters of input per token, one per delta."""
    input_chars = len(json.dumps(request.get("input", ""), separators=(",", ":")))
    input_tokens = max(1, input_chars // 4)
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def turn_events(
    request: Mapping[str, Any],
    spec: TurnSpec,
    *,
    response_id: str,
    item_id: str,
    created_at: int,
) -> Iterator[dict[str, Any]]:
    """The events answering one `response.create`, numbered from 0.

    `item_id` is the id of the turn's one output item (`msg_...` for text,
    `fc_...` for a function call; see `function_call_for`).
    """
    model = spec.model or request.get("model") or DEFAULT_MODEL

    def response(
        status: str, output: Sequence[Mapping[str, Any]] = (), tokens: int = 0
    ) -> dict[str, Any]:
        usage = usage_for(request, tokens) if status == "completed" else None
        return response_object(
            request,
            response_id=response_id,
            created_at=created_at,
            status=status,
            model=model,
            output=output,
            usage=usage,
        )

    if is_prewarm(request) and not spec.ignore_generate:
        bodies: Iterator[dict[str, Any]] = iter(
            [
                {"type": "response.created", "response": response("in_progress", (), 0)},
                {"type": "response.completed", "response": response("completed")},
            ]
        )
    else:
        call = function_call_for(request, spec)
        if call is not None:
            bodies = _function_call_bodies(call, item_id, response)
        else:
            bodies = _text_bodies(split_text(spec.text, spec.deltas), item_id, response)
    for sequence_number, body in enumerate(bodies):
        body["sequence_number"] = sequence_number
        if not spec.completed_output and body["type"] == "response.completed":
            body["response"]["output"] = []
        if spec.terminal != "completed" and body["type"] == "response.completed":
            body["type"] = f"response.{spec.terminal}"
            body["response"]["status"] = spec.terminal
        yield body


def _text_bodies(
    pieces: list[str], item_id: str, response: _ResponseFn
) -> Iterator[dict[str, Any]]:
    text = "".join(pieces)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def part(value: str) -> dict[str, Any]:
        return {"type": "output_text", "text": value, "annotations": [], "logprobs": []}

    def message(status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    yield {"type": "response.created", "response": response("in_progress", (), 0)}
    yield {"type": "response.in_progress", "response": response("in_progress", (), 0)}
    yield {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": message("in_progress", []),
    }
    yield {"type": "response.content_part.added", **where, "part": part("")}
    for piece in pieces:
        yield {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
    yield {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
    yield {"type": "response.content_part.done", **where, "part": part(text)}
    done = message("completed", [part(text)])
    yield {"type": "response.output_item.done", "output_index": 0, "item": done}
    yield {"type": "response.completed", "response": response("completed", [done], len(pieces))}


def _function_call_bodies(
    call: FunctionCall, item_id: str, response: _ResponseFn
) -> Iterator[dict[str, Any]]:
    call_id = "call_" + item_id.partition("_")[2][:24]

    def item(status: str, arguments: str) -> dict[str, Any]:
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "arguments": arguments,
            "call_id": call_id,
            "name": call.name,
        }

    where = {"item_id": item_id, "output_index": 0}
    yield {"type": "response.created", "response": response("in_progress", (), 0)}
    yield {"type": "response.in_progress", "response": response("in_progress", (), 0)}
    yield {"type": "response.output_item.added", "output_index": 0, "item": item("in_progress", "")}
    # The real server sent the arguments in one delta (captures/tool-roundtrip-*).
    yield {"type": "response.function_call_arguments.delta", **where, "delta": call.arguments}
    yield {"type": "response.function_call_arguments.done", **where, "arguments": call.arguments}
    done = item("completed", call.arguments)
    yield {"type": "response.output_item.done", "output_index": 0, "item": done}
    yield {"type": "response.completed", "response": response("completed", [done], 1)}


def error_event(
    status: int,
    code: str | None,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A WebSocket `error` event; `headers` only when given."""
    event: dict[str, Any] = {
        "type": "error",
        "status": status,
        "error": {"type": type_, "code": code, "message": message, "param": param},
    }
    if headers is not None:
        event["headers"] = dict(headers)
    return event


def rate_limit_event(retry_after_s: int = 1) -> dict[str, Any]:
    """The 429 `error` event of a rate-limited `response.create`."""
    return error_event(
        429,
        "rate_limit_exceeded",
        f"Rate limit reached. Please try again in {retry_after_s}s.",
        type_="requests",
        headers={"retry-after": str(retry_after_s)},
    )


def connection_limit_event() -> dict[str, Any]:
    """What the upstream answers a `response.create` with on a socket past its 60 minutes."""
    return error_event(
        400,
        "websocket_connection_limit_reached",
        "Responses websocket connection limit reached (60 minutes). "
        "Create a new websocket connection to continue.",
    )


def invalid_previous_response_event() -> dict[str, Any]:
    """The other shape of an unknown `previous_response_id`: no code, only the message."""
    return error_event(400, None, "Invalid `previous_response_id`.", param="previous_response_id")


def rate_limits_event(
    primary_used: float,
    *,
    reset_at: int,
    secondary_used: float | None = None,
    window_minutes: int = 300,
    bucket: str | None = None,
) -> dict[str, Any]:
    """A `codex.rate_limits` frame (`bucket`: a `limit_name` other than Codex's own)."""
    limits: dict[str, Any] = {
        "primary": {
            "used_percent": primary_used,
            "window_minutes": window_minutes,
            "reset_at": reset_at,
        }
    }
    if secondary_used is not None:
        limits["secondary"] = {
            "used_percent": secondary_used,
            "window_minutes": 10080,
            "reset_at": reset_at + 6 * 24 * 3600,
        }
    event: dict[str, Any] = {
        "type": "codex.rate_limits",
        "plan_type": "plus",
        "rate_limits": limits,
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
    }
    if bucket is not None:
        event["limit_name"] = bucket
    return event


# (type, code) of the OpenAI-style HTTP error body for a status.
_HTTP_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    426: ("invalid_request_error", "upgrade_required"),
    429: ("requests", "rate_limit_exceeded"),
}


def http_error_body(
    status: int, message: str | None = None, *, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "code", "param"}}` for an HTTP status."""
    type_, default_code = _HTTP_ERRORS.get(
        status,
        ("server_error", "server_error") if status >= 500 else ("invalid_request_error", "error"),
    )
    if message is None:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = f"HTTP {status}"
    return {
        "error": {
            "message": message,
            "type": type_,
            "code": code if code is not None else default_code,
            "param": None,
        }
    }


def encode(event: Mapping[str, Any]) -> str:
    """Compact JSON, as one WebSocket text frame carries it."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


# -- workloads chosen by the request (local upstreams only) -----------------

WORKLOAD_DELTAS = "local_deltas"
WORKLOAD_PACE_MS = "local_pace_ms"
WORKLOAD_STAMP = "local_stamp"
MAX_WORKLOAD_DELTAS = 10_000_000
MAX_WORKLOAD_PACE_MS = 60_000.0


@dataclass(frozen=True)
class Workload:
    """What a request asks of a local upstream; None leaves the server's own setting."""

    deltas: int | None = None
    pace_s: float | None = None
    stamp: bool | None = None


class BadWorkload(ValueError):
    """A `local_*` metadata value the upstream cannot honour; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def requested_workload(request: Mapping[str, Any]) -> Workload:
    """The workload in `request["metadata"]`; raises `BadWorkload` for a bad value."""
    metadata = request.get("metadata")
    if not isinstance(metadata, Mapping):
        return Workload()
    deltas: int | None = None
    pace_s: float | None = None
    stamp: bool | None = None
    raw = metadata.get(WORKLOAD_DELTAS)
    if raw is not None:
        try:
            deltas = int(str(raw))
        except ValueError:
            raise BadWorkload(WORKLOAD_DELTAS, f"{WORKLOAD_DELTAS} must be an integer") from None
        if not 0 <= deltas <= MAX_WORKLOAD_DELTAS:
            raise BadWorkload(
                WORKLOAD_DELTAS, f"{WORKLOAD_DELTAS} must be in 0..{MAX_WORKLOAD_DELTAS}"
            )
    raw = metadata.get(WORKLOAD_PACE_MS)
    if raw is not None:
        try:
            pace_ms = float(str(raw))
        except ValueError:
            raise BadWorkload(WORKLOAD_PACE_MS, f"{WORKLOAD_PACE_MS} must be a number") from None
        # `not <=` also refuses NaN.
        if not 0 <= pace_ms <= MAX_WORKLOAD_PACE_MS:
            raise BadWorkload(
                WORKLOAD_PACE_MS, f"{WORKLOAD_PACE_MS} must be in 0..{MAX_WORKLOAD_PACE_MS:g}"
            )
        pace_s = pace_ms / 1000
    raw = metadata.get(WORKLOAD_STAMP)
    if raw is not None:
        if str(raw) not in ("0", "1"):
            raise BadWorkload(WORKLOAD_STAMP, f'{WORKLOAD_STAMP} must be "0" or "1"')
        stamp = str(raw) == "1"
    return Workload(deltas, pace_s, stamp)


def apply_workload(spec: TurnSpec, pace_s: float, workload: Workload) -> tuple[TurnSpec, float]:
    """The turn and pace to serve: the server's own, overridden by the request's workload."""
    if workload.deltas is not None:
        spec = replace(spec, deltas=workload.deltas)
    if workload.stamp is not None:
        spec = replace(spec, stamp_ns=workload.stamp)
    return spec, pace_s if workload.pace_s is None else workload.pace_s


def workload_metadata(
    deltas: int | None = None, pace_ms: float | None = None, stamp: bool | None = None
) -> dict[str, str]:
    """The `metadata` entries that ask a local upstream for this workload."""
    metadata: dict[str, str] = {}
    if deltas is not None:
        metadata[WORKLOAD_DELTAS] = str(deltas)
    if pace_ms is not None:
        metadata[WORKLOAD_PACE_MS] = f"{pace_ms:g}"
    if stamp is not None:
        metadata[WORKLOAD_STAMP] = "1" if stamp else "0"
    return metadata
