"""Pre-flight header checks, and the early answer of the requestheaders hook."""

from __future__ import annotations

import json

import pytest
from responses_ws_bridge.core.request_checks import (
    AFFINITY_HEADERS,
    MAX_HEADER_BYTES,
    check_headers,
    content_length,
    early_answer,
)

Headers = list[tuple[str, str]]
BASE: Headers = [("host", "chatgpt.com"), ("content-type", "application/json")]
LIMIT = 1000


def checked(*extra: tuple[str, str]) -> tuple[int, str, str | None] | None:
    error = check_headers([*BASE, *extra], max_body=LIMIT)
    if error is None:
        return None
    body = json.loads(error.body)["error"]
    return error.status, body["code"], body["param"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ((("content-length", "1000"),), None),
        ((("content-length", "1001"),), (413, "request_too_large", None)),
        ((("content-length", "1000000000000"),), (413, "request_too_large", None)),
        ((("content-length", "-1"),), (400, "invalid_header", "content-length")),
        ((("content-length", "1e3"),), (400, "invalid_header", "content-length")),
        (
            (("content-length", "10"), ("content-length", "11")),
            (400, "invalid_header", "content-length"),
        ),
        ((("content-length", "10, 10"),), None),
        ((("content-length", "9" * 30),), (400, "invalid_header", "content-length")),
        ((("transfer-encoding", "chunked"),), None),
        ((("Transfer-Encoding", "Chunked"),), None),
        ((("transfer-encoding", "gzip, chunked"),), (400, "invalid_header", "transfer-encoding")),
        (
            (("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")),
            (400, "invalid_header", "transfer-encoding"),
        ),
        (
            (("transfer-encoding", "chunked"), ("content-length", "5")),
            (400, "invalid_header", "content-length"),
        ),
        ((("expect", "100-continue"), ("content-length", "10")), None),
        # A 100 Continue would invite a body the bridge refuses anyway.
        (
            (("expect", "100-continue"), ("content-length", "5000")),
            (413, "request_too_large", None),
        ),
        ((("expect", "something-else"),), (417, "expectation_failed", None)),
        ((("content-encoding", "gzip"),), None),
        ((("content-encoding", "gzip, br"),), None),
        ((("content-encoding", "compress"),), (415, "unsupported_content_encoding", None)),
        ((("x-request-id", "req_abc-123"),), None),
        ((("x-request-id", "req_é"),), (400, "invalid_header", "x-request-id")),
        ((("x-request-id", "a b"),), (400, "invalid_header", "x-request-id")),
        ((("x-request-id", "x" * 513),), (400, "invalid_header", "x-request-id")),
        ((("session_id", "sess\udce9"),), (400, "invalid_header", "session_id")),  # raw 0xE9
        ((("session_id", "s\x00"),), (400, "invalid_header", "session_id")),
        ((("thread-id", "t\x1b[31m"),), (400, "invalid_header", "thread-id")),
        ((("session-id", "日本"),), (400, "invalid_header", "session-id")),
        ((("session-id", "café"),), None),  # ISO-8859-1 is carried
        ((("user-agent", "codex\u2028"),), (400, "invalid_header", "user-agent")),
    ],
)
def test_check_headers(
    extra: tuple[tuple[str, str], ...], expected: tuple[int, str, str | None] | None
) -> None:
    assert checked(*extra) == expected


def test_every_affinity_header_is_checked() -> None:
    for name in AFFINITY_HEADERS:
        assert checked((name, "bad\x7f")) == (400, "invalid_header", name)


def test_header_block_over_16_kib_is_431_and_values_are_never_echoed() -> None:
    secret = "sk-proj-" + "A" * 40
    big = [("x-pad", "p" * MAX_HEADER_BYTES), ("authorization", f"Bearer {secret}")]
    error = check_headers(big, max_body=LIMIT)
    assert error is not None and error.status == 431
    bad = check_headers([("session_id", secret + "\x00")], max_body=LIMIT)
    assert bad is not None and secret.encode() not in bad.body


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], None), (["0"], 0), ([" 12 "], 12), (["12", "12"], 12)],
)
def test_content_length(values: list[str], expected: int | None) -> None:
    assert content_length([("Content-Length", v) for v in values]) == expected


@pytest.mark.parametrize(
    ("headers", "key_ok", "expected"),
    [
        # Wrong key, huge body: refused on the headers, and the unread body ends the connection.
        ([("content-length", "1000000000000")], False, (401, True)),
        ([("transfer-encoding", "chunked")], False, (401, True)),
        ([("content-length", "0")], False, (401, False)),
        ([], False, (401, False)),
        ([("content-length", "1000000000000")], True, (413, True)),
        ([("content-length", "1000000000000"), ("expect", "100-continue")], True, (413, True)),
        ([("transfer-encoding", "gzip, chunked")], True, (400, True)),
        ([("content-length", "10"), ("x-request-id", "é")], True, (400, True)),
        # Nothing wrong: the hook goes on (a chunked body is capped while it streams).
        ([("content-length", "10")], True, None),
        ([("transfer-encoding", "chunked")], True, None),
        # The header block is judged before the key: nothing else is parsed.
        ([("x-pad", "p" * MAX_HEADER_BYTES), ("content-length", "5")], False, (431, True)),
    ],
)
def test_early_answer(headers: Headers, key_ok: bool, expected: tuple[int, bool] | None) -> None:
    answer = early_answer([*BASE, *headers], client_key_ok=key_ok, max_body=LIMIT)
    if expected is None:
        assert answer is None
    else:
        assert answer is not None
        assert (answer.error.status, answer.close) == expected
