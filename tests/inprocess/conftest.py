from __future__ import annotations

from collections.abc import Iterator

import pytest
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.local.tls import TestPki, make_test_pki


@pytest.fixture
def state_server() -> Iterator[StateServer]:
    """A fresh Valkey/Redis server on 127.0.0.1, stopped after the test."""
    with StateServer() as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))
