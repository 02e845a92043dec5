from __future__ import annotations

from collections.abc import Iterator

import pytest
from responses_ws_bridge.local.state_server import StateServer


@pytest.fixture
def state_server() -> Iterator[StateServer]:
    """A fresh Valkey/Redis server on 127.0.0.1, stopped after the test."""
    with StateServer() as server:
        yield server
