"""The "Responses events" contentview: Responses API events, one readable line each.

It renders an SSE body (`text/event-stream`, many events) and a WebSocket
message (one event, or a client's `response.create`): sequence number and
type, text deltas joined into the text they form, the response id, status and
usage of lifecycle events, errors marked with `!!`. `summarize_events` is the
pure core; `ResponsesContentview` adapts it to mitmproxy 12's contentview API,
and `register()` / `unregister()` add it to and remove it from mitmproxy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mitmproxy import contentviews
from mitmproxy.contentviews import Contentview, Metadata

from responses_ws_bridge.core.sse import parse_sse

VIEW_NAME = "Responses events"
# Above JSON (1) and socket.io (1), which would otherwise claim these bodies.
PRIORITY = 2.0
ALERT = "!!"
# How much of a body is inspected to decide whether it is a Responses stream.
_SNIFF_BYTES = 64 * 1024
_LIFECYCLE = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.completed",
        "response.incomplete",
        "response.failed",
    }
)
# Where a delta belongs: consecutive deltas join only within one part.
_PLACE_KEYS = ("item_id", "output_index", "content_index", "summary_index")
_MAX_SHOWN = 200
TIMES = "\u00d7"  # the multiplication sign, as in "x3"


def is_responses_type(value: object) -> bool:
    """Whether an event type is one of the Responses API's (server or client)."""
    return isinstance(value, str) and (value == "error" or value.startswith("response."))


def _q(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _clip(text: str, limit: int = _MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _seq(event: Mapping[str, Any]) -> str:
    number = event.get("sequence_number")
    return f"#{number} " if isinstance(number, int) else ""


def _is_delta(event: Mapping[str, Any]) -> bool:
    kind = event.get("type")
    return isinstance(kind, str) and kind.endswith(".delta") and isinstance(event.get("delta"), str)


def _place(event: Mapping[str, Any]) -> tuple[object, ...]:
    return (event.get("type"), *(event.get(k) for k in _PLACE_KEYS))


def _usage(usage: object) -> str:
    if not isinstance(usage, Mapping):
        return ""
    parts = [f"usage in={usage.get('input_tokens')}"]
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    if cached:
        parts.append(f"(cached {cached})")
    parts.append(f"out={usage.get('output_tokens')}")
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    if reasoning:
        parts.append(f"(reasoning {reasoning})")
    parts.append(f"total={usage.get('total_tokens')}")
    return " ".join(parts)


def _error_text(error: object) -> str:
    """`code: message` of an error object (or whatever of it there is)."""
    if not isinstance(error, Mapping):
        return _clip(str(error)) if error else ""
    code = error.get("code") or error.get("type")
    message = error.get("message")
    text = " ".join(str(p) for p in (code,) if p)
    if message:
        text = f"{text}: {message}" if text else str(message)
    return _clip(text, 500)


def _lifecycle(event: Mapping[str, Any]) -> str:
    kind = event["type"]
    response = event.get("response")
    if not isinstance(response, Mapping):
        response = {}
    words = [f"{_seq(event)}{kind}"]
    if response.get("id"):
        words.append(str(response["id"]))
    if response.get("status"):
        words.append(f"status={response['status']}")
    if kind == "response.created" and response.get("model"):
        words.append(f"model={response['model']}")
    details = response.get("incomplete_details")
    if isinstance(details, Mapping) and details.get("reason"):
        words.append(f"reason={details['reason']}")
    usage = _usage(response.get("usage"))
    if usage:
        words.append(usage)
    line = " ".join(words)
    if kind == "response.failed":
        error = _error_text(response.get("error"))
        return f"{ALERT} {line}" + (f": {error}" if error else "")
    return line


def _error(event: Mapping[str, Any]) -> str:
    # The WebSocket error event nests the error; an SSE one may carry it flat.
    nested = event.get("error")
    source: Mapping[str, Any] = nested if isinstance(nested, Mapping) else event
    status = event.get("status") or event.get("status_code")
    head = f"{ALERT} {_seq(event)}error"
    if status:
        head += f" {status}"
    text = _error_text(source)
    return f"{head} {text}" if text else head


def _item(item: object) -> str:
    if not isinstance(item, Mapping):
        return ""
    words = [str(item.get("type", "?"))]
    if item.get("type") == "function_call":
        words.append(str(item.get("name")))
        if item.get("call_id"):
            words.append(str(item["call_id"]))
    elif item.get("id"):
        words.append(str(item["id"]))
    if item.get("status"):
        words.append(str(item["status"]))
    line = " ".join(words)
    if item.get("type") == "function_call" and item.get("arguments"):
        line += f" arguments={_q(_clip(str(item['arguments'])))}"
    texts = [
        str(part.get("text") or part.get("refusal") or "")
        for part in item.get("content") or ()
        if isinstance(part, Mapping)
    ]
    if any(texts):
        line += f": {_q(_clip(''.join(texts)))}"
    return line


def _where(event: Mapping[str, Any]) -> str:
    """`[output/content]` indexes, left out in the common case of one output."""
    indexes = [event[k] for k in ("output_index", "content_index") if k in event]
    if not any(indexes):
        return ""
    return f" [{'/'.join(str(i) for i in indexes)}]"


def summarize_create(message: Mapping[str, Any]) -> str:
    """A client's `response.create` (or an HTTP request body) in one line."""
    words = [str(message.get("type") or "request")]
    if message.get("model"):
        words.append(f"model={message['model']}")
    value = message.get("input")
    if isinstance(value, list):
        words.append(f"input={len(value)} item{'s' if len(value) != 1 else ''}")
    elif isinstance(value, str):
        words.append(f"input={_q(_clip(value, 80))}")
    for name in ("previous_response_id", "prompt_cache_key", "conversation"):
        if message.get(name):
            words.append(f"{name}={message[name]}")
    tools = message.get("tools")
    if isinstance(tools, list):
        words.append(f"tools={len(tools)}")
    if message.get("generate") is False:
        words.append("generate=false (prewarm)")
    return " ".join(words)


def describe_event(event: Mapping[str, Any]) -> str:
    """One event in one line."""
    kind = event.get("type")
    if kind in _LIFECYCLE:
        return _lifecycle(event)
    if kind == "error":
        return _error(event)
    if kind == "response.create" or (kind is None and ("input" in event or "model" in event)):
        return summarize_create(event)
    line = f"{_seq(event)}{kind if kind is not None else '(no type)'}{_where(event)}"
    if isinstance(kind, str) and kind.startswith("response.output_item."):
        return f"{line} {_item(event.get('item'))}"
    if isinstance(kind, str) and kind.startswith("response.content_part."):
        part = event.get("part")
        if isinstance(part, Mapping):
            line += f" {part.get('type')}"
            text = part.get("text") or part.get("refusal")
            if text:
                line += f": {_q(_clip(str(text)))}"
        return line
    for field in ("delta", "text", "arguments", "refusal"):
        value = event.get(field)
        if isinstance(value, str):
            return f"{line}: {_q(_clip(value))}"
    return line


def _join_deltas(run: Sequence[Mapping[str, Any]]) -> str:
    first, last = run[0], run[-1]
    a, b = first.get("sequence_number"), last.get("sequence_number")
    numbers = f"#{a}-#{b} " if isinstance(a, int) and isinstance(b, int) else ""
    text = "".join(str(e["delta"]) for e in run)
    return f"{numbers}{first['type']}{_where(first)} {TIMES}{len(run)}: {_q(_clip(text, 2000))}"


def summarize_events(events: Sequence[object]) -> list[str]:
    """One line per event, runs of deltas to one part joined into their text.

    A non-object (an SSE `data:` that is not JSON, say) is shown as it is.
    """
    lines: list[str] = []
    run: list[Mapping[str, Any]] = []

    def flush() -> None:
        if len(run) == 1:
            lines.append(describe_event(run[0]))
        elif run:
            lines.append(_join_deltas(run))
        run.clear()

    for event in events:
        if isinstance(event, Mapping) and _is_delta(event):
            if run and _place(run[0]) != _place(event):
                flush()
            run.append(event)
            continue
        flush()
        lines.append(describe_event(event) if isinstance(event, Mapping) else f"data: {event}")
    flush()
    return lines


def _decode(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data


def sse_events(data: bytes) -> list[object]:
    """The events of an SSE body: JSON objects where the data is JSON, else the text."""
    return [_decode(text) for _, text in parse_sse(data)]


def _looks_like_sse(data: bytes, metadata: Metadata) -> bool:
    if metadata.content_type == "text/event-stream":
        return True
    if metadata.websocket_message is not None:
        return False
    return data.lstrip().startswith((b"event:", b"data:"))


class ResponsesContentview(Contentview):
    @property
    def name(self) -> str:
        return VIEW_NAME

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        if _looks_like_sse(data, metadata):
            events = sse_events(data)
            if not events:
                raise ValueError("no complete event in the stream")
        else:
            # One WebSocket message, or one JSON body: a single event.
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
            events = [event]
        return "\n".join(summarize_events(events)) + "\n"

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        if not data:
            return 0
        if metadata.content_type == "text/event-stream":
            # parse_sse drops an event left unfinished where the sniff cuts it.
            for name, text in parse_sse(data[:_SNIFF_BYTES]):
                event = _decode(text)
                kind = event.get("type") if isinstance(event, dict) else name
                if is_responses_type(kind):
                    return PRIORITY
            return 0
        if metadata.websocket_message is not None:
            try:
                event = json.loads(data)
            except ValueError:
                return 0
            if isinstance(event, dict) and is_responses_type(event.get("type")):
                return PRIORITY
        return 0


responses_view = ResponsesContentview()


def register() -> None:
    """Adds the view to mitmproxy (idempotent)."""
    contentviews.add(responses_view)


def unregister() -> None:
    """Removes the view again, if it is still the registered one."""
    registry = contentviews.registry
    if registry.get(VIEW_NAME) is responses_view:
        # mitmproxy 12 has no public removal; the registry is a plain name map.
        registry._by_name.pop(VIEW_NAME.lower(), None)


class ResponsesView:
    """The addon that puts the view in mitmproxy while the bridge is loaded."""

    def load(self, loader: object) -> None:
        register()

    def done(self) -> None:
        unregister()
