"""Fixtures the end-to-end tests share: one local upstream per module, reset per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from responses_ws_bridge.local.upstream import ThreadedUpstream


@pytest.fixture(scope="module")
def upstream(request: pytest.FixtureRequest) -> Iterator[ThreadedUpstream]:
    """The scriptable Responses upstream; a module sets `UPSTREAM_TOKENS` for a pool."""
    tokens = getattr(request.module, "UPSTREAM_TOKENS", None)
    with ThreadedUpstream(tokens=tokens) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_upstream(request: pytest.FixtureRequest) -> None:
    """Each test starts with no scripted plans and no records of earlier tests."""
    if "upstream" in request.fixturenames:
        server: ThreadedUpstream = request.getfixturevalue("upstream")
        server.reset()
