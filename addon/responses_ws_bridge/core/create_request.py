"""The HTTP request body → the first WebSocket message, `response.create`.

`parse_create_request` validates what the bridge itself must understand (size,
JSON object, `stream`, `background`) and leaves every other field to the
upstream, which validates the Responses API parameters.

Sizes, each refused before any upstream is contacted:

| what is too large                       | answer                        | why                   |
|-----------------------------------------|-------------------------------|-----------------------|
| the body, over `bridge_max_body`        | 413 `request_too_large` (from | a transport limit,    |
| (announced or decoded)                  | the headers when announced)   | like the peers' 413   |
| the `response.create` message, over the | 400 `payload_too_large`,      | Codex CLI retries a   |
| upstream frame budget (16 MiB,          | param `input`                 | 413 five times with   |
| `bridge_upstream_frame_limit`)          |                               | the full payload and  |
|                                         |                               | then drops WebSocket  |
|                                         |                               | for the session; a    |
|                                         |                               | 400 stops it at once  |

Nothing is trimmed to fit: the upstream gets what the client sent, or nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn


class BadRequest(Exception):
    """A request the bridge refuses before going upstream (HTTP 400 or 413)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


# The body fields the bridge itself decides on: affinity, the prewarm, the model.
DECISION_FIELDS = ("previous_response_id", "conversation", "prompt_cache_key", "model", "generate")


def decision_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a turn keeps of its parsed body: the whole of it (its input, instructions and
    tools, as large as the body) would live as long as the turn, beside `message`."""
    return {name: body[name] for name in DECISION_FIELDS if name in body}


def decision_fields_of(body: bytes | str) -> dict[str, Any]:
    """The decision fields of a body that is only read, not sent as `response.create`
    (a forwarded request, a WebSocket client's message): {} when it is no JSON object."""
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return decision_fields(parsed) if isinstance(parsed, dict) else {}


@dataclass(frozen=True)
class CreateRequest:
    stream: bool
    message: bytes  # the response.create frame text, UTF-8 JSON: the whole request
    body: Mapping[str, Any]  # the parsed HTTP body's `DECISION_FIELDS`

    def _str(self, name: str) -> str | None:
        value = self.body.get(name)
        return value if isinstance(value, str) and value else None

    @property
    def previous_response_id(self) -> str | None:
        return self._str("previous_response_id")

    @property
    def conversation(self) -> str | None:
        """The conversation id, given either as a string or as `{"id": ...}`."""
        value = self.body.get("conversation")
        if isinstance(value, Mapping):
            value = value.get("id")
        return value if isinstance(value, str) and value else None

    @property
    def prompt_cache_key(self) -> str | None:
        return self._str("prompt_cache_key")

    @property
    def model(self) -> str | None:
        return self._str("model")


# Fields that say how the HTTP answer is delivered, not what to generate: a
# WebSocket session always streams and cannot run in the background.
_HTTP_ONLY_FIELDS = frozenset({"stream", "background"})


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN/Infinity, which are not JSON and which the
    # upstream would reject as a malformed frame.
    raise ValueError(f"{name} is not valid JSON")


# The upstream's WebSocket message budget (what a Responses socket accepts).
DEFAULT_FRAME_LIMIT = 16 * 1024 * 1024


def parse_create_request(
    body: bytes, *, max_body: int, max_frame: int | None = None
) -> CreateRequest:
    """Validate an HTTP Responses body and build the `response.create` message.

    `max_frame`: the largest message the upstream takes (None or 0: no limit).
    """
    if len(body) > max_body:
        raise BadRequest(
            413,
            "request_too_large",
            f"request body is {len(body)} bytes; the bridge accepts at most {max_body} bytes",
        )
    if not body.strip():
        raise BadRequest(400, "invalid_json", "request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            400, "invalid_json", f"request body is not valid UTF-8 (at byte {exc.start})"
        ) from exc
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            400,
            "invalid_json",
            f"request body is not valid JSON: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno}, char {exc.pos})",
        ) from exc
    except (ValueError, RecursionError) as exc:
        # NaN/Infinity, integers beyond Python's digit limit, absurd nesting.
        raise BadRequest(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise BadRequest(
            400,
            "invalid_request_body",
            f"request body must be a JSON object, not {_json_kind(parsed)}",
        )
    background = parsed.get("background")
    if background is True:
        raise BadRequest(
            400,
            "unsupported_parameter",
            "background: true is not supported by this bridge: a background response "
            "cannot be carried over a Responses WebSocket session; send the request "
            "without background",
            "background",
        )
    if background is not None and not isinstance(background, bool):
        raise BadRequest(400, "invalid_type", "background must be a boolean", "background")
    stream = parsed.get("stream")
    if stream is None:
        stream = False  # the HTTP API's default; null is how SDKs say "not given"
    elif not isinstance(stream, bool):
        raise BadRequest(
            400, "invalid_type", f"stream must be a boolean, not {_json_kind(stream)}", "stream"
        )
    # `type` names the WebSocket message, so a body field of that name is
    # overwritten by "response.create" rather than sent as a second `type`.
    message: dict[str, Any] = {"type": "response.create"}
    for key, value in parsed.items():
        if key not in _HTTP_ONLY_FIELDS and key != "type":
            message[key] = value
    encoded = _encode(message)
    if max_frame and len(encoded) > max_frame:
        raise BadRequest(
            400,
            "payload_too_large",
            f"the request is {len(encoded)} bytes as a Responses WebSocket message; the "
            f"upstream accepts at most {max_frame} bytes: shorten the input (compact the "
            "conversation)",
            "input",
        )
    return CreateRequest(stream=stream, message=encoded, body=decision_fields(parsed))


def _encode(message: dict[str, Any]) -> bytes:
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate escape ("\ud800") is valid JSON but not encodable as
        # UTF-8; escaped output carries it through unchanged.
        return json.dumps(message, separators=(",", ":")).encode("ascii")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"
