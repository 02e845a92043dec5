"""Pre-flight checks of a bridged request's headers, before its body is read.

Everything that could fail once an upstream turn has started (and been
billed) is checked here first, from the headers alone: their total size, the
framing (Content-Length, Transfer-Encoding, Expect), the Content-Encoding, and
every value that goes into the upstream handshake, which the WebSocket library
writes as ISO-8859-1 and refuses control characters in. `early_answer` then
says whether the `requestheaders` hook must answer at once, without reading
the body, and whether the connection must close afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from responses_ws_bridge.core import http_fields, openai_errors
from responses_ws_bridge.core.affinity import HARD_HEADERS
from responses_ws_bridge.core.body_decoding import BodyDecodingError, parse_content_encoding
from responses_ws_bridge.core.openai_errors import HttpError

MAX_HEADER_BYTES = 16 * 1024
MAX_REQUEST_ID = 512
# What the WebSocket library accepts in a header value: tab, visible ASCII, 0x80-0xff.
_HANDSHAKE_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]+")
# Header names that bind a session to an account: their values become binding keys.
AFFINITY_HEADERS = tuple(name for name, _ in HARD_HEADERS)


@dataclass(frozen=True)
class EarlyAnswer:
    """Answer with `error` now; `close`: a body may follow, so the connection ends after it."""

    error: HttpError
    close: bool


def header_bytes(headers: Sequence[tuple[str, str]]) -> int:
    """The header block's size as on the wire (`name: value\\r\\n` per field)."""
    return sum(len(k) + len(v) + 4 for k, v in headers)


def body_may_follow(headers: Sequence[tuple[str, str]]) -> bool:
    for name, value in headers:
        low = name.lower()
        if low == "transfer-encoding":
            return True
        if low == "content-length" and value.strip() != "0":
            return True
    return False


def content_length(headers: Sequence[tuple[str, str]]) -> int | None:
    """The announced length; None when absent. Raises ValueError when invalid or conflicting."""
    values = [v.strip() for v in http_fields.values(headers, "content-length")]
    if not values:
        return None
    # "10, 10" (one field, a list) is as ambiguous as two fields: RFC 9112 §6.3.
    parts = {p.strip() for v in values for p in v.split(",")}
    if len(parts) != 1:
        raise ValueError("Content-Length is given more than once with different values")
    (only,) = parts
    if not _DIGITS.fullmatch(only) or len(only) > 18:
        raise ValueError("Content-Length is not a number of bytes")
    return int(only)


def check_headers(headers: Sequence[tuple[str, str]], *, max_body: int) -> HttpError | None:
    """The first problem with the headers of a bridged request, or None."""
    size = header_bytes(headers)
    if size > MAX_HEADER_BYTES:
        return openai_errors.headers_too_large(size, MAX_HEADER_BYTES)
    for name, value in headers:
        low = name.lower()
        if low == "x-request-id":
            if not _VISIBLE_ASCII.fullmatch(value.strip()) or len(value.strip()) > MAX_REQUEST_ID:
                return openai_errors.invalid_header(
                    name,
                    f"must be 1 to {MAX_REQUEST_ID} visible ASCII characters",
                )
        elif not _HANDSHAKE_VALUE.fullmatch(value):
            why = (
                "must be ISO-8859-1 text without control characters"
                if low in AFFINITY_HEADERS
                else "contains characters that cannot be forwarded (control characters "
                "or text outside ISO-8859-1)"
            )
            return openai_errors.invalid_header(name, why)
    encodings = http_fields.values(headers, "transfer-encoding")
    if encodings:
        if [e.strip().lower() for e in encodings] != ["chunked"]:
            return openai_errors.invalid_header(
                "Transfer-Encoding", "only a plain `chunked` is accepted"
            )
        if http_fields.has(headers, "content-length"):
            return openai_errors.invalid_header(
                "Content-Length", "must not be sent together with Transfer-Encoding"
            )
    try:
        length = content_length(headers)
    except ValueError as exc:
        return openai_errors.invalid_header("Content-Length", str(exc))
    try:
        parse_content_encoding(",".join(http_fields.values(headers, "content-encoding")))
    except BodyDecodingError as exc:
        return openai_errors.body_decoding_failed(exc)
    expect = [v.strip().lower() for v in http_fields.values(headers, "expect")]
    if expect and expect != ["100-continue"]:
        return openai_errors.expectation_failed()
    if length is not None and length > max_body:
        # With Expect: 100-continue this is the answer instead of a 100.
        return openai_errors.request_too_large(length, max_body)
    return None


def early_answer(
    headers: Sequence[tuple[str, str]], *, client_key_ok: bool, max_body: int
) -> EarlyAnswer | None:
    """What the `requestheaders` hook answers without reading the body, or None to go on.

    Order: an oversized header block first (nothing else in it is looked at),
    then the client key (a stranger learns nothing about what else is wrong),
    then everything `check_headers` checks.
    """
    close = body_may_follow(headers)
    size = header_bytes(headers)
    if size > MAX_HEADER_BYTES:
        return EarlyAnswer(openai_errors.headers_too_large(size, MAX_HEADER_BYTES), close)
    if not client_key_ok:
        return EarlyAnswer(openai_errors.unauthorized_client_key(), close)
    error = check_headers(headers, max_body=max_body)
    if error is not None:
        return EarlyAnswer(error, close)
    return None
