"""The one field lookup and the one Bearer parser."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.http_fields import bearer_token, has, header, values

FIELDS = [("Content-Type", "text/plain"), ("X-A", "1"), ("x-a", "2"), ("Empty", "")]


def test_values_are_every_value_in_order_whatever_the_case() -> None:
    assert values(FIELDS, "X-a") == ["1", "2"]
    assert values({"X-A": "1"}, "x-a") == ["1"]
    assert values(FIELDS, "missing") == []


def test_header_is_the_first_value() -> None:
    assert header(FIELDS, "x-a") == "1"
    assert header(FIELDS, "empty") == ""
    assert header(FIELDS, "missing") is None
    assert has(FIELDS, "CONTENT-TYPE") and not has(FIELDS, "missing")


@pytest.mark.parametrize(
    ("authorization", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("  BEARER abc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(authorization: str | None, token: str | None) -> None:
    assert bearer_token(authorization) == token
